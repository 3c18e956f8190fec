"""SentenceEncoder: tokenizer + BERT encoder + pooling (+ Normalize), with encode, similarity and save.

A sentence-transformers checkpoint directory holds exactly these pieces: `modules.json` lists a Transformer,
a Pooling (`1_Pooling/config.json`) and optionally Normalize; `sentence_bert_config.json` gives max_seq_length;
`config_sentence_transformers.json` the prompts, the default prompt's name and a default truncate_dim.
`save` writes the same layout back, so sentence-transformers and transformers load what minilm trained.
"""

import copy
import json
import logging
import numbers
import os
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm import fast_paths, files, pooling
from minilm.encoder import BertEncoder, load_encoder, save_encoder
from minilm.errors import InputError
from minilm.hub import resolve_model_dir
from minilm.packing import pack
from minilm.tokenizer import SentenceTokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"
POOLING_MODULE = "sentence_transformers.models.Pooling"
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
# encode's precisions -> the dtype of its weights and activations (the table lives in minilm/fast_paths.py);
# encode also takes "auto" (fast_paths.resolve_precision: the fastest of them here)
PRECISIONS = fast_paths.PRECISIONS
CONVERT_TO = ("numpy", "tensor")
ST_CONFIG = "config_sentence_transformers.json"
# encode_document's prompt, as sentence-transformers looks it up: the first of these names the model has.
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
# encode's batches on the CPU hold at most this many tokens (with token_budget): 32 SciFact abstracts of 256 tokens
# (8,192) encoded 10% slower in fp32 than the same abstracts 16 at a time, as the activations outgrow the caches
# (bf16: 3%; 2,048 tokens: no faster than 4,096; benchmarks/README.md). A GPU takes the batches as they come.
CPU_BATCH_TOKENS = 4096


