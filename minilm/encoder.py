"""A hand-written BERT encoder that works on the packed layout, and its safetensors weights.

The encoder never sees padding: `input_ids` is `[total_tokens]`, all sentences end to end, and `cu_seqlens`
(int32, `[batch + 1]`) says where each one starts. Linear layers, LayerNorms and GELUs run on real tokens only;
only attention needs to know where sentences end (see minilm/attention.py; the layout: minilm/packing.py).
`Layer.forward` is the only block forward: fast paths are modules swapped in from outside (minilm/fast_paths.py),
and the attention backend is a name handed down from the model.

Weights are read from a checkpoint's `model.safetensors` with the Hugging Face BERT key names (with or without a
"bert." prefix) through one explicit key map; q, k and v are fused into one Linear, as gpt-fast does.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from minilm import files
from minilm.attention import attention
from minilm.errors import InputError, MissingFileError
from minilm.packing import token_coordinates

# bf16 encode on the CPU runs attention in float32 for batches whose longest sentence is shorter than this.
SHORT_BATCH = 64

# hidden_act -> the activation module (a module, so that it can be swapped like any other piece)
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),  # exact, erf-based: what BERT checkpoints were trained with
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        """Read a transformers `config.json`; keys this encoder does not use are ignored, the ones it uses are
        checked (an error names the file and the field, and says what is accepted)."""
        path = Path(path)
        raw = files.read_json(path, "the BERT settings (a transformers config.json)")
        if raw.get("model_type", "bert") != "bert":
            raise InputError(f"{path}: model_type is {raw['model_type']!r}; minilm encodes BERT checkpoints only")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise InputError(f"{path}: field 'position_embedding_type' is {raw['position_embedding_type']!r}; "
                             "expected 'absolute'")
        missing = [name for name in SIZE_FIELDS if name not in raw]
        if missing:
            raise InputError(f"{path}: missing field {missing[0]!r}; a BERT config.json names all of {SIZE_FIELDS}")
        for name, value in raw.items():
            if name in FIELD_RULES and not FIELD_RULES[name][0](value):
                raise InputError(f"{path}: field {name!r} is {value!r}; expected {FIELD_RULES[name][1]}")
        config = cls(**{name: value for name, value in raw.items() if name in FIELD_RULES})
        if config.hidden_size % config.num_attention_heads:
            raise InputError(f"{path}: field 'hidden_size' {config.hidden_size} is not divisible by "
                             f"'num_attention_heads' {config.num_attention_heads}")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


# The sizes every BERT config.json names (the weights' shapes follow from them).
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings")
# field -> (check, what is accepted)
FIELD_RULES = {
    **{name: (_count, "an integer >= 1") for name in SIZE_FIELDS + ("type_vocab_size",)},
    "layer_norm_eps": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1,
                       "a number between 0 and 1"),
    "hidden_act": (lambda v: isinstance(v, str) and v in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}"),
    "hidden_dropout_prob": (_probability, "a number in [0, 1)"),
    "attention_probs_dropout_prob": (_probability, "a number in [0, 1)"),
}


class Embeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, positions):
        # Sentence embeddings use one segment: token type 0 everywhere, so its row is simply added.
        hidden = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.dropout(self.norm(hidden))  # [total_tokens, hidden]


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # q, k, v stacked on the output axis
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden, cu_seqlens, longest, backend):
        total = hidden.shape[0]
        qkv = self.qkv(hidden)  # [total, 3 * hidden]
        if (qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu" and not torch.is_grad_enabled()
                and longest < SHORT_BATCH):
            # bf16 inference on the CPU, short sentences: torch's CPU attention runs bf16 no faster than float32
            # there, so one cast of the qkv output pays (STS-B test +5%). From 64 tokens bf16 attention is faster
            # than the cast (1.05x at 64, 1.5x at 256 tokens: benchmarks/README.md).
            qkv = qkv.float()
        q, k, v = qkv.view(total, 3, self.heads, self.head_dim).unbind(1)  # 3 x [total, heads, dim]
        dropout_p = self.dropout_p if self.training else 0.0
        context = attention(q, k, v, cu_seqlens, longest, backend=backend, dropout_p=dropout_p)
        return self.out(context.reshape(total, self.heads * self.head_dim).to(hidden.dtype))  # [total, hidden]


class Layer(nn.Module):
    """One post-LayerNorm BERT block: x = norm(x + attn(x)); x = norm(x + ffn(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = ACTIVATIONS[config.hidden_act]()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, cu_seqlens, longest, backend):
        attended = self.attention(hidden, cu_seqlens, longest, backend)
        hidden = self.attention_norm(hidden + self.dropout(attended))
        transformed = self.ffn_out(self.activation(self.ffn_in(hidden)))  # [total, intermediate] -> [total, hidden]
        return self.ffn_norm(hidden + self.dropout(transformed))


class BertEncoder(nn.Module):
    """Token ids of a packed batch -> contextual token embeddings `[total_tokens, hidden]`.

    `pooler` (BERT's CLS dense + tanh head) is kept only to carry its checkpoint weights through a save;
    sentence embeddings never use it.
    """

    def __init__(self, config: BertConfig, with_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if with_pooler else None

    def forward(self, input_ids, cu_seqlens, longest, backend="sdpa"):
        """input_ids: [total_tokens] int64; cu_seqlens: [batch + 1] int32; longest: the longest sentence's length.
        backend: the attention backend (minilm/attention.py), chosen once by the caller. -> [total_tokens, hidden]."""
        _, positions = token_coordinates(cu_seqlens)  # 0, 1, ... restarting at every sentence
        hidden = self.embeddings(input_ids, positions)
        for layer in self.layers:
            hidden = layer(hidden, cu_seqlens, longest, backend)
        return hidden


# --- weights ------------------------------------------------------------------------------------------------

# Checkpoint name (Hugging Face BertModel) -> this encoder's name; "{}" is the layer index.
KEY_MAP = {
    "embeddings.word_embeddings.weight": "embeddings.word.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "encoder.layer.{}.attention.output.dense.weight": "layers.{}.attention.out.weight",
    "encoder.layer.{}.attention.output.dense.bias": "layers.{}.attention.out.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight": "layers.{}.attention_norm.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias": "layers.{}.attention_norm.bias",
    "encoder.layer.{}.intermediate.dense.weight": "layers.{}.ffn_in.weight",
    "encoder.layer.{}.intermediate.dense.bias": "layers.{}.ffn_in.bias",
    "encoder.layer.{}.output.dense.weight": "layers.{}.ffn_out.weight",
    "encoder.layer.{}.output.dense.bias": "layers.{}.ffn_out.bias",
    "encoder.layer.{}.output.LayerNorm.weight": "layers.{}.ffn_norm.weight",
    "encoder.layer.{}.output.LayerNorm.bias": "layers.{}.ffn_norm.bias",
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
}
# q, k, v live as three Linears in the checkpoint and as one fused Linear here.
QKV_PARTS = ("query", "key", "value")
QKV_KEY = "encoder.layer.{}.attention.self.{}.{}"  # layer, part, weight|bias
# A buffer transformers stores but nothing needs: positions are computed from cu_seqlens.
IGNORED_KEYS = {"embeddings.position_ids"}


def checkpoint_state(encoder: BertEncoder) -> dict:
    """The encoder's weights under the checkpoint's names (the inverse of KEY_MAP, q/k/v split again)."""
    ours = encoder.state_dict()
    state = {}
    for layer in range(encoder.config.num_hidden_layers):
        for kind in ("weight", "bias"):
            parts = ours[f"layers.{layer}.attention.qkv.{kind}"].chunk(3, dim=0)
            for part, tensor in zip(QKV_PARTS, parts):
                state[QKV_KEY.format(layer, part, kind)] = tensor
    for theirs, mine in _expanded_key_map(encoder.config.num_hidden_layers).items():
        if mine in ours:
            state[theirs] = ours[mine]
    return {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}


def _expanded_key_map(num_layers: int) -> dict:
    expanded = {}
    for theirs, mine in KEY_MAP.items():
        if "{}" in theirs:
            expanded.update({theirs.format(i): mine.format(i) for i in range(num_layers)})
        else:
            expanded[theirs] = mine
    return expanded


def read_safetensors(path) -> dict:
    """All tensors of a safetensors file, "bert."-prefix removed; a damaged file is an error naming it."""
    path = Path(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as file:
            for key in file.keys():
                tensors[key.removeprefix("bert.")] = file.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"cannot read weights from {path}: the file is damaged or truncated ({error})") from None
    return tensors


def load_encoder(model_dir) -> BertEncoder:
    """Build the encoder from `config.json` and load `model.safetensors` strictly: a missing, unexpected or
    mis-shaped tensor is an error naming the key and the file."""
    model_dir = Path(model_dir)
    config = BertConfig.from_json(model_dir / "config.json")
    weights_path = model_dir / "model.safetensors"
    if not weights_path.is_file():
        found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {', '.join(found)}; minilm reads safetensors only)" if found else ""
        raise MissingFileError(f"no model.safetensors in {model_dir}{hint}")
    tensors = read_safetensors(weights_path)
    for key in IGNORED_KEYS:
        tensors.pop(key, None)

    with_pooler = "pooler.dense.weight" in tensors
    encoder = BertEncoder(config, with_pooler=with_pooler)
    expected = encoder.state_dict()
    state = {}
    # Fuse q, k, v: [3 * hidden, hidden] and [3 * hidden].
    for layer in range(config.num_hidden_layers):
        for kind in ("weight", "bias"):
            names = [QKV_KEY.format(layer, part, kind) for part in QKV_PARTS]
            missing = [name for name in names if name not in tensors]
            if missing:
                raise InputError(f"{weights_path}: missing tensor {missing[0]!r}")
            state[f"layers.{layer}.attention.qkv.{kind}"] = torch.cat([tensors.pop(name) for name in names])
    for theirs, mine in _expanded_key_map(config.num_hidden_layers).items():
        if mine not in expected:
            continue  # the pooler of a checkpoint saved without one
        if theirs not in tensors:
            raise InputError(f"{weights_path}: missing tensor {theirs!r}")
        state[mine] = tensors.pop(theirs)
    if tensors:
        raise InputError(f"{weights_path}: unexpected tensor(s) {sorted(tensors)[:5]} for a "
                         f"{config.num_hidden_layers}-layer BERT (see {model_dir / 'config.json'})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise InputError(f"{weights_path}: tensor for {name!r} has shape {tuple(tensor.shape)}, "
                             f"config.json implies {tuple(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise InputError(f"{weights_path}: tensor for {name!r} is {tensor.dtype}; expected floating point")
        if not torch.isfinite(tensor).all():
            raise InputError(f"{weights_path}: tensor for {name!r} holds NaN or infinite values; refusing to load it")
    encoder.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=True)
    return encoder


def save_encoder(encoder: BertEncoder, model_dir) -> None:
    """Write `model.safetensors` (checkpoint names) and `config.json` so transformers' BertModel loads it."""
    model_dir = Path(model_dir)
    # float32 whatever the model was cast to (.half()): minilm loads every checkpoint in float32, while transformers
    # and sentence-transformers compute in the file's dtype, so a float16 file would give them other embeddings.
    state = {key: tensor.float() for key, tensor in checkpoint_state(encoder).items()}
    files.save_tensors(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        **{f.name: getattr(encoder.config, f.name) for f in fields(BertConfig)},
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "initializer_range": 0.02,
    }
    files.write_json(model_dir / "config.json", config)


def flops_per_token(config: BertConfig, seqlen: int) -> int:
    """Forward FLOPs per token: 2 per multiply-add of the Linears, plus attention's q k^T and p v."""
    hidden, inter = config.hidden_size, config.intermediate_size
    linear = 2 * (3 * hidden * hidden + hidden * hidden + 2 * hidden * inter)
    attention_flops = 2 * 2 * seqlen * hidden
    return config.num_hidden_layers * (linear + attention_flops)
