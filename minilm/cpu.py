"""What this CPU can do, decided once per process, and the precision that encodes fastest on it.

    describe_cpu()       -> CPU: vendor, model name, the instruction sets that matter, oneDNN's bf16/fp16 support
    choose_precision()   -> Choice("bf16", "auto -> bf16: amx_bf16, ..."): what precision="auto" runs
    gemm_rates()         -> {precision: G(FL)OP/s} of one encoder layer's Linears, measured once (0.1-0.3 s)
    slowdown(precision)  -> how many times slower than fp32 that precision's GEMMs run here (1.0: not slower)
    slow_precision_warning(precision) -> the warning an explicit slow precision gives once, or None
    warn_if_slow(precision)  -> log that warning once (encode for its precision, train.py for --precision)
    int8_sums_saturate()     -> True where int8 products are summed in 16 bits (no VNNI/AMX): see below

The instruction sets decide where they can: without AVX-512 bf16 / AMX, torch's bf16 matrix multiply falls back
to code ~70x slower than fp32 (an AMD EPYC with AVX2 only: bf16 84 and int8 21 sentences/s against fp32 487), and
without VNNI / AMX so does int8; with AMX, bf16 runs ~8x fp32 and encodes fastest (int8's GEMM is faster still,
but int8 keeps the attention, LayerNorms and residual adds in float32 and quantizes every Linear's input, which
costs more than its GEMM saves over bf16: benchmarks/README.md, "Speed on the CPU at hand"; the same on an AMD
EPYC with AVX-512 bf16 + VNNI, so wherever bf16 qualifies it wins over int8). Where they cannot
(AVX-512 bf16 and VNNI without AMX: AMD Zen 4/5, Intel Cooper Lake; VNNI without bf16), a short probe times the
GEMMs the encoder really runs - one BERT layer's four Linears, [1024 tokens, 384] x [384, 1152 / 384 / 1536] and
[1024, 1536] x [1536, 384] - through the ops encode uses: oneDNN with prepacked weights for fp32/bf16/fp16
(minilm/onednn.py) and, for int8, oneDNN's int8 linear on AMX, else torch._int_mm (minilm/quantize.py). A
precision that is slow here is timed on one small product only, so the probe stays short on every CPU. The same
probe gives the measured factor of the warning an explicit slow precision gives, and bench_encode.py's ceiling.
Only AMX vouches for a precision without it: AVX-512 bf16 need not beat fp32 (oneDNN held to AVX512_CORE_BF16 on a
Xeon with AMX: bf16 GEMM 1.8x slower than fp32, encode 0.58x), so an explicit bf16, fp16 or int8 is probed there.

oneDNN can be held to an older instruction set ($ONEDNN_MAX_CPU_ISA=AVX2, =AVX512_CORE, ...: how a machine with
AVX-512 VNNI or AMX shows what a CPU without them does); describe_cpu() then reports only the instruction sets
oneDNN may use, since every fast matrix multiply of encode runs in oneDNN.

Without VNNI or AMX, int8 matrix multiplies (oneDNN's and torch._int_mm) add each pair of products in 16 bits
with saturation (vpmaddubsw, the activations shifted by +128 to unsigned): with full-range int8 weights the sums
overflow and the results are wrong (an Int8Linear's error 0.15 instead of 0.009). int8_sums_saturate() finds it
by multiplying the largest values once; minilm/quantize.py then keeps int8 weights within +-64, where
255 * 64 * 2 = 32,640 fits in 16 bits.

Which precisions `auto` may pick: those whose quality was measured within the bands of issue 22 (STS-B test
Spearman within 0.002 of fp32, SciFact NDCG@10 within 0.003; benchmarks/README.md): bf16 (+0.0002 / +0.0007) and
int8 (-0.0007 / +0.0042, a gain). fp16 has no such figures on the CPU and is never picked. fp32 stays the default
of encode (exact parity); `auto` is asked for by name.

This module imports nothing of minilm but its errors, so that every other module can ask it.
"""

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minilm.errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
# The instruction sets that make each precision fast, in the order they are named in reasons and warnings.
NATIVE = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16"),
          "int8": ("amx_int8", "avx512_vnni", "avx_vnni")}
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
         "amx_fp16")
