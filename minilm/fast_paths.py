"""Which backend runs each piece of the model: one table, one call (`choose`), one place that reads MINILM_*.

encode computes in a precision (`PRECISIONS`: fp32, bf16, fp16, int8), or is asked for "auto":
`resolve_precision(device, precision)` turns that into the precision that runs - on the CPU minilm/cpu.py's choice
(the fastest within the quality bands, from the instruction sets and a short probe), on CUDA bf16 where the GPU
has it, else fp32 - decided once per process and logged once with the reason. An explicit precision whose matrix
multiplies run slower than fp32 on this CPU is warned about once, with the factor. Three pieces of the model have
backends, swappable without a second forward:

    piece      backends                          default
    linear     plain, onednn, int8               precision int8: int8; else onednn on a CPU whose oneDNN runs
                                                 that precision, else plain; training: plain
    attention  math, sdpa, sdpa_padded, triton   triton on CUDA with Triton installed, else sdpa
    pooling    plain, triton                     triton for mean pooling on CUDA with Triton, else plain

`choose(device, precision, modes, forced)` decides all three at once, for one call of encode or one training
forward; the model hands the names down, and the encoder's layers and pooling run what they are given.

A backend is forced by name through the model's `backends` (`minilm.load(..., backends={"attention": "math"})`,
or `model.backends = {...}`), which wins over the environment (MINILM_LINEAR, MINILM_ATTENTION, MINILM_POOLING:
read by `forced_by_environment`, nowhere else), which wins over the default. An unknown name is an error, and so
is a forced name that cannot run here; a default that cannot run falls back to the plain path, logged once.

- linear: the Linear modules of encode's private inference copy (training runs the model's own nn.Linear, which
  takes gradients). "plain" keeps nn.Linear (the reference); "onednn" swaps in minilm/onednn.py's OneDNNLinear
  (weights prepacked once, the FFN's activation inside the matmul); "int8" is precision int8's one backend:
  minilm/quantize.py's Int8Linear in all but the attention's q/k/v projection. A forced linear backend picks
  between plain and onednn for the float precisions; int8 is chosen by `precision="int8"`, not by name.
- attention: "math" is the float32 reference; "sdpa" is torch's fused attention ("sdpa_padded" forces its padded
  layout); "triton" is the kernel in minilm/kernels. See minilm/attention.py.
- pooling: "plain" is minilm/pooling.py; "triton" is minilm/kernels/pooling.py (mean pooling and normalization in
  one pass; other pooling modes run plain, logged once).
"""

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from minilm import cpu, kernels, onednn
from minilm.errors import InputError
from minilm.quantize import keep_qkv_float, quantize_linears

# precision -> the dtype of encode's weights and activations (None: float32). int8 keeps float32 there and runs
# its Linears in int8 (the "int8" linear backend).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
AUTO = "auto"  # asks resolve_precision for the fastest precision here
# piece -> its backends, the reference first
BACKENDS = {"linear": ("plain", "onednn", "int8"), "attention": ("math", "sdpa", "sdpa_padded", "triton"),
            "pooling": ("plain", "triton")}
ENVIRONMENT = {"linear": "MINILM_LINEAR", "attention": "MINILM_ATTENTION", "pooling": "MINILM_POOLING"}
# linear backend -> how it is put into encode's inference copy (in place)
LINEAR_SWAPS = {"plain": lambda module: module, "onednn": onednn.use_onednn,
                "int8": lambda module: quantize_linears(module, skip=keep_qkv_float)}

log = logging.getLogger(__name__)
_logged = set()


@dataclass(frozen=True)
class Backends:
    """One backend name per piece. From `choose`: every name set. As a model's `backends`: the names forced, None
    where `choose` picks."""

    linear: str = None
    attention: str = None
    pooling: str = None

    def __post_init__(self):
        for piece in BACKENDS:
            _check_name(piece, getattr(self, piece))


def forced(value) -> Backends:
    """None, a Backends, or a dict {piece: name} -> the Backends it forces; anything else is an InputError."""
    if value is None or isinstance(value, Backends):
        _refuse_int8_by_name(value and value.linear)
        return value or Backends()
    if isinstance(value, Mapping):
        unknown = [key for key in value if key not in BACKENDS]
        if unknown:
            raise InputError(f"backends: unknown piece {unknown[0]!r}; expected some of {tuple(BACKENDS)}")
        _refuse_int8_by_name(value.get("linear"))
        return Backends(**value)
    raise InputError(f"backends must be None, a dict like {{'attention': 'math'}} or a fast_paths.Backends, "
                     f"not {type(value).__name__}")


def forced_by_environment() -> Backends:
    """The names MINILM_LINEAR, MINILM_ATTENTION and MINILM_POOLING force (unset or empty: None)."""
    names = {piece: os.environ.get(variable) or None for piece, variable in ENVIRONMENT.items()}
    for piece, name in names.items():
        _check_name(piece, name, f" (from ${ENVIRONMENT[piece]})")
    _refuse_int8_by_name(names["linear"], f" (from ${ENVIRONMENT['linear']})")
    return Backends(**names)


