"""Which fast path runs: the one place that decides, per device and dtype, and the one place that reads MINILM_*.

    piece      names                                 default
    attention  math, sdpa, sdpa_padded, triton       triton on CUDA with Triton installed, else sdpa
    pooling    plain, triton                         triton for mean pooling on CUDA with Triton, else plain
    linear     plain, onednn, int8                   onednn for encode on a CPU whose oneDNN runs that dtype, else plain

Each can be forced by name: an argument (`minilm.load(attention_backend=...)`, or the model's `attention_backend`,
`pooling_kernel`, `linear_kind` attributes) wins over the environment (MINILM_ATTENTION, MINILM_POOLING,
MINILM_LINEAR, read here only), which wins over the default. A forced name that cannot run here is an error; a
default that cannot run falls back to the plain path, and that is logged once.

- attention: "math" is the float32 reference; "sdpa" is torch's fused attention, which on the CPU runs once per run of
  equally long sentences when a batch has few such runs or padding would waste much (`sdpa_runs`), and else
  pads around one call ("sdpa_padded" forces the latter), and per run reads keys padded to a multiple of 16 in
  place where `stretch_keys` says that is safe; "triton" is the kernel in minilm/kernels. See minilm/attention.py.
- pooling: "triton" is minilm/kernels/pooling.py (mean pooling and normalization in one pass; mean mode only).
- linear: the Linear modules of encode's private inference copy. "plain" keeps nn.Linear (the reference);
  "onednn" swaps in minilm/onednn.py's OneDNNLinear (weights prepacked once, the FFN's activation inside the matmul);
  "int8" swaps in minilm/quantize.py's Int8Linear, all but the attention's q/k/v projection (`encode(precision=
  "int8")`, or forced by name). Training always runs the model's
  own nn.Linear.
"""

import logging
import os
from dataclasses import dataclass

import torch

from minilm.errors import InputError

ATTENTION = ("math", "sdpa", "sdpa_padded", "triton")
POOLING = ("plain", "triton")
LINEAR = ("plain", "onednn", "int8")
CHOICES = {"attention": ATTENTION, "pooling": POOLING, "linear": LINEAR}
NOUNS = {"attention": "attention backend", "pooling": "pooling kernel", "linear": "linear kind"}
ENV = {"attention": "MINILM_ATTENTION", "pooling": "MINILM_POOLING", "linear": "MINILM_LINEAR"}

log = logging.getLogger(__name__)
_logged = set()


@dataclass(frozen=True)
class FastPaths:
    attention: str
    pooling: str
    linear: str


def choose(device, dtype=torch.float32, attention=None, pooling=None, linear=None, modes=("mean",)) -> FastPaths:
    """Every choice for one device and dtype (the arguments force names, as in the table above)."""
    return FastPaths(attention_backend(device, attention), pooling_kernel(device, modes, pooling),
                     linear_kind(device, dtype, linear))


def check_environment() -> None:
    """Refuse a MINILM_* variable that names no fast path, or one that cannot run here (Triton without it): the
    CLIs call this before any work, so the mistake is one line, not a failure at the first batch."""
    for piece in CHOICES:
        if _forced(piece, None) == "triton":
            _require_triton(piece)


def attention_backend(device, forced=None) -> str:
    name = _forced("attention", forced)
    if name == "triton":
        _require_triton("attention")
    if name is not None:
        return name
    if torch.device(device).type == "cuda":
        if _triton_available():
            return "triton"
        log_once("Triton is not installed: attention on CUDA falls back to the 'sdpa' backend.")
    return "sdpa"


def pooling_kernel(device, modes, forced=None) -> str:
    name = _forced("pooling", forced)
    if name == "triton":
        _require_triton("pooling")
        if tuple(modes) != ("mean",):
            log_once(f"the 'triton' pooling kernel does mean pooling only: pooling modes {tuple(modes)} run plain.")
            return "plain"
    if name is not None:
        return name
    if torch.device(device).type == "cuda" and tuple(modes) == ("mean",):
        if _triton_available():
            return "triton"
        log_once("Triton is not installed: pooling on CUDA falls back to the plain code.")
    return "plain"


def linear_kind(device, dtype, forced=None) -> str:
    from minilm import onednn

    name = _forced("linear", forced)
    if name == "onednn" and not onednn.available(device, dtype):
        raise InputError(f"linear 'onednn' cannot run {dtype} on {device} here; expected 'plain' or 'int8' "
                         "(oneDNN runs on CPUs only, bf16/fp16 where the CPU supports them)")
    if name is not None:
        return name
    if torch.device(device).type == "cpu":
        if onednn.available(device, dtype):
            return "onednn"
        log_once(f"oneDNN cannot run {dtype} on this CPU: encode's Linears stay plain nn.Linear.")
    return "plain"


