"""int8 inference on the CPU: a Linear with int8 weights and int8 activations, swapped in from outside the model.

`Int8Linear.from_linear(linear)` keeps the weight as int8 with one scale per output channel (symmetric, absmax /
127); at each call it quantizes the activations to int8 with one scale per token (row), multiplies in int32
(oneDNN's int8 linear on AMX, torch._int_mm elsewhere: VNNI where the CPU has it) and rescales to float:

    y[t, o] = (sum_i qx[t, i] * qw[o, i]) * sx[t] * sw[o] + b[o]        qx = round(x / sx), sx = max|x[t]| / 127

Per-token scales follow each row's range, so one long or unusual sentence does not coarsen the rest of the batch
(a single per-tensor scale, what torch.ao's dynamic quantization uses, does). The float nn.Linear is the
reference; tests/test_quantize.py holds them close. `quantize_linears(module)` swaps every nn.Linear of a
module (an inference copy: the weights are copies and take no gradients), the way gpt-fast's quantization
rewrites Linears from outside the model.

On a CPU without VNNI or AMX the int8 matrix multiply adds pairs of products in 16 bits and saturates with
full-range weights (minilm/cpu.py, int8_sums_saturate): there the weights are kept within +-64
(WEIGHT_QMAX_SATURATING), exact again at twice the weight step, logged once. int8 is also many times slower than
fp32 on such a CPU (encode warns with the factor); precision="auto" never picks it there.

Which Linears to quantize: the attention's q/k/v projection is the sensitive one (its rounding reaches every
softmax), so `keep_qkv_float` is the policy encode(precision="int8") uses; the STS-B figures of each choice and
the speed against fp32/bf16 are in benchmarks/README.md.
"""

import functools
import logging

import torch
import torch.nn as nn

from minilm import cpu
from minilm.swap import replace_linears

QMAX = 127  # symmetric int8: -127..127, so that -x quantizes to -q
# The weights' range where int8 products are summed in 16 bits (see the docstring): activations enter those
# kernels shifted to unsigned (0..255), and 255 * 64 * 2 = 32,640 fits in an int16 where 255 * 127 * 2 does not.
WEIGHT_QMAX_SATURATING = 64

log = logging.getLogger(__name__)


def quantize_rows(x: torch.Tensor, qmax: int = QMAX):
    """x: [rows, k] float -> (int8 [rows, k] within +-qmax, float32 scales [rows, 1]), one symmetric scale per row.

    Few passes over x (these elementwise passes, not the int8 GEMM, are the cost of int8 here): the row maxima of x
    and of -x (two reductions that write nothing: 4x faster than an inf-norm, whose kernel is not vectorized), one
    multiply, rounding in place, the conversion. No clamp is needed: |x| <= max|x| maps into [-qmax, qmax] by
    construction."""
    largest = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg_())  # max |x[t]|, [rows, 1]
    scale = largest.float().clamp_min_(1e-8).div_(qmax)
    return (x * scale.reciprocal()).round_().to(torch.int8), scale  # round_: to nearest even, as torch.round


def int8_linear_reference(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias):
    """The arithmetic of Int8Linear in plain eager torch ops: the reference its fast path is held to.

    x: [rows, in] float; weight_t: int8 [in, out]; weight_scale: [out]; bias: [out] or None -> [rows, out] float32:
    y[t, o] = (sum_i qx[t, i] * qw[o, i]) * sx[t] * sw[o] + b[o]."""
    q, scale = quantize_rows(x)
    if q.shape[0] <= 16:  # torch._int_mm wants more than 16 rows; pad a few zero rows (they cost nothing)
        q = torch.cat([q, q.new_zeros(17 - q.shape[0], q.shape[1])])
    accumulated = torch._int_mm(q, weight_t)[: x.shape[0]]  # [rows, out] int32
    out = accumulated.float().mul_(scale)  # per-token scale, then per-channel scale and bias in one pass
    return torch.addcmul(bias, out, weight_scale) if bias is not None else out.mul_(weight_scale)