# $ONEDNN_MAX_CPU_ISA (or $DNNL_MAX_CPU_ISA) -> the FLAGS oneDNN may use under it, from oneDNN's dnnl_cpu_isa_t
# (each level includes the ones below it; AVX-512 does not include AVX-VNNI, AVX10.1 does). Unset, DEFAULT or ALL:
# all of them.
_AVX2, _AVX512 = ("avx2",), ("avx2", "avx512f")
_AVX10 = (*_AVX512, "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni")
ONEDNN_ISA_FLAGS = {
    "SSE41": (), "AVX": (), "AVX2": _AVX2, "AVX2_VNNI": (*_AVX2, "avx_vnni"), "AVX2_VNNI_2": (*_AVX2, "avx_vnni"),
    "AVX512_CORE": _AVX512, "AVX512_CORE_VNNI": (*_AVX512, "avx512_vnni"),
    "AVX512_CORE_BF16": (*_AVX512, "avx512_vnni", "avx512_bf16"), "AVX10_1_512": _AVX10, "AVX512_CORE_FP16": _AVX10,
    "AVX10_1_512_AMX": (*_AVX10, "amx_bf16", "amx_int8"), "AVX512_CORE_AMX": (*_AVX10, "amx_bf16", "amx_int8"),
    "AVX10_1_512_AMX_FP16": (*_AVX10, "amx_bf16", "amx_int8", "amx_fp16"),
    "AVX512_CORE_AMX_FP16": (*_AVX10, "amx_bf16", "amx_int8", "amx_fp16"),
}

# One encoder layer's Linears for all-MiniLM-L6-v2 (hidden 384, intermediate 1536): (in, out) of q/k/v fused,
# the attention output, the FFN's two. Rows: the tokens of an encode batch (encode's first batch is the 32 longest
# sentences; later ones fill as many tokens): 1,024 sits inside the range of STS-B (~500-1,300) and SciFact (~8,000).
LAYER_SHAPES = ((384, 1152), (384, 384), (384, 1536), (1536, 384))
PROBE_ROWS = 1024
TRIAL_ROWS = 16  # a precision is first tried on [16, 384] x [384, 1536]: ~19 MFLOP, ~20 ms even at 1 GFLOP/s
SLOW = 3.0  # slower than fp32 by more than this on the trial: not timed further (and the benchmark slices it)
WARN_ABOVE = 1.25  # an explicit precision this much slower than fp32 warns: above noise, far below the 5-70x traps
# The least GEMM gain over fp32 that survives what does not speed up. bf16 runs the whole encoder in bf16 (one cast
# in, one out): 1.3x. int8 also quantizes every Linear's input and rescales its output, and keeps the attention,
# LayerNorms and residual adds in float32: measured end to end, int8 encoded 1.75x fp32 where its GEMMs ran ~10x
# (Intel AMX), 1.14x at 5.9x (AMD EPYC, the eager int8 of round 3) and 0.45x at 1.5x (oneDNN held to AVX2, before
# int8 ran _int_mm there; today's: 1.28x at 1.7x, the whole stack held to AVX2, weights at +-64): 3x.
FASTER = {"bf16": 1.3, "int8": 3.0}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CPU:
    vendor: str  # "GenuineIntel", "AuthenticAMD", ... ("" where the OS does not say)
    model: str
    flags: frozenset  # the subset of FLAGS this CPU reports
    torch_capability: str  # torch's vectorized kernels: "AVX512", "AVX2", "DEFAULT", ...
    onednn_bf16: bool  # oneDNN runs bf16 here (torch.ops.mkldnn._is_mkldnn_bf16_supported)
    onednn_fp16: bool
    onednn_cap: str = ""  # $ONEDNN_MAX_CPU_ISA where it holds oneDNN below this CPU ("" where it does not)

    def native(self, precision: str) -> list:
        """The instruction sets this CPU has that make `precision` fast (empty: none; fp32 needs none)."""
        return [flag for flag in NATIVE.get(precision, ()) if flag in self.flags]

    def fast(self, precision: str) -> bool:
        """`precision` has instructions here, and for bf16/fp16 oneDNN runs it (encode's Linears go through it)."""
        supported = {"bf16": self.onednn_bf16, "fp16": self.onednn_fp16}.get(precision, True)
        return precision == "fp32" or bool(self.native(precision)) and supported

    def summary(self) -> str:
        """"Intel(R) Xeon(R) Processor (GenuineIntel): AVX2, AVX-512, AVX-512 VNNI, AVX-512 bf16, AMX bf16/int8"."""
        names = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                 ("avx512_bf16", "AVX-512 bf16"), ("avx512_fp16", "AVX-512 fp16")]
        sets = [name for flag, name in names if flag in self.flags]
        amx = "/".join(kind for kind in ("bf16", "int8", "fp16") if f"amx_{kind}" in self.flags)
        sets += [f"AMX {amx}"] if amx else ["no AMX"]
        vendor = f" ({self.vendor})" if self.vendor else ""
        cap = f" (oneDNN held to {self.onednn_cap} by $ONEDNN_MAX_CPU_ISA)" if self.onednn_cap else ""
        return (f"{self.model or 'unknown CPU'}{vendor}: {', '.join(sets)}{cap}; torch kernels "
                f"{self.torch_capability}")


