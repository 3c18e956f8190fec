"""CPU inference fast path: nn.Linear through oneDNN with the weight prepacked once, as a swappable module.

torch's CPU `F.linear` re-lays out the weight for the GEMM kernel at every call; with the few hundred tokens of
an encode batch that costs as much as a good part of the multiply itself. oneDNN (bundled with torch) can take
the weight prepacked once into its own blocked layout, and can apply GELU inside the matmul instead of in a
separate pass over the output (benchmarks/README.md has the figures).

`use_onednn(encoder)` swaps the Linears of an inference copy from outside the model (minilm/swap.py, as gpt-fast's
quantize.py rewrites Linears): `Layer.forward` stays the only block forward. Inference only: the prepacked weights are
copies, take no gradients and go stale when the weights change, so `SentenceEncoder.encode` applies this to its
private copy of the encoder and rebuilds that copy on any change. nn.Linear is the reference; tests hold the two
equal. The ops are torch's own (the ones torch.compile emits for CPU inference), reached through `torch.ops`.

oneDNN builds a primitive for every input shape (JIT-compiled code) and keeps a few in a cache (below). With AMX a
bf16 primitive takes ~5 ms to build, longer than the whole product it runs for a batch of ~1,000 tokens (0.9 ms),
and encode's batches have as many token counts as batches: on STS-B test (2,758 sentences, 31 batches, 16 token
counts) bf16 encode spent 20% of its time building primitives. So in bf16/fp16 the rows are padded to a multiple
of ROW_BLOCK (zero rows; their outputs are dropped): batches filled to the same token budget then share one shape,
and the 16 token counts become 3. Not in fp32, whose primitives build in ~1.7 ms: there the copy cost more (-3%)
than it saved (figures in benchmarks/README.md, "Speed on the CPU at hand").
"""

import os

import torch
import torch.nn as nn

from minilm.swap import is_plain, replace_linears

# oneDNN creates a primitive (JIT-compiled code, ~0.1 ms) for every distinct input shape and keeps it in two LRU
# caches of 1,024 entries each: oneDNN's own and ideep's (torch's C++ wrapper around it). A packed batch has as
# many shapes as token totals, so a long encode kept growing: +350 MB of RSS over 40,000 short texts, still rising
# (benchmarks/README.md, "Corpus encoding"); bounding only one of the two caches did not stop it. Both are read
# once, when oneDNN first runs: minilm/__init__.py imports this module first so that these are in place by then.
# Rebuilding a primitive costs ~0.1 ms against ~100 ms for a batch. A value set by the user wins.
PRIMITIVE_CACHE_CAPACITY = "64"
for _variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_variable, PRIMITIVE_CACHE_CAPACITY)
ROW_BLOCK = 32  # rows of a oneDNN product are padded to a multiple of this: few shapes, few primitives to build


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [rows, k] -> [rows rounded up to a multiple of ROW_BLOCK, k], zero rows appended (x itself if none)."""
    missing = -x.shape[0] % ROW_BLOCK
    return x if missing == 0 else torch.cat([x, x.new_zeros(missing, x.shape[1])])


# What oneDNN's bf16 and fp16 Linears need of an x86 CPU (torch's own check: _is_mkldnn_bf16_supported / _fp16_).
# Without it, oneDNN refuses to prepack the weights: AVX2-only CPUs run these precisions through plain nn.Linear.
NEEDS = {torch.bfloat16: "avx512bw or avx_ne_convert", torch.float16: "avx512_fp16 or avx_ne_convert"}


def available(device, dtype) -> bool:
    """oneDNN prepacked linears can run here: a CPU torch build with oneDNN and, for bf16/fp16, CPU support (NEEDS)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        ops._linear_pointwise, ops._reorder_linear_weight  # noqa: B018  (raise if this build lacks them)
        if dtype == torch.bfloat16:
            return bool(ops._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(ops._is_mkldnn_fp16_supported())
        return dtype == torch.float32
    except (AttributeError, RuntimeError):
        return False


class OneDNNLinear(nn.Module):
    """`activation(linear(x))` with the weight prepacked once for oneDNN; activation None, nn.GELU or nn.ReLU.

    x: [tokens, in_features] -> [tokens, out_features], in the weight's dtype. The prepacked weight is a plain
    attribute, not a buffer: it cannot be moved or saved, only rebuilt from the nn.Linear."""

    def __init__(self, linear: nn.Linear, activation: nn.Module = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)  # any number of tokens
        self.bias = linear.bias.detach() if linear.bias is not None else None
        if activation is None:
            self.post_op, self.algorithm = "none", ""
        elif isinstance(activation, nn.GELU):
            self.post_op, self.algorithm = "gelu", activation.approximate  # "none" (erf) or "tanh"
        else:
            self.post_op, self.algorithm = "relu", ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        padded = rows if self.weight.dtype == torch.float32 else pad_rows(rows)
        out = torch.ops.mkldnn._linear_pointwise(padded, self.weight, self.bias, self.post_op, [], self.algorithm)
        return out[: rows.shape[0]].reshape(*x.shape[:-1], self.out_features)  # the padding rows dropped

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.post_op}"


def use_onednn(encoder: nn.Module) -> nn.Module:
    """Swap the plain nn.Linear layers of an inference copy for OneDNNLinear, in place.

    Where a block's `ffn_in` is a plain Linear and its `activation` a plain nn.GELU or nn.ReLU, the activation
    moves into the matmul: `ffn_in` becomes Linear+activation and `activation` nn.Identity. A module the user
    replaced, subclassed, patched or hooked is left as it is (see minilm/swap.py)."""
    for block in encoder.modules():
        ffn_in, activation = getattr(block, "ffn_in", None), getattr(block, "activation", None)
        if is_plain(ffn_in, nn.Linear) and any(is_plain(activation, kind) for kind in (nn.GELU, nn.ReLU)):
            block.ffn_in, block.activation = OneDNNLinear(ffn_in, activation), nn.Identity()
    return replace_linears(encoder, OneDNNLinear)