def choose(device, precision="fp32", modes=("mean",), forced_names=None, training=False) -> Backends:
    """The backend of every piece for one call of encode in `precision` (training=False), or for one training
    forward (training=True: the model's own Linears), on `device`, pooling with `modes`.

    forced_names: the model's `backends` (see `forced`); they win over the environment's, which win over the
    defaults in the table above. An unknown name, or a forced one that cannot run here, is an InputError."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {tuple(PRECISIONS)}, not {precision!r}")
    argument, environment = forced(forced_names), forced_by_environment()
    name = {piece: getattr(argument, piece) or getattr(environment, piece) for piece in BACKENDS}
    device = torch.device(device)
    return Backends(linear=_linear(device, precision, name["linear"], training),
                    attention=_attention(device, name["attention"]), pooling=_pooling(device, modes, name["pooling"]))


def resolve_precision(device, precision: str) -> str:
    """The precision that runs when `precision` is asked for on `device`: "auto" -> auto_precision (its reason
    logged once); one of PRECISIONS -> itself, with cpu.warn_if_slow's warning once on a CPU where it runs slower
    than fp32. Anything else is an InputError."""
    device = torch.device(device)
    if precision == AUTO:
        choice = auto_precision(device.type)
        log_once(choice.reason)
        return choice.precision
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InputError(f"precision must be one of {(*PRECISIONS, AUTO)}, not {precision!r}")
    cpu.warn_if_slow(precision, device)
    return precision


def training_precision(device, precision: str) -> str:
    """What train.py's --precision autocasts in: "auto" -> bf16 on CUDA where the GPU has it, else fp32 (the CPU
    trains in fp32: its fastest precision is for inference); an explicit one as it is, with cpu.warn_if_slow's
    warning once (bf16 autocast on a CPU without bf16 instructions: tens of times slower)."""
    device = torch.device(device)
    if precision == AUTO:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    cpu.warn_if_slow(precision, device)
    return precision


@functools.cache
def auto_precision(device_type: str) -> cpu.Choice:
    """What "auto" computes in on a device of this type, decided once per process. The CPU: cpu.choose_precision.
    CUDA: bf16 where the GPU has it (Ampere and later), else fp32 (fp16 has no quality figures and is never
    picked)."""
    if device_type != "cuda":
        return cpu.choose_precision()
    if torch.cuda.is_bf16_supported():
        return cpu.Choice("bf16", "auto -> bf16: this CUDA GPU runs bf16")
    return cpu.Choice("fp32", "auto -> fp32: this CUDA GPU has no bf16 (fp16 is never picked: no quality figures)")


def check_environment(device=None, precision: str = None) -> None:
    """Refuse a MINILM_* variable that names no backend, or one that cannot be forced (int8) or cannot run here
    (Triton without it; given the device and the precision that will run, MINILM_LINEAR=onednn where oneDNN cannot
    run that precision, e.g. bf16 on an AVX2-only CPU): the CLIs call this before any work, so the mistake is one
    line, not a failure at the first batch (or, in train.py, at the first evaluation after the training steps)."""
    environment = forced_by_environment()
    for piece in ("attention", "pooling"):
        if getattr(environment, piece) == "triton":
            _require_triton(piece)
    if precision is not None and environment.linear is not None:
        try:
            _linear(torch.device(device), precision, environment.linear, training=False)
        except InputError as error:
            raise InputError(f"${ENVIRONMENT['linear']}={environment.linear}: {error}") from None


def swap_linears(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Put the Linears of `backend` into `module` (an inference copy), in place; see minilm/swap.py for which
    Linears a swap leaves alone."""
    return LINEAR_SWAPS[backend](module)


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def _linear(device, precision, name, training) -> str:
    if training:
        return "plain"  # the model's own nn.Linear: the others are inference copies, without gradients
    if precision == "int8":
        return "int8"
    dtype = PRECISIONS[precision] or torch.float32
    needs = f"; {precision} needs {onednn.NEEDS[dtype]}" if dtype in onednn.NEEDS else ""
    if name == "onednn" and not onednn.available(device, dtype):
        raise InputError(f"linear backend 'onednn' cannot run {precision} on {device} here (oneDNN runs on CPUs "
                         f"only{needs}); expected 'plain'")
    if name is not None:
        return name
    if device.type == "cpu":
        if onednn.available(device, dtype):
            return "onednn"
        log_once(f"oneDNN cannot run {precision} on this CPU{needs}: encode's Linears stay plain nn.Linear.")
    return "plain"


def _attention(device, name) -> str:
    if name == "triton":
        _require_triton("attention")
    if name is not None:
        return name
    if device.type == "cuda":
        if kernels.available():
            return "triton"
        log_once("Triton is not installed: attention on CUDA falls back to the 'sdpa' backend.")
    return "sdpa"


def _pooling(device, modes, name) -> str:
    mean_only = tuple(modes) == ("mean",)
    if name == "triton":
        _require_triton("pooling")
        if not mean_only:
            log_once(f"the 'triton' pooling backend does mean pooling only: pooling modes {tuple(modes)} run plain.")
            return "plain"
    if name is not None:
        return name
    if device.type == "cuda" and mean_only:
        if kernels.available():
            return "triton"
        log_once("Triton is not installed: pooling on CUDA falls back to the plain code.")
    return "plain"


def _check_name(piece: str, name, source: str = "") -> None:
    if name is not None and (not isinstance(name, str) or name not in BACKENDS[piece]):
        raise InputError(f"unknown {piece} backend {name!r}{source}; expected one of {BACKENDS[piece]}")


def _refuse_int8_by_name(name, source: str = "") -> None:
    if name == "int8":
        raise InputError(f"linear backend 'int8'{source} is chosen by the precision (encode(precision='int8'), "
                         "--precision int8), not by name; expected 'plain' or 'onednn'")


def _require_triton(piece: str) -> None:
    if not kernels.available():
        raise InputError(f"{piece} 'triton' cannot run here: it needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 "
                         f"on the CPU); expected one of {[name for name in BACKENDS[piece] if name != 'triton']}")