class Int8Linear(nn.Module):
    """nn.Linear for inference with int8 weights (per output channel) and int8 activations (per token).

    The int8 product runs in oneDNN's int8 linear (torch.ops.onednn, the op torch's x86 inductor quantizer emits)
    with the weight prepacked once and its per-channel scale applied inside the GEMM; what stays outside is the
    per-token quantization of the input and one multiply-add for the per-token scale and the bias (oneDNN takes one
    activation scale per call, and one per call would cost quality: benchmarks/README.md). On AMX that is 2x the
    throughput of torch._int_mm, which re-lays out its weight at every call. Where this torch has no oneDNN int8
    linear, the forward is `int8_linear_reference` (torch._int_mm). compile_quantization=True runs the per-token
    quantization as one compiled pass (torch.compile, ~2-4 s once per process; eager where compiling fails, logged
    once): 2x faster than the eager passes, +11% on an int8 encode, worth it for long runs only.
    The prepacked weight is a plain attribute, not a buffer: it cannot be moved or saved, only rebuilt."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias, compile_quantization=False):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        # [in, out] contiguous: the layout torch._int_mm's CPU kernel reads without a copy (the reference path)
        self.register_buffer("weight_t", weight_int8.t().contiguous())
        self.register_buffer("weight_scale", weight_scale.float())  # [out]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.packed = _prepack(weight_int8)  # None: no oneDNN int8 linear here
        self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)  # symmetric: all zero
        self.quantize = compiled_quantize_rows() if compile_quantization else quantize_rows

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, compile_quantization=False) -> "Int8Linear":
        qmax = weight_qmax(linear.weight.device)
        weight, scale = quantize_rows(linear.weight.detach().float(), qmax)  # rows of the weight = output channels
        return cls(weight, scale.squeeze(1), linear.bias, compile_quantization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in] float (or [..., in]) -> [tokens, out] float32, or x's dtype if that is bf16/fp16."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.packed is None:
            out = int8_linear_reference(x2, self.weight_t, self.weight_scale, self.bias)
        else:
            q, scale = self.quantize(x2)  # [tokens, in] int8, [tokens, 1]
            # [tokens, out] float32 = (q @ qw^T) * sw: x's scale is 1 here, the per-token one follows
            out = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, self.packed, self.weight_scale, self.zero_points,
                                                     None, 1.0, 0, torch.float32, "none", [], "")
            out = torch.addcmul(self.bias, out, scale) if self.bias is not None else out.mul_(scale)
        out = out.to(x.dtype) if x.dtype in (torch.bfloat16, torch.float16) else out
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def weight_qmax(device) -> int:
    """The largest |int8 weight| on `device`: QMAX, or WEIGHT_QMAX_SATURATING on a CPU whose int8 products are
    summed in 16 bits (said once: int8 is coarser there)."""
    if torch.device(device).type != "cpu" or not cpu.int8_sums_saturate():
        return QMAX
    _log_once(f"int8 on this CPU: weights are quantized to +-{WEIGHT_QMAX_SATURATING}, not +-{QMAX}: without "
              f"{'/'.join(cpu.NATIVE['int8'])} its int8 matrix multiply adds pairs of products in 16 bits, which "
              "full-range weights overflow (wrong embeddings); the coarser weights cost some accuracy")
    return WEIGHT_QMAX_SATURATING


def _prepack(weight_int8: torch.Tensor):
    """The weight in oneDNN's blocked int8 layout, or None where Int8Linear runs torch._int_mm instead."""
    if not cpu.onednn_int8_runs_here() or weight_int8.device.type != "cpu":
        return None
    try:
        return torch.ops.onednn.qlinear_prepack(weight_int8, None)
    except RuntimeError as error:
        _log_once(f"oneDNN's int8 linear is unavailable ({error}): Int8Linear runs torch._int_mm")
        return None


@functools.cache
def compiled_quantize_rows():
    """quantize_rows as one compiled pass, shared by every Int8Linear that asks for it (one compile per process)."""
    return _CompiledOnce(quantize_rows)


class _CompiledOnce:
    """A function compiled with torch.compile on its first call (dynamic shapes: one compile for every number of
    tokens); the eager function where compiling fails (no C++ compiler, an unsupported platform) or where the
    compiled code's first result is not the eager function's, bit for bit, logged once. The second guards
    against wrong code: torch 2.13's inductor, generating AVX2 code for one thread, computes quantize_rows's
    scales wrong (seen with ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1)."""

    def __init__(self, function):
        self.function, self.compiled, self.checked = function, None, False

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.function, dynamic=True)
        try:
            result = self.compiled(*args)
        except Exception as error:  # noqa: BLE001  (inductor raises many kinds; the eager function is the same maths)
            if self.compiled is self.function:
                raise
            return self._eager(f"torch.compile failed for {self.function.__name__} ({type(error).__name__}: "
                               f"{str(error)[:200]}): it runs eagerly", args)
        if not self.checked:
            self.checked = True
            if not all(map(torch.equal, result, self.function(*args))):
                return self._eager(f"torch.compile's {self.function.__name__} differs from the eager function on "
                                   "this CPU (a code generation bug): it runs eagerly", args)
        return result

    def _eager(self, message: str, args):
        _log_once(message)
        self.compiled = self.function
        return self.function(*args)


_logged = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def keep_qkv_float(name: str, linear: nn.Linear) -> bool:
    """A `skip` for quantize_linears: leave the attention's fused q/k/v projection in float (see the docstring)."""
    return name.endswith("attention.qkv")


def quantize_linears(module: nn.Module, skip=lambda name, linear: False) -> nn.Module:
    """Replace every plain nn.Linear inside `module` (in place) by an Int8Linear, except where skip(name, linear)
    is true; name is the Linear's dotted path in `module`. Returns `module`. encode(precision="int8") runs
    `quantize_linears(copy, skip=keep_qkv_float)` (minilm/fast_paths.py)."""
    return replace_linears(module, Int8Linear.from_linear, skip)
