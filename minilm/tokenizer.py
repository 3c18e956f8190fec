"""Text -> packed token ids, with the `tokenizers` library and sentence-transformers' conventions.

tokenizer.json may switch on padding (all-MiniLM-L6-v2's pads to 128) and truncation at another length;
sentence-transformers pads nothing and truncates at `max_seq_length` from sentence_bert_config.json. So do we.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer


class SentenceTokenizer:
    """Turns a list of strings into a packed batch: input_ids [total_tokens], cu_seqlens [batch + 1], max_seqlen."""

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
        if value < 2:
            raise ValueError(f"max_seq_length must leave room for [CLS] and [SEP]; got {value}")
        self._max_seq_length = value
        # Truncation counts the special tokens, so a sentence keeps max_seq_length - 2 word pieces.
        self.tokenizer.enable_truncation(max_length=value)

    @classmethod
    def from_dir(cls, model_dir, max_seq_length=None) -> "SentenceTokenizer":
        """Read tokenizer.json (or, for older checkpoints, vocab.txt) and sentence_bert_config.json."""
        model_dir = Path(model_dir)
        settings = _read_json(model_dir / "sentence_bert_config.json", default={})
        if (model_dir / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        elif (model_dir / "vocab.txt").is_file():
            lowercase = _read_json(model_dir / "tokenizer_config.json", default={}).get("do_lower_case", True)
            tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=lowercase)._tokenizer
        else:
            raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {model_dir}")
        if max_seq_length is None:
            max_seq_length = settings.get("max_seq_length") or _model_max_length(model_dir)
        return cls(tokenizer, max_seq_length, do_lower_case=bool(settings.get("do_lower_case", False)))

    def encode_ids(self, texts: list) -> list:
        """Token ids of each text ([CLS] ... [SEP]), truncated to max_seq_length. Tokenizes in parallel."""
        if self.do_lower_case:
            texts = [text.lower() for text in texts]
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def __call__(self, texts: list) -> dict:
        return pack(self.encode_ids(texts))


def pack(id_lists: list) -> dict:
    """Concatenate token id lists into the packed batch layout."""
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(id_lists) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    input_ids = torch.tensor([token for ids in id_lists for token in ids], dtype=torch.long)
    return {"input_ids": input_ids, "cu_seqlens": cu_seqlens, "max_seqlen": int(lengths.max()) if id_lists else 0}


def split_packed(batch: dict, size: int) -> list:
    """A packed batch -> packed batches of at most `size` sentences each, in order."""
    cu_seqlens = batch["cu_seqlens"]
    pieces = []
    for start in range(0, len(cu_seqlens) - 1, size):
        end = min(start + size, len(cu_seqlens) - 1)
        first, last = int(cu_seqlens[start]), int(cu_seqlens[end])
        piece_cu = cu_seqlens[start:end + 1] - cu_seqlens[start]
        pieces.append({"input_ids": batch["input_ids"][first:last], "cu_seqlens": piece_cu,
                       "max_seqlen": int((piece_cu[1:] - piece_cu[:-1]).max())})
    return pieces


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"cannot parse {path}: {error}") from None


def _model_max_length(model_dir: Path) -> int:
    """Without a sentence_bert_config.json: the tokenizer's limit, capped by the position table."""
    limit = _read_json(model_dir / "tokenizer_config.json", default={}).get("model_max_length", 512)
    positions = _read_json(model_dir / "config.json", default={}).get("max_position_embeddings", 512)
    return min(int(limit), int(positions)) if isinstance(limit, (int, float)) and limit < 1e9 else int(positions)
