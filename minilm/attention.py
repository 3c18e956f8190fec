"""Self-attention over the packed layout, behind one function with named backends.

Every sentence of a batch lives in one `[total_tokens, heads, head_dim]` tensor; `cu_seqlens` (int32,
`[batch + 1]`) marks where each sentence starts and ends. A token attends only to tokens of its own
sentence, and no backend ever attends to (or computes on) padding that the caller has to mask.

Backends:
- "math":   the plain reference: pad, explicit softmax(q k^T / sqrt(d)) v in float32, unpad.
- "sdpa":   torch's scaled_dot_product_attention; the tokens are padded only around that one call.
- "triton": the fused flash-attention kernel of `minilm.kernels` (CUDA; CPU only under TRITON_INTERPRET=1).

`pick_backend(device)` is the one place that chooses per device; `attention(..., backend="name")` forces one.
"""

import logging
import math

import torch
import torch.nn.functional as F

BACKENDS = ("math", "sdpa", "triton")

log = logging.getLogger(__name__)


def pick_backend(device: torch.device) -> str:
    """The backend used when none is forced: the fused kernel on CUDA when Triton is there, else SDPA."""
    if torch.device(device).type == "cuda":
        from minilm import kernels

        if kernels.available():
            return "triton"
        _log_once("Triton is not installed: attention on CUDA falls back to the 'sdpa' backend.")
    return "sdpa"


_logged = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def padding_index(cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """For each packed token, its flat position in a `[batch, max_seqlen]` padded grid. -> [total_tokens] int64."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    position = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts[sequence]
    return sequence * max_seqlen + position


def pad(tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """[total_tokens, *rest] -> [batch, max_seqlen, *rest], zeros where a sentence is shorter."""
    batch = len(cu_seqlens) - 1
    padded = tokens.new_zeros((batch * max_seqlen,) + tokens.shape[1:])
    padded[padding_index(cu_seqlens, max_seqlen)] = tokens
    return padded.view((batch, max_seqlen) + tokens.shape[1:])


def unpad(padded: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[batch, max_seqlen, *rest] -> [total_tokens, *rest]: the inverse of `pad`."""
    batch, max_seqlen = padded.shape[:2]
    return padded.reshape((batch * max_seqlen,) + padded.shape[2:])[padding_index(cu_seqlens, max_seqlen)]


def key_padding_mask(cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """[batch, max_seqlen] bool, True at a sentence's real tokens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None]


def math_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    """The reference: explicit softmax attention in float32 on the padded batch, masked per sentence."""
    head_dim = q.shape[-1]
    # [total, heads, dim] -> [batch, heads, max_seqlen, dim]
    q, k, v = (pad(x.float(), cu_seqlens, max_seqlen).transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # [batch, heads, max_seqlen, max_seqlen]
    keep = key_padding_mask(cu_seqlens, max_seqlen)[:, None, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    out = (probs @ v).transpose(1, 2)  # [batch, max_seqlen, heads, dim]
    return unpad(out, cu_seqlens)


def sdpa_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    """torch's fused attention; it wants a rectangle, so pad around this call only."""
    if len(cu_seqlens) == 2:
        # One sentence: no padding at all, and SDPA may take its fastest, mask-free path.
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, len, dim]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return out.squeeze(0).transpose(0, 1)
    q, k, v = (pad(x, cu_seqlens, max_seqlen).transpose(1, 2) for x in (q, k, v))  # [batch, heads, L, dim]
    keep = key_padding_mask(cu_seqlens, max_seqlen)[:, None, None, :]  # [batch, 1, 1, L]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
    return unpad(out.transpose(1, 2), cu_seqlens)


def triton_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    from minilm import kernels

    if dropout_p > 0:
        # The kernel keeps no dropout mask; hidden-state dropout still applies everywhere else.
        _log_once("the 'triton' attention backend skips dropout on attention probabilities while training")
    return kernels.flash_attention(q, k, v, cu_seqlens, max_seqlen)


_IMPLEMENTATIONS = {"math": math_attention, "sdpa": sdpa_attention, "triton": triton_attention}


def attention(q, k, v, cu_seqlens, max_seqlen, backend=None, dropout_p=0.0):
    """Softmax attention of every token over the tokens of its own sentence.

    q, k, v: [total_tokens, heads, head_dim]; cu_seqlens: int32 [batch + 1]; max_seqlen: the longest sentence.
    Returns [total_tokens, heads, head_dim] in q's dtype. backend: one of BACKENDS, or None to pick per device.
    dropout_p: dropout on the attention probabilities (training only).
    """
    if backend is None:
        backend = pick_backend(q.device)
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    return _IMPLEMENTATIONS[backend](q, k, v, cu_seqlens, max_seqlen, dropout_p).to(q.dtype)