def batch_to(batch: dict, device) -> dict:
    """Move a packed batch's tensors to `device`."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


class SentenceEncoder(nn.Module):
    """Texts -> sentence embeddings. `model(batch)` is the differentiable path for training;
    `model.encode(texts)` is the batched, no-grad path for inference."""

    def __init__(self, encoder: BertEncoder, tokenizer: SentenceTokenizer, pooling_modes=("mean",),
                 normalize=False, source_dir=None, prompts=None, default_prompt_name=None, truncate_dim=None):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling_modes = tuple(pooling_modes)
        self.normalize = normalize
        self.source_dir = Path(source_dir) if source_dir else None
        self.backends = None  # no backend forced: minilm/fast_paths.py chooses per device and precision
        # Prompts, as sentence-transformers keeps them: name -> the text put before every text encoded with it
        # ({"query": "query: ", "document": "passage: "}); default_prompt_name: the one encode uses unasked.
        # Checked where they are used (encode, save), since a dict can be changed in place.
        self.prompts = {} if prompts is None else prompts
        self.default_prompt_name = default_prompt_name
        check_prompts(self.prompts, default_prompt_name, "SentenceEncoder")
        self.truncate_dim = truncate_dim
        if encoder.pooler is not None:
            # Kept only to be saved again; sentence embeddings never use it, so it takes no gradient.
            encoder.pooler.requires_grad_(False)

    # --- properties ------------------------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return len(self.pooling_modes) * self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.encoder.embeddings.word.weight.device

    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if _is_int(value) and value > self.encoder.config.max_position_embeddings:
            raise InputError(f"max_seq_length {value} exceeds the model's "
                             f"{self.encoder.config.max_position_embeddings} position embeddings; expected 2 to "
                             f"{self.encoder.config.max_position_embeddings}")
        self.tokenizer.max_seq_length = value  # checks the type and the lower bound

    @property
    def normalize(self) -> bool:
        """Whether embeddings end with sentence-transformers' Normalize (unit length); save writes the module when
        True. Set to True or False: a string such as "no" is truthy and would normalize."""
        return self._normalize

    @normalize.setter
    def normalize(self, value) -> None:
        if not isinstance(value, bool):
            raise InputError(f"normalize must be True or False, not {value!r}")
        self._normalize = value

    @property
    def truncate_dim(self):
        """encode's default truncate_dim: None (the whole embedding) or how many of its first dimensions encode
        keeps (a Matryoshka-trained model's smaller size). Set to an int from 1 to embedding_dim, or None."""
        return self._truncate_dim

    @truncate_dim.setter
    def truncate_dim(self, value) -> None:
        self._truncate_dim = None if value is None else check_truncate_dim(value, self.embedding_dim)

    @property
    def backends(self) -> fast_paths.Backends:
        """The backends forced by name (None where minilm/fast_paths.py chooses). Set it to None, a dict such as
        {"attention": "math", "linear": "plain"}, or a fast_paths.Backends; an unknown name is an InputError."""
        return self._backends

    @backends.setter
    def backends(self, value) -> None:
        self._backends = fast_paths.forced(value)

    # --- forward ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: list) -> dict:
        """Texts -> packed batch on the CPU: input_ids [total_tokens], cu_seqlens [batch + 1], longest."""
        return self.tokenizer(_check_texts(texts))

    def forward(self, batch: dict, normalize=None, encoder=None, backends=None) -> torch.Tensor:
        """Packed batch (on the model's device) -> sentence embeddings [batch, embedding_dim].

        encoder and backends: encode's inference copy and the backends it chose; by default the model's own
        encoder, with the backends minilm/fast_paths.py chooses for training. Pooling is always float32."""
        encoder = self.encoder if encoder is None else encoder
        if backends is None:
            backends = fast_paths.choose(batch["input_ids"].device, "fp32", self.pooling_modes, self.backends,
                                         training=True)
        tokens = encoder(batch["input_ids"], batch["cu_seqlens"], batch["longest"], backends.attention)
        normalize = self.normalize if normalize is None else normalize
        tokens = tokens.float()  # [total, hidden]; a no-op unless encode's copy ran in bf16/fp16
        return pooling.pool(tokens, batch["cu_seqlens"], self.pooling_modes, normalize, backends.pooling)

    def _inference_encoder(self, dtype, linear: str):
        """The encoder to run `encode` with: weights in `dtype` (None: float32), Linears of the backend `linear`.

        The model's own encoder where nothing changes (float32, plain nn.Linear). Otherwise a private inference
        copy, made when it pays: to cast the weights once (autocast would cast every activation, and under
        inference_mode every weight, at every call) and to swap in prepacked Linears (minilm/fast_paths.py).
        The copy is a deepcopy of the live encoder, so every edit a user made carries into it: replaced
        submodules, instance-level forward overrides, hooks; class-level patches reach it as they reach the
        encoder. One copy is kept per (dtype, linear), so switching precision costs nothing; it is rebuilt when
        a parameter or buffer changed (replaced, or changed in place where torch counts it: in-place ops bump a
        tensor's version) or the module structure changed (see `_inference_key`), and at every encode of a
        model in training mode (see `refresh_inference_copies`)."""
        if dtype is None and linear == "plain":
            return self.encoder
        key = _inference_key(self.encoder)
        copies = self.__dict__.setdefault("_inference_copies", {})  # (dtype, linear) -> (key, copy); not submodules
        if (dtype, linear) not in copies or copies[(dtype, linear)][0] != key:
            copies.pop((dtype, linear), None)  # free the stale copy before making the new one
            with torch.inference_mode(False), torch.no_grad():
                inference = copy.deepcopy(self.encoder)
                inference.pooler = None  # kept only to be saved: encode never runs it
                inference.eval().requires_grad_(False).to(dtype or torch.float32)
                fast_paths.swap_linears(inference, linear)
            copies[(dtype, linear)] = (key, inference)
        return copies[(dtype, linear)][1]

    def refresh_inference_copies(self) -> None:
        """Drop encode's inference copies; the next encode makes them again from the live weights.

        encode calls it itself when the model is in training mode (a training loop evaluating): the copies are
        made again at every such call (a deepcopy, a cast and a prepack: ~0.05 s, little beside an evaluation),
        because an optimizer can change the weights without torch counting it - torch.optim.AdamW(fused=True)
        (torch 2.13) updates them in place without bumping their versions. Call it yourself after such a change
        to a model in eval mode: fused optimizer steps, then model.eval(), then encode; or writes through `.data`
        or into shared memory from numpy. Changes torch counts are seen without it: in-place ops under no_grad,
        load_state_dict, the other optimizers' steps, replaced modules."""
        self.__dict__.pop("_inference_copies", None)

    def encode(self, sentences, batch_size=32, normalize=None, convert_to="numpy", show_progress=False,
               precision="fp32", token_budget=True, truncate_dim=None, prompt=None, prompt_name=None):
        """Embed sentences in batches of similar length, returned in the input order.

        sentences: a string or a sequence of strings. normalize: None follows the model (Normalize in modules.json),
        True/False forces it. convert_to: "numpy" (float32 ndarray) or "tensor" (float32 on the model's device).
        precision: "fp32" (the default: exact parity), or "bf16"/"fp16" to run the encoder on a copy with weights
        in that type (bf16 pays on CPUs with AVX-512 bf16 or AMX), or "int8" for int8 weights and activations in
        the Linears (all but the attention's q/k/v projection; minilm/quantize.py), or "auto": the fastest of
        fp32, bf16 and int8 on this CPU within measured quality bands (on CUDA: bf16 where the GPU has it),
        decided once per process and logged once with the reason (minilm/cpu.py). An explicit precision that
        runs slower than fp32 on this CPU warns once, with the factor. Pooling and the returned embeddings stay
        float32.
        batch_size and token_budget: sentences are encoded longest first, and the first batch holds the
        batch_size longest. With token_budget (the default), each later batch takes as many of the shorter
        sentences as fit in that first batch's number of tokens: peak memory stays that of batch_size
        sentences, the matrix multiplies get more rows, and the embeddings are the same (to float rounding,
        ~1e-7). On the CPU a batch also stops at CPU_BATCH_TOKENS (4,096) tokens, the first one too: long texts
        encode faster in such batches. token_budget=False: exactly batch_size sentences per forward pass.
        truncate_dim: keep the first truncate_dim dimensions of each embedding (None: the model's truncate_dim,
        by default the whole embedding), as sentence-transformers does: cut after the model's Normalize, so a cut
        embedding of a normalizing model is not unit length; normalize=True makes it unit length after the cut.
        prompt / prompt_name: text put before every sentence before tokenization (so it counts against
        max_seq_length), given as is or by its name in model.prompts; neither: the model's default prompt, if
        it names one; prompt="" encodes without one. Both given: prompt wins, prompt_name is ignored with a
        warning (as in sentence-transformers).
        Returns [n, dim], or [dim] for a single string (dim: truncate_dim or embedding_dim), an ordinary tensor
        or array (the model runs under inference_mode, the result is not an inference tensor: it can be changed
        in place or used in autograd). Text past max_seq_length is truncated.
        A bad argument is an InputError (a ValueError) that names it and says what is accepted.
        The backends of the Linears, attention and pooling are chosen once per call, in minilm/fast_paths.py.
        The model's mode (training or eval) is the same afterwards, also when encode fails. In training mode,
        encode makes its inference copies again from the live weights (see refresh_inference_copies).
        """
        _check_encode_arguments(batch_size, normalize, convert_to, show_progress, precision, token_budget)
        precision = fast_paths.resolve_precision(self.device, precision)
        dim = self.truncate_dim if truncate_dim is None else check_truncate_dim(truncate_dim, self.embedding_dim)
        prompt = self.resolve_prompt(prompt, prompt_name)
        single = isinstance(sentences, str)
        texts = _check_texts([sentences] if single else sentences)
        if prompt:
            texts = [prompt + text for text in texts]
        backends = fast_paths.choose(self.device, precision, self.pooling_modes, self.backends)
        was_training = self.training
        if was_training:  # a training loop evaluating: its optimizer may have changed weights uncounted
            self.refresh_inference_copies()
        self.eval()
        try:
            output = self._encode(texts, batch_size, normalize, show_progress, precision, token_budget, backends, dim)
        finally:
            self.train(was_training)
        if single:
            output = output[0]
        return output.cpu().numpy() if convert_to == "numpy" else output

    def encode_query(self, sentences, prompt=None, prompt_name=None, **kwargs):
        """encode for search queries: with the model's "query" prompt unless a prompt is given (as
        sentence-transformers' encode_query); a model without one encodes as `encode` does."""
        return self.encode(sentences, prompt=self.resolve_prompt(prompt, prompt_name, "query"), **kwargs)

    def encode_document(self, sentences, prompt=None, prompt_name=None, **kwargs):
        """encode for the documents searched: with the model's "document", else "passage", else "corpus" prompt
        unless a prompt is given (as sentence-transformers' encode_document)."""
        return self.encode(sentences, prompt=self.resolve_prompt(prompt, prompt_name, "document"), **kwargs)

    def resolve_prompt(self, prompt=None, prompt_name=None, role=None) -> str:
        """The text encode puts before each sentence ("" for none), as sentence-transformers resolves it: prompt
        as given; else model.prompts[prompt_name]; else, for role "query" or "document", the model's prompt of
        that role (see encode_query, encode_document); else the default prompt; else none. An unknown name is
        an InputError listing the names."""
        check_prompts(self.prompts, self.default_prompt_name, "the model's")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, not {type(prompt).__name__}")
            if prompt_name is not None:
                log.warning("encode: both prompt and prompt_name given; prompt_name %r is ignored, prompt %r is "
                            "used (as in sentence-transformers)", prompt_name, prompt)
            return prompt
        if prompt_name is None and role is not None:
            names = {"query": ("query",), "document": DOCUMENT_PROMPT_NAMES}[role]
            prompt_name = next((name for name in names if name in self.prompts), None)
        name = self.default_prompt_name if prompt_name is None else prompt_name
        if name is None:
            return ""
        if not isinstance(name, str) or name not in self.prompts:
            raise InputError(f"prompt_name {name!r} is not one of the model's prompts "
                             f"({', '.join(map(repr, self.prompts)) or 'it has none'})")
        return self.prompts[name]

    def _encode(self, texts, batch_size, normalize, show_progress, precision, token_budget, backends, dim):
        """encode's loop, in eval mode: [len(texts), dim or embedding_dim] float32 on the model's device."""
        id_lists = self.tokenizer.encode_ids(texts)
        max_tokens = CPU_BATCH_TOKENS if self.device.type == "cpu" else None
        batches = length_sorted_batches([len(ids) for ids in id_lists], batch_size, token_budget, max_tokens)
        dim = dim or self.embedding_dim
        output = torch.empty(len(texts), dim, dtype=torch.float32, device=self.device)
        if show_progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        encoder = self._inference_encoder(PRECISIONS[precision], backends.linear)
        with torch.inference_mode():  # output was made outside it: an ordinary tensor, written in place
            for indices in batches:
                batch = batch_to(pack([id_lists[i] for i in indices]), self.device)
                embeddings = self(batch, normalize, encoder, backends)[:, :dim]  # [batch, dim]
                if normalize and dim < self.embedding_dim:
                    embeddings = F.normalize(embeddings, dim=-1)  # asked for unit length: at the size returned
                output[torch.tensor(indices, device=self.device)] = embeddings
        return output

    @staticmethod
    def similarity(a, b) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)] of two embedding arrays (numpy or torch, 1-d or 2-d); other
        shapes, or sizes that differ, are an InputError naming the argument."""
        a, b = _check_embeddings(a, b)
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    # --- files -----------------------------------------------------------------------------------------------
    def save(self, model_dir) -> Path:
        """Write the sentence-transformers layout: weights, configs, tokenizer files, modules.json."""
        check_prompts(self.prompts, self.default_prompt_name, "the model's")  # never save what load refuses
        if not isinstance(model_dir, (str, os.PathLike)) or not str(model_dir):  # Path("") is the current folder
            raise InputError(f"save: model_dir must be a folder's path (a str or Path), not {model_dir!r}")
        model_dir = Path(model_dir)
        if model_dir.exists() and not model_dir.is_dir():
            raise InputError(f"save: {model_dir} is a file; give a folder (new, or one that holds a model)")
        model_dir.mkdir(parents=True, exist_ok=True)
        save_encoder(self.encoder, model_dir)
        copied = False
        if self.source_dir is not None and (self.source_dir / "tokenizer.json").is_file():
            for name in TOKENIZER_FILES:
                source = self.source_dir / name
                if source.is_file() and source.resolve() != (model_dir / name).resolve():
                    files.copy_file(source, model_dir / name)
            copied = True
        if not copied:
            files.write_text(model_dir / "tokenizer.json", self.tokenizer.tokenizer.to_str())
        files.write_json(model_dir / "sentence_bert_config.json",
                         {"max_seq_length": self.max_seq_length, "do_lower_case": self.tokenizer.do_lower_case})
        (model_dir / "1_Pooling").mkdir(exist_ok=True)
        files.write_json(model_dir / "1_Pooling" / "config.json",
                         pooling.pooling_config(self.pooling_modes, self.encoder.config.hidden_size))
        modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_MODULE},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING_MODULE}]
        if self.normalize:
            (model_dir / "2_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE_MODULE})
        files.write_json(model_dir / "modules.json", modules)
        # sentence-transformers 6 gives a model empty "query" and "document" prompts where its file names none, and
        # its encode_query / encode_document then skip the passage, corpus and default prompts minilm uses: write
        # the two prompts minilm resolves, so that every version encodes queries and documents as minilm does.
        prompts = {"query": self.resolve_prompt(role="query"), "document": self.resolve_prompt(role="document"),
                   **self.prompts}
        settings = {"__version__": {"pytorch": torch.__version__}, "prompts": prompts,
                    "default_prompt_name": self.default_prompt_name, "similarity_fn_name": "cosine"}
        if self.truncate_dim is not None:  # as sentence-transformers writes it: only when set
            settings["truncate_dim"] = self.truncate_dim
        files.write_json(model_dir / ST_CONFIG, settings)
        return model_dir


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, dim] x 2 -> [B, 3 * dim]: concat(u, v, |u - v|), the input of SoftmaxLoss's classifier (losses/softmax.py)
    and of the NLI evaluator that scores it."""
    return torch.cat([u, v, (u - v).abs()], dim=-1)


