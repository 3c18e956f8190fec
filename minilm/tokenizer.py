"""Text -> token ids, with the `tokenizers` library and sentence-transformers' conventions (packing: packing.py).

tokenizer.json may switch on padding (all-MiniLM-L6-v2's pads to 128) and truncation at another length;
sentence-transformers pads nothing and truncates at `max_seq_length` from sentence_bert_config.json. So do we.
"""

import numbers
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from minilm import files
from minilm.errors import InputError, MissingFileError
from minilm.packing import pack


class SentenceTokenizer:
    """Turns a list of strings into a packed batch: input_ids [total_tokens], cu_seqlens [batch + 1], longest."""

    def __init__(self, tokenizer: Tokenizer, max_seq_length: int, do_lower_case: bool = False):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.do_lower_case = do_lower_case
        self.max_seq_length = max_seq_length

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        # numbers.Integral, as load's check and truncate_dim: a numpy integer is an integer too; kept as an int,
        # which save can write to JSON
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 2:
            raise InputError(f"max_seq_length must be an integer >= 2 (room for [CLS] and [SEP]); got {value!r}")
        value = int(value)
        self._max_seq_length = value
        # Truncation counts the special tokens, so a sentence keeps max_seq_length - 2 word pieces.
        self.tokenizer.enable_truncation(max_length=value)

    @classmethod
    def from_dir(cls, model_dir, max_seq_length=None) -> "SentenceTokenizer":
        """Read tokenizer.json (or, for older checkpoints, vocab.txt) and sentence_bert_config.json."""
        model_dir = Path(model_dir)
        settings_path = model_dir / "sentence_bert_config.json"
        settings = _read_json(settings_path, "the sentence-transformers Transformer settings")
        if "do_lower_case" in settings and not isinstance(settings["do_lower_case"], bool):
            raise InputError(f"{settings_path}: field 'do_lower_case' is {settings['do_lower_case']!r}; "
                             "expected true or false")
        if (model_dir / "tokenizer.json").is_file():
            try:
                tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            except Exception as error:  # the tokenizers library raises plain Exceptions for malformed files
                raise InputError(f"cannot read the tokenizer {model_dir / 'tokenizer.json'}: {error}; expected a "
                                 "tokenizers (Hugging Face) tokenizer.json") from None
        elif (model_dir / "vocab.txt").is_file():
            config_path = model_dir / "tokenizer_config.json"
            lowercase = _read_json(config_path, "the tokenizer settings").get("do_lower_case", True)
            if not isinstance(lowercase, bool):
                raise InputError(f"{config_path}: field 'do_lower_case' is {lowercase!r}; expected true or false")
            tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=lowercase)._tokenizer
        else:
            raise MissingFileError(f"no tokenizer.json or vocab.txt in {model_dir}")
        if max_seq_length is None:
            if settings.get("max_seq_length") is not None:
                max_seq_length = settings["max_seq_length"]
                if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length < 2:
                    raise InputError(f"{settings_path}: field 'max_seq_length' is {max_seq_length!r}; "
                                     "expected an integer >= 2")
            else:
                max_seq_length = _model_max_length(model_dir)
        return cls(tokenizer, max_seq_length, do_lower_case=settings.get("do_lower_case", False))

    def encode_ids(self, texts: list) -> list:
        """Token ids of each text ([CLS] ... [SEP]), truncated to max_seq_length. Tokenizes in parallel."""
        if self.do_lower_case:
            texts = [text.lower() for text in texts]
        try:
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        except TypeError:  # the tokenizer takes only valid Unicode: name the text that is not
            for index, text in enumerate(texts):
                if (problem := lone_surrogate(text)) is not None:
                    raise InputError(f"text {index} holds {problem}: {text[:60]!r}") from None
            raise
        return [encoding.ids for encoding in encodings]

    def __call__(self, texts: list) -> dict:
        return pack(self.encode_ids(texts))


def lone_surrogate(text: str):
    """None for valid Unicode text; else what is wrong, for an error message. JSON can spell half of a UTF-16
    surrogate pair ("\\ud800"), which Python keeps but which is no character: the tokenizer refuses it."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"{text[error.start:error.end]!r} at character {error.start}, half of a UTF-16 surrogate pair and no "
                "Unicode character")
    return None


def _read_json(path: Path, what: str) -> dict:
    """An optional JSON object of settings: {} when the file is not there."""
    return files.read_json(path, what) if path.exists() else {}


def _model_max_length(model_dir: Path) -> int:
    """Without a sentence_bert_config.json: the tokenizer's limit, capped by the position table."""
    path = model_dir / "tokenizer_config.json"
    limit = _read_json(path, "the tokenizer settings").get("model_max_length", 512)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 2:
        raise InputError(f"{path}: field 'model_max_length' is {limit!r}; expected a number >= 2")
    positions = _read_json(model_dir / "config.json", "the BERT settings").get("max_position_embeddings", 512)
    return min(int(limit), int(positions)) if limit < 1e9 else int(positions)  # transformers' "no limit" is 1e30
