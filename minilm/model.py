"""SentenceEncoder: tokenizer + BERT encoder + pooling (+ Normalize), with encode, similarity and save.

A sentence-transformers checkpoint directory holds exactly these pieces: `modules.json` lists a Transformer,
a Pooling (`1_Pooling/config.json`) and optionally Normalize; `sentence_bert_config.json` gives max_seq_length.
`save` writes the same layout back, so sentence-transformers and transformers load what minilm trained.
"""

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm import pooling
from minilm.encoder import BertEncoder, load_encoder, save_encoder
from minilm.hub import resolve_model_dir
from minilm.tokenizer import SentenceTokenizer, pack

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"
POOLING_MODULE = "sentence_transformers.models.Pooling"
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def batch_to(batch: dict, device) -> dict:
    """Move a packed batch's tensors to `device`."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


class SentenceEncoder(nn.Module):
    """Texts -> sentence embeddings. `model(batch)` is the differentiable path for training;
    `model.encode(texts)` is the batched, no-grad path for inference."""

    def __init__(self, encoder: BertEncoder, tokenizer: SentenceTokenizer, pooling_modes=("mean",),
                 normalize=False, source_dir=None):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling_modes = tuple(pooling_modes)
        self.normalize = normalize
        self.source_dir = Path(source_dir) if source_dir else None
        # encode on the CPU through oneDNN with packed weights (minilm/packed.py); False: plain nn.Linear.
        self.packed_cpu_inference = True
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
        if value > self.encoder.config.max_position_embeddings:
            raise ValueError(f"max_seq_length {value} exceeds the model's "
                             f"{self.encoder.config.max_position_embeddings} position embeddings")
        self.tokenizer.max_seq_length = value

    @property
    def attention_backend(self):
        return self.encoder.attention_backend

    @attention_backend.setter
    def attention_backend(self, backend) -> None:
        self.encoder.attention_backend = backend

    # --- forward ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: list) -> dict:
        """Texts -> packed batch on the CPU: input_ids [total_tokens], cu_seqlens [batch + 1], max_seqlen."""
        return self.tokenizer(_check_texts(texts))

    def forward(self, batch: dict, normalize=None, encoder=None) -> torch.Tensor:
        """Packed batch (on the model's device) -> sentence embeddings [batch, embedding_dim].

        encoder: another copy of the encoder to run (encode's low-precision copy); pooling is always float32."""
        encoder = self.encoder if encoder is None else encoder
        tokens = encoder(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"])  # [total, hidden]
        normalize = self.normalize if normalize is None else normalize
        tokens = tokens.float()  # a no-op unless encode's copy ran in bf16/fp16
        return pooling.pool(tokens, batch["cu_seqlens"], self.pooling_modes, normalize)

    def _encoder_in(self, dtype):
        """The encoder to run `encode` with: weights in `dtype` (None: float32), packed for oneDNN on the CPU.

        A private inference copy, made when it pays: to cast the weights once (autocast would cast every
        activation, and under inference_mode every weight, at every call) and to pack them for oneDNN
        (minilm/packed.py). One copy is kept per precision asked for, so that switching between them costs
        nothing; a copy is rebuilt when any parameter has been replaced or changed in place since it was made
        (an optimizer step bumps a tensor's version). Without either reason, or with
        `packed_cpu_inference = False`, encode runs the encoder itself."""
        from minilm import packed

        pack = self.packed_cpu_inference and packed.available(self.device, dtype or torch.float32)
        if dtype is None and not pack:
            return self.encoder
        kind = (dtype, pack, self.encoder.attention_backend)
        weights = tuple((p.data_ptr(), p._version) for p in self.encoder.parameters())
        copies = self.__dict__.setdefault("_inference_copies", {})  # kind -> (weights, copy); not a submodule
        if kind not in copies or copies[kind][0] != weights:
            copies.pop(kind, None)  # free the stale copy before making the new one
            copy = BertEncoder(self.encoder.config, with_pooler=False).to(self.device, dtype or torch.float32)
            state = {name: value for name, value in self.encoder.state_dict().items()
                     if not name.startswith("pooler.")}
            copy.load_state_dict(state)  # load_state_dict casts to the copy's dtype
            copy.attention_backend = self.encoder.attention_backend
            copy.eval()
            if pack:
                for layer in copy.layers:
                    layer.pack()
            copies[kind] = (weights, copy)
        return copies[kind][1]

    @torch.inference_mode()
    def encode(self, sentences, batch_size=32, normalize=None, convert_to="numpy", show_progress=False,
               precision="fp32", token_budget=True):
        """Embed sentences in batches of similar length, returned in the input order.

        sentences: a string or a list of strings. normalize: None follows the model (Normalize in modules.json),
        True/False forces it. convert_to: "numpy" (float32 ndarray) or "tensor" (float32 on the model's device).
        precision: "fp32", or "bf16"/"fp16" to run the encoder on a copy with weights in that type (bf16 pays on
        CPUs with AVX-512 bf16 or AMX). Pooling and the returned embeddings stay float32.
        batch_size and token_budget: sentences are encoded longest first, and the first batch holds the
        batch_size longest. With token_budget (the default), each later batch takes as many of the shorter
        sentences as fit in that first batch's number of tokens: peak memory stays that of batch_size
        sentences, the matrix multiplies get more rows, and the embeddings are the same (to float rounding,
        ~1e-7). token_budget=False: exactly batch_size sentences per forward pass.
        Returns [n, embedding_dim], or [embedding_dim] for a single string. Text past max_seq_length is truncated.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        if convert_to not in ("numpy", "tensor"):
            raise ValueError(f"convert_to must be 'numpy' or 'tensor', not {convert_to!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        single = isinstance(sentences, str)
        texts = _check_texts([sentences] if single else sentences)
        was_training = self.training
        self.eval()
        id_lists = self.tokenizer.encode_ids(texts)
        batches = length_sorted_batches([len(ids) for ids in id_lists], batch_size, token_budget)
        output = torch.empty(len(texts), self.embedding_dim, dtype=torch.float32, device=self.device)
        if show_progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        encoder = self._encoder_in(PRECISIONS[precision])
        for indices in batches:
            batch = batch_to(pack([id_lists[i] for i in indices]), self.device)
            output[torch.tensor(indices, device=self.device)] = self(batch, normalize, encoder)
        self.train(was_training)
        if single:
            output = output[0]
        return output.cpu().numpy() if convert_to == "numpy" else output

    @staticmethod
    def similarity(a, b) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)] of two embedding arrays (numpy or torch, 1-d or 2-d)."""
        a, b = (torch.as_tensor(x, dtype=torch.float32) for x in (a, b))
        a, b = (x.unsqueeze(0) if x.dim() == 1 else x for x in (a, b))
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    # --- files -----------------------------------------------------------------------------------------------
    def save(self, model_dir) -> Path:
        """Write the sentence-transformers layout: weights, configs, tokenizer files, modules.json."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        save_encoder(self.encoder, model_dir)
        copied = False
        if self.source_dir is not None and (self.source_dir / "tokenizer.json").is_file():
            for name in TOKENIZER_FILES:
                source = self.source_dir / name
                if source.is_file() and source.resolve() != (model_dir / name).resolve():
                    shutil.copyfile(source, model_dir / name)
            copied = True
        if not copied:
            (model_dir / "tokenizer.json").write_text(self.tokenizer.tokenizer.to_str())
        _write_json(model_dir / "sentence_bert_config.json",
                    {"max_seq_length": self.max_seq_length, "do_lower_case": self.tokenizer.do_lower_case})
        (model_dir / "1_Pooling").mkdir(exist_ok=True)
        _write_json(model_dir / "1_Pooling" / "config.json",
                    pooling.pooling_config(self.pooling_modes, self.encoder.config.hidden_size))
        modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_MODULE},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING_MODULE}]
        if self.normalize:
            (model_dir / "2_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE_MODULE})
        _write_json(model_dir / "modules.json", modules)
        _write_json(model_dir / "config_sentence_transformers.json",
                    {"__version__": {"pytorch": torch.__version__}, "prompts": {}, "default_prompt_name": None,
                     "similarity_fn_name": "cosine"})
        return model_dir


def length_sorted_batches(lengths: list, batch_size: int, token_budget: bool = True) -> list:
    """Indices of the sentences of each encode batch, longest sentences first (ties keep input order).

    The first batch is the batch_size longest sentences, so it sets the peak memory. token_budget=False: every
    batch has batch_size sentences. token_budget=True: a batch closes before the sentence that would take it
    past the first batch's token count, so batches of short sentences hold more of them. In the packed layout
    a batch costs what its tokens cost, so this keeps memory bounded and gives the matrix multiplies more rows
    (on the STS-B test sentences, ~6% more sentences/s on a 2-core CPU; see benchmarks/README.md).
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    if not token_budget:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    budget = sum(lengths[index] for index in order[:batch_size])
    batches, current, tokens = [], [], 0
    for index in order:
        if current and tokens + lengths[index] > budget:
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += lengths[index]
    return batches + [current] if current else batches


def load(name_or_path, device=None, max_seq_length=None, attention_backend=None) -> SentenceEncoder:
    """Load a sentence-transformers BERT checkpoint: a local directory or a hub id (see minilm/hub.py).

    device: "cpu", "cuda", ... (None: CUDA when available). max_seq_length: overrides sentence_bert_config.json.
    attention_backend: "math", "sdpa" or "triton" (None: chosen per device).
    """
    model_dir = resolve_model_dir(name_or_path)
    modules = _read_modules(model_dir)
    pooling_modes = ("mean",)
    if POOLING_MODULE in modules:
        pooling_modes = pooling.read_pooling_config(model_dir / modules[POOLING_MODULE] / "config.json")
    unknown = set(modules) - {TRANSFORMER_MODULE, POOLING_MODULE, NORMALIZE_MODULE}
    if unknown:
        raise ValueError(f"{model_dir / 'modules.json'}: modules {sorted(unknown)} are not supported by minilm "
                         "(it supports Transformer, Pooling and Normalize)")
    encoder = load_encoder(model_dir)
    tokenizer = SentenceTokenizer.from_dir(model_dir, max_seq_length)
    model = SentenceEncoder(encoder, tokenizer, pooling_modes, normalize=NORMALIZE_MODULE in modules,
                            source_dir=model_dir)
    if model.max_seq_length > encoder.config.max_position_embeddings:
        model.max_seq_length = encoder.config.max_position_embeddings
    model.attention_backend = attention_backend
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def _read_modules(model_dir: Path) -> dict:
    """modules.json -> {module type: path}; a plain transformers checkpoint without one gets mean pooling."""
    path = model_dir / "modules.json"
    if not path.is_file():
        log.warning("%s has no modules.json: using mean pooling without normalization", model_dir)
        return {TRANSFORMER_MODULE: ""}
    entries = json.loads(path.read_text())
    # Newer sentence-transformers name modules by their new package path; match by the class name.
    by_type = {}
    for entry in entries:
        class_name = entry["type"].rsplit(".", 1)[-1]
        known = {TRANSFORMER_MODULE: "Transformer", POOLING_MODULE: "Pooling", NORMALIZE_MODULE: "Normalize"}
        kind = next((full for full, short in known.items() if short == class_name), entry["type"])
        by_type[kind] = entry.get("path", "")
    return by_type


def _check_texts(texts) -> list:
    if isinstance(texts, str) or not hasattr(texts, "__iter__"):
        raise TypeError(f"expected a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"sentence {index} is {type(text).__name__}, not a string: {text!r:.60}")
    return texts


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")