def length_sorted_batches(lengths: list, batch_size: int, token_budget: bool = True, max_tokens: int = None) -> list:
    """Indices of the sentences of each encode batch, longest sentences first (ties keep input order).

    The first batch is the batch_size longest sentences, so it sets the peak memory. token_budget=False: every
    batch has batch_size sentences. token_budget=True: a batch closes before the sentence that would take it
    past the first batch's token count, or past max_tokens where that is smaller (the first batch too: then it
    holds fewer than batch_size sentences; a sentence longer than max_tokens is a batch of its own), so batches
    of short sentences hold more of them. In the packed layout a batch costs what its tokens cost, so this keeps
    memory bounded and gives the matrix multiplies more rows (the figures are in benchmarks/README.md).
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    if not token_budget:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    budget = sum(lengths[index] for index in order[:batch_size])
    budget = budget if max_tokens is None else min(budget, max_tokens)
    batches, current, tokens = [], [], 0
    for index in order:
        if current and tokens + lengths[index] > budget:
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += lengths[index]
    return batches + [current] if current else batches


def resolve_device(device) -> torch.device:
    """"cpu", "cuda", "cuda:1", a torch.device, or None (CUDA when available) -> a device that exists here, else an
    InputError that says which devices there are (train.py and eval.py check --device with it too)."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a torch device; expected cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: minilm runs on the CPU and CUDA GPUs only (its fast paths are written "
                         f"for those); expected cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: this PyTorch ({torch.__version__}) sees no CUDA device; use cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def load(name_or_path, device=None, max_seq_length=None, backends=None, truncate_dim=None) -> SentenceEncoder:
    """Load a sentence-transformers BERT checkpoint: a local directory or a hub id (see minilm/hub.py).

    device: "cpu", "cuda", ... (None: CUDA when available). max_seq_length: overrides sentence_bert_config.json
    (at most the model's position embeddings). backends: backends forced by name, e.g. {"attention": "math"}
    (None: minilm/fast_paths.py chooses per device and precision; see SentenceEncoder.backends).
    truncate_dim: encode's default size (see SentenceEncoder.truncate_dim); None: the file's, else the whole
    embedding (sentence-transformers' SentenceTransformer(..., truncate_dim=) likewise overrides the file).
    The folder is input: a malformed file, or one minilm cannot follow exactly (modules.json), is an InputError
    (a ValueError) naming the file and the field.
    """
    device = resolve_device(device)
    backends = fast_paths.forced(backends)
    model_dir = resolve_model_dir(name_or_path)
    modules = _read_modules(model_dir)
    settings = _read_st_config(model_dir / ST_CONFIG)
    encoder = load_encoder(model_dir)
    positions = encoder.config.max_position_embeddings
    pooling_modes = ("mean",)
    if POOLING_MODULE in modules:
        pooling_modes = pooling.read_pooling_config(model_dir / modules[POOLING_MODULE] / "config.json",
                                                    encoder.config.hidden_size)
    if max_seq_length is not None and not (_is_int(max_seq_length) and 2 <= max_seq_length <= positions):
        raise InputError(f"max_seq_length={max_seq_length!r}: expected an integer from 2 to {positions} (the "
                         f"model's position embeddings, {model_dir / 'config.json'})")
    tokenizer = SentenceTokenizer.from_dir(model_dir, max_seq_length)
    if tokenizer.max_seq_length > positions:
        raise InputError(f"{model_dir / 'sentence_bert_config.json'}: field 'max_seq_length' is "
                         f"{tokenizer.max_seq_length}, more than the model's {positions} position embeddings "
                         f"({model_dir / 'config.json'}); expected at most {positions}")
    model = SentenceEncoder(encoder, tokenizer, pooling_modes, normalize=NORMALIZE_MODULE in modules,
                            source_dir=model_dir, prompts=settings["prompts"],
                            default_prompt_name=settings["default_prompt_name"])
    if settings["truncate_dim"] is not None:
        try:
            model.truncate_dim = settings["truncate_dim"]
        except InputError as error:
            raise InputError(f"{model_dir / ST_CONFIG}: field 'truncate_dim': {error}") from None
    if truncate_dim is not None:
        model.truncate_dim = truncate_dim
    model.backends = backends
    if not (model_dir / "modules.json").is_file():  # said once it loaded: a folder that is no model gets one error
        log.warning("%s has no modules.json: using mean pooling without normalization", model_dir)
    return model.to(device).eval()