@dataclass(frozen=True)
class Choice:
    precision: str
    reason: str  # "auto -> int8: avx512_vnni, int8 GEMM 5.9x fp32"


@functools.lru_cache(maxsize=None)
def describe_cpu() -> CPU:
    """This CPU, from /proc/cpuinfo where there is one (Linux), else from the platform and torch's capability;
    its flags are those oneDNN may use (see $ONEDNN_MAX_CPU_ISA in the module docstring)."""
    fields = _cpuinfo(Path("/proc/cpuinfo"))
    flags = set(fields.get("flags", "").split()) & set(FLAGS)
    capability = torch.backends.cpu.get_cpu_capability()
    if not fields.get("flags"):  # no /proc/cpuinfo: what torch's own dispatch found is all we know
        flags |= {"AVX2": {"avx2"}, "AVX512": {"avx2", "avx512f"}}.get(capability, set())
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    held = cap in ONEDNN_ISA_FLAGS and not flags <= set(ONEDNN_ISA_FLAGS[cap])
    if held:
        flags &= set(ONEDNN_ISA_FLAGS[cap])
    return CPU(vendor=fields.get("vendor_id", ""), model=fields.get("model name", platform.processor()),
               flags=frozenset(flags), torch_capability=capability,
               onednn_bf16=_onednn_supports("bf16"), onednn_fp16=_onednn_supports("fp16"),
               onednn_cap=cap if held else "")


@functools.lru_cache(maxsize=None)
def gemm_rates() -> dict:
    """{precision: G(FL)OP/s} of one encoder layer's Linears at PROBE_ROWS tokens, best of 3; measured once per
    process. A precision more than SLOW times slower than fp32 on a small trial keeps its trial rate."""
    return measure_gemm_rates(PROBE_ROWS, repeats=3)


def measure_gemm_rates(rows: int, repeats: int) -> dict:
    """gemm_rates() at other sizes (bench_encode.py measures its ceiling with more repeats). Not cached."""
    trial = _best_rates({precision: _layer(precision, TRIAL_ROWS, ((384, 1536),)) for precision in PRECISIONS}, 2)
    fast = [precision for precision in PRECISIONS if trial["fp32"] / trial[precision] <= SLOW]
    full = _best_rates({precision: _layer(precision, rows, LAYER_SHAPES) for precision in fast}, repeats)
    return {precision: full.get(precision, trial[precision]) for precision in PRECISIONS}


def slowdown(precision: str, rates: dict = None) -> float:
    """How many times slower than fp32 `precision`'s GEMMs run on this CPU, measured (1.0: as fast or faster)."""
    _check(precision)
    rates = gemm_rates() if rates is None else rates
    return max(1.0, rates["fp32"] / rates[precision])


