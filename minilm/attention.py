"""Self-attention over the packed layout, behind one function with named backends.

Every sentence of a batch lives in one `[total_tokens, heads, head_dim]` tensor; `cu_seqlens` (int32,
`[batch + 1]`) marks where each sentence starts and ends. A token attends only to tokens of its own
sentence, and no backend ever attends to (or computes on) padding that the caller has to mask.

Backends:
- "math":   the plain reference: pad, explicit softmax(q k^T / sqrt(d)) v in float32, unpad.
- "sdpa":   torch's scaled_dot_product_attention: on the CPU once per run of equally long sentences (no
            padding copied), elsewhere on a padded copy made only around that one call.
- "triton": the fused flash-attention kernel of `minilm.kernels` (CUDA; CPU only under TRITON_INTERPRET=1).

`pick_backend(device)` is the one place that chooses per device; `attention(..., backend="name")` forces one.
"""

import itertools
import logging
import math

import torch
import torch.nn.functional as F

BACKENDS = ("math", "sdpa", "triton")
KEY_BLOCK = 16  # key lengths that the CPU SDPA kernel runs fastest in multiples of (see _sdpa_per_length_run)

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


def token_coordinates(cu_seqlens: torch.Tensor):
    """For each packed token: (its sentence, its position in that sentence), both [total_tokens] int64."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    total = int(cu_seqlens[-1])
    sentence = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                       output_size=total)
    position = torch.arange(total, device=cu_seqlens.device) - starts[sentence]
    return sentence, position


def padding_slots(cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Each packed token's row in a padded [batch * max_seqlen] layout, int64 [total_tokens]."""
    sentence, position = token_coordinates(cu_seqlens)
    return sentence * max_seqlen + position


def pad(x: torch.Tensor, slots: torch.Tensor, batch: int, max_seqlen: int) -> torch.Tensor:
    """[total_tokens, heads, dim] -> [batch, heads, max_seqlen, dim], zeros past each sentence's end.

    Padded token-major (one index_copy) and returned as a heads-first view: SDPA reads it through strides."""
    padded = x.new_zeros(batch * max_seqlen, *x.shape[1:])  # zeros: padded keys and values stay finite
    padded.index_copy_(0, slots, x)
    return padded.view(batch, max_seqlen, *x.shape[1:]).transpose(1, 2)


def unpad(padded: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[batch, heads, max_seqlen, dim] -> [total_tokens, heads, dim]: the inverse of `pad`."""
    batch, heads, max_seqlen, dim = padded.shape
    return padded.transpose(1, 2).reshape(batch * max_seqlen, heads, dim).index_select(0, slots)


def key_padding_mask(cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """[batch, 1, 1, max_seqlen] bool, True at a sentence's real tokens (broadcasts over heads and queries)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    keep = torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None]
    return keep[:, None, None, :]


def math_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    """The reference: explicit softmax attention in float32 on the padded batch, masked per sentence."""
    slots, batch = padding_slots(cu_seqlens, max_seqlen), len(cu_seqlens) - 1
    q, k, v = (pad(x.float(), slots, batch, max_seqlen) for x in (q, k, v))  # [batch, heads, L, dim]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [batch, heads, L, L]
    scores = scores.masked_fill(~key_padding_mask(cu_seqlens, max_seqlen), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return unpad(probs @ v, slots)


def sdpa_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    """torch's fused attention. It wants rectangles [batch, heads, length, dim]:
    - on the CPU, each run of consecutive, equally long sentences already is one inside the packed tensor, so
      when a batch has few runs (encode sorts by length: a batch holds a handful), SDPA is called once per run
      on a view: nothing padded or copied (in inference the keys are read a little past each sentence's end,
      masked out, because the kernel is fastest at key lengths in multiples of 16);
    - otherwise (random training batches with many lengths, or CUDA without Triton), many small calls would
      cost more than padding: pad around one call.
    """
    if q.device.type == "cpu":
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        runs = [(length, len(list(run))) for length, run in itertools.groupby(lengths)]
        if len(runs) <= max(1, len(lengths) // 4):
            return _sdpa_per_length_run(q, k, v, runs, dropout_p)
    return _sdpa_padded(q, k, v, cu_seqlens, max_seqlen, dropout_p)


def _sdpa_padded(q, k, v, cu_seqlens, max_seqlen, dropout_p):
    slots, batch = padding_slots(cu_seqlens, max_seqlen), len(cu_seqlens) - 1
    q, k, v = (pad(x, slots, batch, max_seqlen) for x in (q, k, v))  # [batch, heads, L, dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask(cu_seqlens, max_seqlen),
                                         dropout_p=dropout_p)
    return unpad(out, slots)


def _sdpa_per_length_run(q, k, v, runs, dropout_p=0.0):
    """runs: [(length, number of consecutive sentences that long)] in packing order."""
    heads, head_dim = q.shape[1:]
    total = q.shape[0]
    # The CPU flash kernel runs keys in blocks of 16 and takes a slow path for the rest: a length of 14 costs
    # twice what 16 does. In inference, the keys and values of a run are read as rows of the padded length
    # straight from the packed tensor (each sentence's extra rows are the next sentence's, masked out): no copy.
    # Not under autograd, whose backward of such an overlapping view would be slow; not in fp16, where a
    # neighbour's overflowed (infinite) key would turn the masked score into NaN instead of nothing.
    stretch = (q.device.type == "cpu" and q.dtype != torch.float16 and dropout_p == 0
               and not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)))
    outputs, start = [], 0
    for length, count in runs:
        end = start + count * length
        query = q[start:end].view(count, length, heads, head_dim).transpose(1, 2)  # [count, heads, length, dim]
        padded = -(-length // KEY_BLOCK) * KEY_BLOCK
        # Sentences whose padded key rows stay inside the packed tensor (the last of the batch may not).
        stretched = 0
        if stretch and padded != length:
            stretched = max(0, min(count, (total - start - padded) // length + 1))
        if stretched:
            keys, values = (x[start:].as_strided((stretched, heads, padded, head_dim),
                                                  (length * x.stride(0), x.stride(1), x.stride(0), x.stride(2)))
                            for x in (k, v))  # [stretched, heads, padded, dim]
            mask = q.new_zeros(1, padded)
            mask[:, length:] = float("-inf")
            outputs.append(F.scaled_dot_product_attention(query[:stretched], keys, values, attn_mask=mask)
                           .transpose(1, 2).reshape(stretched * length, heads, head_dim))
        if stretched < count:
            keys, values = (x[start:end].view(count, length, heads, head_dim)[stretched:].transpose(1, 2)
                            for x in (k, v))
            out = F.scaled_dot_product_attention(query[stretched:], keys, values, dropout_p=dropout_p)
            outputs.append(out.transpose(1, 2).reshape((count - stretched) * length, heads, head_dim))
        start = end
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


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