# The modules minilm computes, in the order it computes them: the Transformer, the Pooling, optionally Normalize.
MODULE_ORDER = {"Transformer": TRANSFORMER_MODULE, "Pooling": POOLING_MODULE, "Normalize": NORMALIZE_MODULE}


def _read_modules(model_dir: Path) -> dict:
    """modules.json -> {module type: folder}; a plain transformers checkpoint without one gets mean pooling.

    modules.json is input, and minilm follows it exactly or not at all: Transformer, Pooling and optionally
    Normalize, in that order (Normalize before Pooling computes other embeddings), each folder a plain name inside
    the model folder. Anything else is an InputError naming the module and the field."""
    path = model_dir / "modules.json"
    if not path.is_file():  # (load warns, once the rest has loaded)
        return {TRANSFORMER_MODULE: ""}
    entries = files.read_json(path, "the model's modules", kind=list)
    by_type = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise InputError(f"{path}: module {index} has no field 'type'; expected an object like "
                             '{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}')
        # Newer sentence-transformers name modules by their new package path; match by the class name.
        class_name = entry["type"].rsplit(".", 1)[-1]
        if class_name not in MODULE_ORDER:
            raise InputError(f"{path}: module {index} has type {entry['type']!r}, which minilm does not support "
                             f"(it supports {', '.join(MODULE_ORDER)})")
        if MODULE_ORDER[class_name] in by_type:
            raise InputError(f"{path}: module {index} is a second {class_name} module; expected one of each")
        by_type[MODULE_ORDER[class_name]] = _module_folder(path, index, class_name, entry.get("path", ""))
    order = [kind.rsplit(".", 1)[-1] for kind in by_type]
    if order not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise InputError(f"{path}: the modules are {', '.join(order) or 'none'}; minilm computes Transformer, "
                         "Pooling and optionally Normalize, in that order, and follows no other")
    return by_type