def slow_precision_warning(precision: str, cpu: CPU = None, rates: dict = None):
    """The warning for an explicitly chosen precision that runs slower than fp32 here, or None. Probes unless AMX
    runs it (amx_bf16, amx_fp16, amx_int8): AVX-512 bf16/fp16/VNNI can still run slower than fp32."""
    _check(precision)
    cpu = describe_cpu() if cpu is None else cpu
    if precision == "fp32" or cpu.fast(precision) and f"amx_{precision}" in cpu.flags:
        return None
    factor = slowdown(precision, rates)
    if factor <= WARN_ABOVE:
        return None
    return (f"precision {precision} runs {_times(factor)} slower than fp32 on this CPU ({_lacking(cpu, precision)}): "
            "use fp32 or auto")


_warned = set()


def warn_if_slow(precision: str, device="cpu") -> None:
    """Log slow_precision_warning(precision) once per process, where there is one and `device` is the CPU (this
    CPU's speed says nothing of a GPU's). encode calls it for its precision, train.py for --precision."""
    if torch.device(device).type != "cpu":
        return
    message = slow_precision_warning(precision)
    if message is not None and message not in _warned:
        _warned.add(message)
        log.warning(message)


def choose_precision(cpu: CPU = None, rates: dict = None) -> Choice:
    """The fastest precision here among fp32, bf16 and int8 (those within the quality bands), with the reason.

    From the instruction sets where they decide: neither bf16 nor int8 native -> fp32; AMX -> bf16. Otherwise
    from the probe: bf16 / int8 must beat fp32's GEMMs by FASTER[precision], and where both do, bf16 wins. int8
    encoded slower than bf16 on both kinds of CPU measured with both: 0.5x on an Intel Xeon with AMX, 0.46-0.64x
    on an AMD EPYC with AVX-512 bf16 + VNNI whose int8 GEMM ran 2.2x bf16's (benchmarks/README.md): its
    quantization passes and float32 attention, LayerNorms and adds cost more than its faster GEMMs save."""
    cpu = describe_cpu() if cpu is None else cpu
    if not cpu.fast("bf16") and not cpu.fast("int8"):
        # bf16 runs 5-70x slower than fp32 without them; int8 1.0-1.3x fp32 in the AVX2 imitation (benchmarks/
        # README.md), its weights at +-64 (quantize.py), embeddings off by up to 5e-2: not worth it
        return Choice("fp32", f"auto -> fp32: no {'/'.join(NATIVE['bf16'])}, no {'/'.join(NATIVE['int8'])} on this "
                              "CPU (bf16 runs slower than fp32 without them; int8 gains little and loses accuracy)")
    if "amx_bf16" in cpu.flags and cpu.fast("bf16"):
        return Choice("bf16", "auto -> bf16: amx_bf16 (int8's faster GEMMs do not pay for its float32 attention "
                              "and quantization passes)")
    rates = gemm_rates() if rates is None else rates
    gain = {precision: rates[precision] / rates["fp32"] for precision in ("bf16", "int8")}
    candidates = [precision for precision in ("bf16", "int8")
                  if cpu.fast(precision) and gain[precision] >= FASTER[precision]]
    measured = ", ".join(f"{precision} GEMM {_versus_fp32(gain[precision])}" for precision in gain)
    if not candidates:
        return Choice("fp32", f"auto -> fp32: {measured}")
    best = candidates[0]  # bf16 where it qualifies
    why_not_int8 = " (int8 encodes slower than bf16 where both run natively)" if len(candidates) == 2 else ""
    return Choice(best, f"auto -> {best}: {', '.join(cpu.native(best))}, {measured}{why_not_int8}")


def _lacking(cpu: CPU, precision: str) -> str:
    """What keeps `precision` from running fast on `cpu`, for a warning: "no amx_bf16/avx512_bf16", "avx512_bf16
    without AMX", or "oneDNN does not run bf16 here" (the instructions are there, this torch's oneDNN lacks them)."""
    native = cpu.native(precision)
    if not native:
        return f"no {'/'.join(NATIVE[precision])}"
    return f"{'/'.join(native)} without AMX" if cpu.fast(precision) else f"oneDNN does not run {precision} here"


def _times(factor: float) -> str:
    return f"{factor:.0f}x" if factor >= 2 else f"{factor:.1f}x"


def _versus_fp32(gain: float) -> str:
    return f"{gain:.1f}x fp32" if gain >= 0.95 else f"{_times(1 / gain)} slower than fp32"


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