# One more SDPA call (views, a dropout mask, an autograd node, the cat) costs about as much as attending a few
# thousand more query-key pairs per head: the measured break-even (2 threads, forward + backward under dropout,
# random lengths) lies between ~4,000 and ~9,000 pairs a call. Taken at the high end, so that near-ties stay padded.
PAIRS_PER_CALL = 8192


def sdpa_runs(device, cu_seqlens):
    """The "sdpa" layout for one batch: [(length, count)] to call SDPA once per run of equally long sentences, or
    None to pad around one call. CPU only. Runs are taken
    - when there are few of them (encode sorts by length: a batch holds a handful), or
    - when padding would waste more attention than the extra calls cost: padded, every sentence attends over the
      longest one's length (batch x longest^2 query-key pairs per head) instead of its own (sum of length^2).
      Random training batches of long passages (seed card 000: up to 512 tokens, mean ~300) waste most of it, and
      under dropout the CPU runs SDPA's math path, which computes every padded pair: per sentence is ~3x faster
      there (benchmarks/README.md). Batches of short sentences of many lengths stay padded."""
    from minilm.packing import length_runs

    if torch.device(device).type != "cpu":
        return None
    runs = length_runs(cu_seqlens)
    batch = len(cu_seqlens) - 1
    if len(runs) <= max(1, batch // 4):
        return runs
    longest = max(length for length, _ in runs)
    wasted_pairs = batch * longest ** 2 - sum(count * length ** 2 for length, count in runs)
    return runs if wasted_pairs > PAIRS_PER_CALL * len(runs) else None


def stretch_keys(q, k, v, dropout_p) -> bool:
    """Read each run's keys and values padded to a multiple of KEY_BLOCK straight from the packed tensor (the
    next sentences' rows, masked out). Inference on the CPU only: not under autograd (the backward of such an
    overlapping view is slow), not with dropout, not in fp16 (a neighbour's overflowed key would turn a masked
    score into NaN)."""
    return (q.device.type == "cpu" and q.dtype != torch.float16 and dropout_p == 0
            and not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)))


def swap_linears(module: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Replace the plain nn.Linear layers of `module` (an inference copy) with `kind`'s module, in place.

    Only exact nn.Linear modules without an instance-level forward or hooks are replaced: a Linear the user has
    subclassed, patched or hooked keeps running as the user wrote it."""
    if kind == "plain":
        return module
    if kind == "onednn":
        from minilm import onednn

        return onednn.use_onednn(module)
    if kind == "int8":
        try:
            from minilm.quantize import Int8Linear
        except ImportError as error:
            raise InputError(f"linear 'int8' needs minilm/quantize.py ({error})") from None
        from minilm.quantize import keep_qkv_float

        return replace_linears(module, Int8Linear.from_linear, skip=keep_qkv_float)
    raise InputError(f"unknown linear kind {kind!r}; expected one of {LINEAR}")


def replace_linears(module: torch.nn.Module, make, skip=lambda name, linear: False) -> torch.nn.Module:
    """Swap every plain nn.Linear child (recursively) for `make(linear)`, gpt-fast's quantize.py style, except
    where skip(name, linear) is true; name is the Linear's dotted path in `module`."""
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            if is_plain(child, torch.nn.Linear) and not skip(full_name, child):
                setattr(parent, name, make(child))
    return module


# The forwards of the modules that swaps replace, as torch defines them (a class-level patch makes a module not plain).
_TORCH_FORWARDS = {cls: cls.forward for cls in (torch.nn.Linear, torch.nn.GELU, torch.nn.ReLU)}


def is_plain(module, cls) -> bool:
    """`module` is exactly a `cls`, running torch's own forward, with no instance-level forward and no hooks."""
    return (type(module) is cls and cls.forward is _TORCH_FORWARDS[cls] and "forward" not in module.__dict__
            and not (module._forward_hooks or module._forward_pre_hooks))


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def _forced(piece: str, argument):
    """The name forced by the argument, else by the environment variable, else None; an unknown name is an error."""
    source = ""
    if argument is None:
        argument = os.environ.get(ENV[piece]) or None
        source = f" (from ${ENV[piece]})"
    if argument is not None and argument not in CHOICES[piece]:
        raise InputError(f"unknown {NOUNS[piece]} {argument!r}{source}; expected one of {CHOICES[piece]}")
    return argument


def _triton_available() -> bool:
    from minilm import kernels

    return kernels.available()


def _require_triton(piece: str) -> None:
    if not _triton_available():
        raise InputError(f"{piece} 'triton' cannot run here: it needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 "
                         f"on the CPU); expected one of {[name for name in CHOICES[piece] if name != 'triton']}")