def _module_folder(path: Path, index: int, class_name: str, folder) -> str:
    """A module's field 'path': "" for the Transformer (the model folder itself); for Pooling the name of a
    folder inside the model folder, for Normalize that or "" (it has no files). A name with a separator, "..",
    or a symlink pointing out of the model folder is refused: the folder is input."""
    if not isinstance(folder, str):
        raise InputError(f"{path}: module {index} ({class_name}) field 'path' is {folder!r}; expected a folder name")
    if class_name == "Transformer" or (class_name == "Normalize" and not folder):
        if folder:
            raise InputError(f"{path}: module {index} (Transformer) field 'path' is {folder!r}; minilm reads the "
                             'Transformer from the model folder itself (expected "")')
        return folder
    root = path.parent.resolve()
    plain = folder not in ("", ".", "..") and not any(character in folder for character in "/\\\0")
    if not plain or (path.parent / folder).resolve().parent != root:
        raise InputError(f"{path}: module {index} ({class_name}) field 'path' is {folder!r}; expected the name of "
                         f"a folder inside the model folder (not a path, nor a symlink out of it), e.g. "
                         f"'{1 if class_name == 'Pooling' else 2}_{class_name}'")
    return folder


def _read_st_config(path: Path) -> dict:
    """config_sentence_transformers.json -> {"prompts": {name: text}, "default_prompt_name": None or a name,
    "truncate_dim": None or an int (checked against the model by the caller)}; all empty without the file.
    The file is input: a field of another type is an InputError naming it."""
    settings = files.read_json(path, "sentence-transformers' settings") if path.is_file() else {}
    prompts, default = settings.get("prompts", {}), settings.get("default_prompt_name")
    check_prompts(prompts, default, str(path))
    truncate_dim = settings.get("truncate_dim")
    if truncate_dim is not None and not _is_int(truncate_dim):
        raise InputError(f"{path}: field 'truncate_dim' is {truncate_dim!r}; expected null or a whole number")
    return {"prompts": prompts, "default_prompt_name": default, "truncate_dim": truncate_dim}