def _cpuinfo(path: Path) -> dict:
    """The first processor's "key: value" lines of /proc/cpuinfo ({} where there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _onednn_supports(kind: str) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        check = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
        return bool(check[kind]())
    except (AttributeError, RuntimeError):
        return False


def onednn_int8_available() -> bool:
    """oneDNN's int8 linear (torch.ops.onednn.qlinear_pointwise, the op torch's x86 inductor quantizer emits) is
    in this torch build: minilm/quantize.py runs its int8 GEMMs there, else through torch._int_mm."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.onednn.qlinear_prepack, torch.ops.onednn.qlinear_pointwise  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def onednn_int8_runs_here() -> bool:
    """Int8Linear runs oneDNN's int8 linear here: the op is in this torch and the CPU has AMX (amx_int8).
    Without AMX, oneDNN's fast int8 kernels take unsigned activations only: its linear given Int8Linear's signed
    ones falls back to oneDNN's reference kernel (measured with $ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI: 0.1 GOP/s,
    ~3,000x slower than fp32), where torch._int_mm runs at 440-880 GOP/s. So there, Int8Linear runs torch._int_mm."""
    return onednn_int8_available() and "amx_int8" in describe_cpu().flags


@functools.lru_cache(maxsize=None)
def int8_sums_saturate() -> bool:
    """True where this CPU's int8 matrix multiplies (oneDNN's int8 linear, torch._int_mm) add pairs of products
    in 16 bits with saturation (no VNNI / AMX; see the module docstring): one product of the largest int8 values,
    64 x 127 x 127, comes out wrong there. Measured once per process (microseconds)."""
    x = torch.full((17, 64), 127, dtype=torch.int8)  # 17 rows: torch._int_mm wants more than 16
    weight = torch.full((8, 64), 127, dtype=torch.int8)
    exact = 64 * 127 * 127  # 1,032,256: exact in float32 too
    products = [functools.partial(torch._int_mm, x, weight.t().contiguous())]
    if onednn_int8_runs_here():
        products.append(_int8_product(x, weight))
    return any(not bool((product() == exact).all()) for product in products)


def _layer(precision: str, rows: int, shapes):
    """(run, flops): a function running the products `shapes` on [rows, in] inputs the way encode runs
    `precision`, and the FLOPs (2 per multiply-add) of one run."""
    generator = torch.Generator().manual_seed(0)
    products = []
    for in_features, out_features in shapes:
        if precision == "int8":
            x = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8, generator=generator)
            weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
            products.append(_int8_product(x, weight))
            continue
        dtype = DTYPES[precision]
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
        if (precision == "fp32" or _onednn_supports(precision)) and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            products.append(functools.partial(torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], ""))
        else:
            products.append(functools.partial(F.linear, x, weight))
    flops = sum(2 * rows * in_features * out_features for in_features, out_features in shapes)
    return (lambda: [product() for product in products]), flops


def _int8_product(x, weight):
    if onednn_int8_runs_here():
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        scale, zero = torch.ones(weight.shape[0]), torch.zeros(weight.shape[0], dtype=torch.int64)
        return functools.partial(torch.ops.onednn.qlinear_pointwise, x, 1.0, 0, packed, scale, zero, None, 1.0, 0,
                                 torch.float32, "none", [], "")
    if x.shape[0] <= 16:  # torch._int_mm wants more than 16 rows
        x = torch.cat([x, x.new_zeros(17 - x.shape[0], x.shape[1])])
    return functools.partial(torch._int_mm, x, weight.t().contiguous())


def _best_rates(layers: dict, repeats: int) -> dict:
    """{precision: (run, flops)} -> {precision: G(FL)OP/s}: one warm-up call each, then `repeats` rounds calling
    each in turn (a busy spell of a shared machine hits all of them), the best time of each."""
    best = {}
    for precision, (run, _) in layers.items():
        run()
        best[precision] = float("inf")
    for _ in range(repeats):
        for precision, (run, _) in layers.items():
            start = time.perf_counter()
            run()
            best[precision] = min(best[precision], time.perf_counter() - start)
    return {precision: flops / best[precision] / 1e9 for precision, (_, flops) in layers.items()}
