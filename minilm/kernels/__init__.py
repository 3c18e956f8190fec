"""Fused Triton kernels: flash attention and mean pooling over the packed layout, each beside its reference.

Triton compiles them for CUDA GPUs. On a CPU they run only under Triton's interpreter (TRITON_INTERPRET=1, set
before the first import of this package), which is how the tests check them on machines without a GPU.
Importing this package never fails: `available()` says whether the kernels can run here.
"""

import importlib.util
import os

import torch


def available() -> bool:
    """Triton is installed and can run: on CUDA, or on the CPU under its interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def flash_attention(q, k, v, cu_seqlens, longest):
    """See minilm/kernels/attention.py."""
    from minilm.kernels.attention import flash_attention as kernel

    return kernel(q, k, v, cu_seqlens, longest)


def fused_mean_pool(tokens, cu_seqlens, normalize: bool):
    """See minilm/kernels/pooling.py."""
    from minilm.kernels.pooling import fused_mean_pool as kernel

    return kernel(tokens, cu_seqlens, normalize)