def check_prompts(prompts, default_prompt_name, where: str) -> None:
    """Prompts as sentence-transformers keeps them: a dict of name -> text, and a default that is None or one of
    the names. where: the file (or "the model's") for the one-line InputError."""
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        try:
            shown = json.dumps(prompts, default=repr)
        except TypeError:  # a key JSON cannot hold (a tuple): only a Python caller can get here
            shown = repr(prompts)
        raise InputError(f"{where}: field 'prompts' is {shown[:80]}; expected an object of prompt name -> text, "
                         'e.g. {"query": "query: ", "document": "passage: "}')
    if default_prompt_name is not None and (not isinstance(default_prompt_name, str)
                                            or default_prompt_name not in prompts):
        raise InputError(f"{where}: field 'default_prompt_name' is {default_prompt_name!r}; expected null or one "
                         f"of the prompts' names ({', '.join(map(repr, prompts)) or 'there are none'})")


def check_truncate_dim(value, embedding_dim: int) -> int:
    """value if it is an int from 1 to embedding_dim, else an InputError saying so."""
    if not _is_int(value) or not 1 <= value <= embedding_dim:
        raise InputError(f"truncate_dim must be a whole number from 1 to {embedding_dim} (the model's "
                         f"embedding_dim), not {value!r}")
    return int(value)


