"""Self-attention over the packed layout, behind one function with named backends.

Every sentence of a batch lives in one `[total_tokens, heads, head_dim]` tensor; `cu_seqlens` (int32,
`[batch + 1]`) marks where each sentence starts and ends, and `longest` is its longest sentence (minilm/packing.py).
A token attends only to tokens of its own sentence, and no backend ever attends to (or computes on) padding that
the caller has to mask.

Backends:
- "math":   the plain reference: pad, explicit softmax(q k^T / sqrt(d)) v in float32, unpad.
- "sdpa":   torch's scaled_dot_product_attention: on the CPU once per run of equally long sentences (no
            padding copied) where `sdpa_runs` says that pays, otherwise on a padded copy made only around one call.
- "sdpa_padded": "sdpa", always on a padded copy around one call.
- "triton": the fused flash-attention kernel of `minilm.kernels` (CUDA; CPU only under TRITON_INTERPRET=1).

Which backend runs is decided once per forward, in minilm/fast_paths.py; `attention(..., backend=)` runs the one
it is given. The conversions between the packed and the padded layout are in minilm/packing.py.
"""

import math

import torch
import torch.nn.functional as F

from minilm import fast_paths
from minilm.errors import InputError
from minilm.packing import key_padding_mask, length_runs, pad, padding_slots, unpad

BACKENDS = fast_paths.BACKENDS["attention"]
KEY_BLOCK = 16  # key lengths that the CPU SDPA kernel runs fastest in multiples of (see _sdpa_per_length_run)
# One more SDPA call (views, a dropout mask, an autograd node, the cat) costs about as much as attending a few
# thousand more query-key pairs per head: the measured break-even (2 threads, forward + backward under dropout,
# random lengths) lies between ~4,000 and ~9,000 pairs a call. Taken at the high end, so that near-ties stay padded.
PAIRS_PER_CALL = 8192


def math_attention(q, k, v, cu_seqlens, longest, dropout_p=0.0):
    """The reference: explicit softmax attention in float32 on the padded batch, masked per sentence."""
    slots, batch = padding_slots(cu_seqlens, longest), len(cu_seqlens) - 1
    q, k, v = (pad(x.float(), slots, batch, longest) for x in (q, k, v))  # [batch, heads, L, dim]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [batch, heads, L, L]
    scores = scores.masked_fill(~key_padding_mask(cu_seqlens, longest), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return unpad(probs @ v, slots)


def sdpa_attention(q, k, v, cu_seqlens, longest, dropout_p=0.0):
    """torch's fused attention. It wants rectangles [batch, heads, length, dim]:
    - on the CPU, each run of consecutive, equally long sentences already is one inside the packed tensor, so
      when a batch has few runs (encode sorts by length: a batch holds a handful), SDPA is called once per run
      on a view: nothing padded or copied (in inference the keys are read a little past each sentence's end,
      masked out, because the kernel is fastest at key lengths in multiples of 16);
    - also when padding would waste more than the calls cost: random training batches of long passages;
    - otherwise (random training batches of short sentences of many lengths, or CUDA without Triton), many small
      calls would cost more than padding: pad around one call.
    """
    runs = sdpa_runs(q.device, cu_seqlens)
    if runs is not None:
        return _sdpa_per_length_run(q, k, v, runs, dropout_p)
    return _sdpa_padded(q, k, v, cu_seqlens, longest, dropout_p)


def sdpa_runs(device, cu_seqlens):
    """The "sdpa" layout for one batch: [(length, count)] to call SDPA once per run of equally long sentences, or
    None to pad around one call. CPU only. Runs are taken
    - when there are few of them (encode sorts by length: a batch holds a handful), or
    - when padding would waste more attention than the extra calls cost: padded, every sentence attends over the
      longest one's length (batch x longest^2 query-key pairs per head) instead of its own (sum of length^2).
      Random training batches of long passages (seed card 000: up to 512 tokens, mean ~300) waste most of it, and
      under dropout the CPU runs SDPA's math path, which computes every padded pair: per sentence is ~3x faster
      there (benchmarks/README.md). Batches of short sentences of many lengths stay padded."""
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


def _sdpa_padded(q, k, v, cu_seqlens, longest, dropout_p=0.0):
    slots, batch = padding_slots(cu_seqlens, longest), len(cu_seqlens) - 1
    q, k, v = (pad(x, slots, batch, longest) for x in (q, k, v))  # [batch, heads, L, dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask(cu_seqlens, longest),
                                         dropout_p=dropout_p)
    return unpad(out, slots)


def _sdpa_per_length_run(q, k, v, runs, dropout_p=0.0):
    """runs: [(length, number of consecutive sentences that long)] in packing order."""
    heads, head_dim = q.shape[1:]
    total = q.shape[0]
    # The CPU flash kernel runs keys in blocks of 16 and takes a slow path for the rest: a length of 14 costs
    # more than 16 does (benchmarks/README.md). In inference, the keys and values of a run are read as rows of
    # the padded length straight from the packed tensor (each sentence's extra rows are the next sentence's,
    # masked out): no copy.
    stretch = stretch_keys(q, k, v, dropout_p)
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


def triton_attention(q, k, v, cu_seqlens, longest, dropout_p=0.0):
    from minilm import kernels

    if dropout_p > 0:
        # The kernel keeps no dropout mask; hidden-state dropout still applies everywhere else.
        fast_paths.log_once("the 'triton' attention backend skips dropout on attention probabilities while training")
    return kernels.flash_attention(q, k, v, cu_seqlens, longest)


_IMPLEMENTATIONS = {"math": math_attention, "sdpa": sdpa_attention, "sdpa_padded": _sdpa_padded,
                    "triton": triton_attention}


def attention(q, k, v, cu_seqlens, longest, backend="sdpa", dropout_p=0.0):
    """Softmax attention of every token over the tokens of its own sentence.

    q, k, v: [total_tokens, heads, head_dim]; cu_seqlens: int32 [batch + 1]; longest: the longest sentence's
    length. Returns [total_tokens, heads, head_dim] in q's dtype. backend: one of BACKENDS (the model passes
    minilm/fast_paths.py's choice). dropout_p: dropout on the attention probabilities (training only).
    """
    if backend not in _IMPLEMENTATIONS:
        raise InputError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    return _IMPLEMENTATIONS[backend](q, k, v, cu_seqlens, longest, dropout_p).to(q.dtype)
