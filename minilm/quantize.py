"""int8 inference on the CPU: a Linear with int8 weights and int8 activations, swapped in from outside the model.

`Int8Linear.from_linear(linear)` keeps the weight as int8 with one scale per output channel (symmetric, absmax /
127); at each call it quantizes the activations to int8 with one scale per token (row), multiplies in int32
(VNNI's vpdpbusd on AVX-512 CPUs, through torch's own int8 GEMM) and rescales to float:

    y[t, o] = (sum_i qx[t, i] * qw[o, i]) * sx[t] * sw[o] + b[o]        qx = round(x / sx), sx = max|x[t]| / 127

Per-token scales follow each row's range, so one long or unusual sentence does not coarsen the rest of the batch
(a single per-tensor scale, what torch.ao's dynamic quantization uses, does). The float nn.Linear is the
reference; tests/test_quantize.py holds them close. `quantize_linears(module)` swaps every nn.Linear of a
module (an inference copy: the weights are copies and take no gradients), the way gpt-fast's quantization
rewrites Linears from outside the model.

Which Linears to quantize: the attention's q/k/v projection is the sensitive one (its rounding reaches every
softmax), so `keep_qkv_float` is the policy encode(precision="int8") uses; the STS-B figures of each choice and
the speed against fp32/bf16 are in benchmarks/README.md.
"""

import torch
import torch.nn as nn

from minilm.swap import replace_linears

QMAX = 127  # symmetric int8: -127..127, so that -x quantizes to -q


def quantize_rows(x: torch.Tensor):
    """x: [rows, k] float -> (int8 [rows, k], float32 scales [rows, 1]), one symmetric scale per row.

    Few passes over x (these elementwise passes, not the int8 GEMM, are the cost of int8 here): the row maxima as
    an inf-norm (no |x| temporary), one multiply, rounding in place, the conversion. No clamp is needed:
    |x| <= max|x| maps into [-127, 127] by construction."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).float().clamp_min(1e-8) / QMAX
    return (x * scale.reciprocal()).round_().to(torch.int8), scale  # round_: to nearest even, as torch.round


class Int8Linear(nn.Module):
    """nn.Linear for inference with int8 weights (per output channel) and int8 activations (per token)."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        # [in, out] contiguous: the layout torch._int_mm's CPU kernel reads without a copy
        self.register_buffer("weight_t", weight_int8.t().contiguous())
        self.register_buffer("weight_scale", weight_scale.float())  # [out]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight, scale = quantize_rows(linear.weight.detach().float())  # rows of the weight = output channels
        return cls(weight, scale.squeeze(1), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in] float (or [..., in]) -> [tokens, out] float32, or x's dtype if that is bf16/fp16."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(x2)
        if q.shape[0] <= 16:  # torch._int_mm wants more than 16 rows; pad a few zero rows (they cost nothing)
            q = torch.cat([q, q.new_zeros(17 - q.shape[0], q.shape[1])])
        accumulated = torch._int_mm(q, self.weight_t)[: x2.shape[0]]  # [tokens, out] int32
        out = accumulated.float().mul_(scale)  # per-token scale, then per-channel scale and bias in one pass
        out = torch.addcmul(self.bias, out, self.weight_scale) if self.bias is not None else out.mul_(
            self.weight_scale)
        out = out.to(x.dtype) if x.dtype in (torch.bfloat16, torch.float16) else out
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def keep_qkv_float(name: str, linear: nn.Linear) -> bool:
    """A `skip` for quantize_linears: leave the attention's fused q/k/v projection in float (see the docstring)."""
    return name.endswith("attention.qkv")


def quantize_linears(module: nn.Module, skip=lambda name, linear: False) -> nn.Module:
    """Replace every plain nn.Linear inside `module` (in place) by an Int8Linear, except where skip(name, linear)
    is true; name is the Linear's dotted path in `module`. Returns `module`. encode(precision="int8") runs
    `quantize_linears(copy, skip=keep_qkv_float)` (minilm/fast_paths.py)."""
    return replace_linears(module, Int8Linear.from_linear, skip)