def _inference_key(encoder: BertEncoder) -> tuple:
    """What encode's inference copy depends on: every module (which object, its class, the class's and any
    instance-level forward, its hooks) and every parameter and buffer (which tensor, its storage, its version:
    an in-place change bumps it). Weak references tell whether the objects are still the same ones: an id is
    only unique among live objects."""
    objects, details = [], []
    for name, module in encoder.named_modules():
        objects.append(module)
        details.append((name, type(module), type(module).forward, module.__dict__.get("forward"),
                        tuple(module._forward_pre_hooks), tuple(module._forward_hooks)))
    for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]:
        objects.append(tensor)
        details.append((name, tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device, tensor.shape))
    return _LiveKey(tuple(id(obj) for obj in objects), tuple(details), [weakref.ref(obj) for obj in objects])


class _LiveKey:
    def __init__(self, ids, details, references):
        self.ids, self.details, self.references = ids, details, references

    def __eq__(self, other) -> bool:
        return (self.ids == other.ids and self.details == other.details
                and all(reference() is not None for reference in self.references))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_encode_arguments(batch_size, normalize, convert_to, show_progress, precision, token_budget) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, not {batch_size!r}")
    if normalize is not None and not isinstance(normalize, bool):
        raise InputError(f"normalize must be None (follow the model), True or False, not {normalize!r}")
    if not isinstance(convert_to, str) or convert_to not in CONVERT_TO:
        raise InputError(f"convert_to must be one of {CONVERT_TO}, not {convert_to!r}")
    if not isinstance(precision, str) or precision not in (*PRECISIONS, fast_paths.AUTO):
        raise InputError(f"precision must be one of {(*PRECISIONS, fast_paths.AUTO)}, not {precision!r}")
    for name, value in (("token_budget", token_budget), ("show_progress", show_progress)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, not {value!r}")


def _check_embeddings(a, b) -> tuple:
    """similarity's arguments -> two float32 matrices [n, dim] of the same dim, else an InputError naming which.
    A 3-d array would otherwise broadcast through the matrix product into a result of no meaning."""
    matrices = []
    for name, value in (("a", a), ("b", b)):
        try:
            value = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"similarity: {name} must be embeddings (a numpy array or tensor of numbers), "
                             f"not {type(value).__name__}") from None
        if value.dim() not in (1, 2):
            raise InputError(f"similarity: {name} has shape {tuple(value.shape)}; expected [dim] or [n, dim]")
        matrices.append(value.unsqueeze(0) if value.dim() == 1 else value)
    if matrices[0].shape[1] != matrices[1].shape[1]:
        raise InputError(f"similarity: a has {matrices[0].shape[1]} dimensions and b {matrices[1].shape[1]}; "
                         "expected the same (embeddings of one model, cut to one truncate_dim)")
    return tuple(matrices)


def _check_texts(texts) -> list:
    """A sequence of strings -> a list of them; anything else is an InputError naming what and where."""
    if isinstance(texts, (str, bytes, bytearray, Mapping, set, frozenset)) or not isinstance(texts, Iterable):
        raise InputError(f"sentences must be a sequence of strings (a list or a tuple; encode also takes one "
                         f"string), not {type(texts).__name__}")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"sentence {index} is {type(text).__name__}, not a string: {text!r:.60}")
    return texts
