"""Flash attention over the packed layout in Triton: forward and backward, no padding anywhere.

q, k, v, out: [total_tokens, heads, head_dim]; cu_seqlens: int32 [batch + 1]. One program handles one block of
queries of one sentence and one head, streaming that sentence's keys in blocks with an online softmax
(FlashAttention, Dao et al. 2022), so the [L, L] score matrix is never stored. The forward pass keeps the
log-sum-exp of every row; the backward pass recomputes the probabilities from it.

FLOPs for sentences of lengths L_i, H heads, head dim D:
  forward  4 * sum(L_i^2) * H * D           (q k^T and p v, 2 FLOPs per multiply-add)
  backward 2.5 x forward                     (recompute q k^T, then dv, dp, dq, dk)

Exponentials run in base 2: scores are scaled by log2(e) / sqrt(D) once, so exp2 replaces exp.
"""

import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def _sequence_and_head(cu_seqlens, HEADS: tl.constexpr):
    """This program's sentence (its first token and its length) and head, from grid axis 1."""
    sequence_head = tl.program_id(1)
    sequence = sequence_head // HEADS
    start = tl.load(cu_seqlens + sequence)
    return start, tl.load(cu_seqlens + sequence + 1) - start, sequence_head % HEADS


@triton.jit
def _tile(start, first, length, head, stride_t, stride_h, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A block of BLOCK tokens of one sentence (from its token `first`) for one head: the token indices, which
    of them are real (inside the sentence), and the [BLOCK, HEAD_DIM] element offsets."""
    tokens = first + tl.arange(0, BLOCK)
    offsets = (start + tokens)[:, None] * stride_t + head * stride_h + tl.arange(0, HEAD_DIM)[None, :]
    return tokens, tokens < length, offsets


@triton.jit
def _load_query_side(Q, dOut, LSE, Delta, start, rows, row_ok, offsets, head, HEADS: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """What the backward pass needs of a block of queries: q, dO, and the log-sum-exp and delta of each row."""
    q = tl.load(Q + offsets, mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    d_out = tl.load(dOut + offsets, mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    lse = tl.load(LSE + (start + rows) * HEADS + head, mask=row_ok, other=0.0)
    delta = tl.load(Delta + (start + rows) * HEADS + head, mask=row_ok, other=0.0)
    return q, d_out, lse, delta


@triton.jit
def _load_key_side(K, V, offsets, col_ok, DOT_DTYPE: tl.constexpr):
    k = tl.load(K + offsets, mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    v = tl.load(V + offsets, mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    return k, v


@triton.jit
def _tile_backward(q, k, v, d_out, lse, delta, row_ok, col_ok, scale_log2, PRECISION: tl.constexpr):
    """Softmax backward on one [BLOCK_M, BLOCK_N] tile of one sentence and head: the probabilities recomputed
    from the saved log-sum-exp, and the gradient of the scores, dS = P * (dP - delta) with dP = dO V^T."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    probs = tl.exp2(scores - lse[:, None])
    probs = tl.where(row_ok[:, None] & col_ok[None, :], probs, 0.0)
    d_probs = tl.dot(d_out, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    return probs, probs * (d_probs - delta[:, None])


@triton.jit
def _forward(Q, K, V, Out, LSE, cu_seqlens, scale_log2, stride_t, stride_h,
             HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    block_m = tl.program_id(0)
    start, length, head = _sequence_and_head(cu_seqlens, HEADS)
    if block_m * BLOCK_M >= length:
        return
    rows, row_ok, offsets = _tile(start, block_m * BLOCK_M, length, head, stride_t, stride_h, BLOCK_M, HEAD_DIM)
    q = tl.load(Q + offsets, mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, D]

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for block_start in range(0, length, BLOCK_N):
        _, col_ok, kv_offsets = _tile(start, block_start, length, head, stride_t, stride_h, BLOCK_N, HEAD_DIM)
        k, v = _load_key_side(K, V, kv_offsets, col_ok, DOT_DTYPE)  # [BLOCK_N, D] each
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probs = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)  # rescales what was summed under the old maximum
        row_sum = row_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    out = acc / row_sum[:, None]
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (start + rows) * HEADS + head, row_max + tl.log2(row_sum), mask=row_ok)


@triton.jit
def _backward_preprocess(Out, dOut, Delta, total, stride_t, stride_h,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O) for every token and head: the softmax backward's correction term."""
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    ok = tokens < total
    offsets = tokens[:, None] * stride_t + head * stride_h + dims[None, :]
    out = tl.load(Out + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
    d_out = tl.load(dOut + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + tokens * HEADS + head, tl.sum(out * d_out, 1), mask=ok)


@triton.jit
def _backward_dk_dv(Q, K, V, dOut, LSE, Delta, dK, dV, cu_seqlens, scale_log2, scale, stride_t, stride_h,
                    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One block of keys: loop over the sentence's query blocks, accumulating dK and dV."""
    block_n = tl.program_id(0)
    start, length, head = _sequence_and_head(cu_seqlens, HEADS)
    if block_n * BLOCK_N >= length:
        return
    _, col_ok, kv_offsets = _tile(start, block_n * BLOCK_N, length, head, stride_t, stride_h, BLOCK_N, HEAD_DIM)
    k, v = _load_key_side(K, V, kv_offsets, col_ok, DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for block_start in range(0, length, BLOCK_M):
        rows, row_ok, q_offsets = _tile(start, block_start, length, head, stride_t, stride_h, BLOCK_M, HEAD_DIM)
        q, d_out, lse, delta = _load_query_side(Q, dOut, LSE, Delta, start, rows, row_ok, q_offsets, head, HEADS,
                                                DOT_DTYPE)
        probs, d_scores = _tile_backward(q, k, v, d_out, lse, delta, row_ok, col_ok, scale_log2, PRECISION)
        dv += tl.dot(tl.trans(probs.to(d_out.dtype)), d_out, input_precision=PRECISION)
        dk += tl.dot(tl.trans(d_scores.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(dK + kv_offsets, (dk * scale).to(dK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dV + kv_offsets, dv.to(dV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _backward_dq(Q, K, V, dOut, LSE, Delta, dQ, cu_seqlens, scale_log2, scale, stride_t, stride_h,
                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One block of queries: loop over the sentence's key blocks, accumulating dQ."""
    block_m = tl.program_id(0)
    start, length, head = _sequence_and_head(cu_seqlens, HEADS)
    if block_m * BLOCK_M >= length:
        return
    rows, row_ok, q_offsets = _tile(start, block_m * BLOCK_M, length, head, stride_t, stride_h, BLOCK_M, HEAD_DIM)
    q, d_out, lse, delta = _load_query_side(Q, dOut, LSE, Delta, start, rows, row_ok, q_offsets, head, HEADS,
                                            DOT_DTYPE)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for block_start in range(0, length, BLOCK_N):
        _, col_ok, kv_offsets = _tile(start, block_start, length, head, stride_t, stride_h, BLOCK_N, HEAD_DIM)
        k, v = _load_key_side(K, V, kv_offsets, col_ok, DOT_DTYPE)
        _, d_scores = _tile_backward(q, k, v, d_out, lse, delta, row_ok, col_ok, scale_log2, PRECISION)
        dq += tl.dot(d_scores.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dQ + q_offsets, (dq * scale).to(dQ.dtype.element_ty), mask=row_ok[:, None])


BLOCK = 32  # queries and keys per tile: MiniLM's sentences are short, and the interpreter likes few programs
PREPROCESS_BLOCK = 64  # tokens per program of _backward_preprocess
HEAD_DIMS = (16, 32, 64, 128)  # the head dims the launcher accepts (tl.arange needs a power of two)


DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def launch_constexprs(dtype, heads: int, head_dim: int, interpreted: bool) -> dict:
    """The compile-time constants each kernel here is launched with, by kernel name, for q's dtype.

    The launcher below and tests/test_kernels_compile.py (which compiles every kernel for real GPUs) both call
    this, so what is compiled there is what runs here.
    """
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"flash_attention supports head dims 16, 32, 64 and 128, not {head_dim}")
    # fp32 inputs keep full fp32 products (no TF32), so the fp32 path matches the reference to rounding.
    # Triton's interpreter (3.9) computes tl.dot of bfloat16 operands wrongly, so there they are widened first.
    fp32 = dtype == torch.float32
    blocks = {"HEADS": heads, "HEAD_DIM": head_dim, "BLOCK_M": BLOCK, "BLOCK_N": BLOCK,
              "PRECISION": "ieee" if fp32 else "tf32", "DOT_DTYPE": tl.float32 if interpreted else DOT_DTYPES[dtype],
              "num_warps": 8 if fp32 else 4}
    # fp32 products take no tensor cores ("ieee"), so their tiles sit in registers as plain fp32: 8 warps share
    # them, and dK/dV's kernel, which holds four [BLOCK_N, D] fp32 tiles, takes 16-row blocks from D=64 on.
    # ptxas (tests/test_kernels_compile.py) reported spills of 0.5 KB to 17 KB per thread with 4 warps and 32 rows.
    key_blocks = {**blocks, "BLOCK_M": 16, "BLOCK_N": 16} if fp32 and head_dim >= 64 else blocks
    return {"_forward": blocks, "_backward_dk_dv": key_blocks, "_backward_dq": blocks,
            "_backward_preprocess": {"HEADS": heads, "HEAD_DIM": head_dim, "BLOCK": PREPROCESS_BLOCK}}


def _launch_constexprs(q) -> dict:
    _, heads, head_dim = q.shape
    return launch_constexprs(q.dtype, heads, head_dim, os.environ.get("TRITON_INTERPRET") == "1")


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, longest):
        q, k, v = (x.contiguous() for x in (q, k, v))
        total, heads, head_dim = q.shape
        constexprs = _launch_constexprs(q)
        out = torch.empty_like(q)
        lse = torch.empty(total, heads, device=q.device, dtype=torch.float32)  # log2-sum-exp2 of each row
        scale = 1 / math.sqrt(head_dim)
        # (query blocks, sentences x heads)
        grid = (triton.cdiv(longest, constexprs["_forward"]["BLOCK_M"]), (len(cu_seqlens) - 1) * heads)
        _forward[grid](q, k, v, out, lse, cu_seqlens, scale * LOG2_E, q.stride(0), q.stride(1),
                       **constexprs["_forward"])
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.longest = longest
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        d_out = d_out.contiguous()
        total, heads, head_dim = q.shape
        scale = 1 / math.sqrt(head_dim)
        constexprs = _launch_constexprs(q)
        delta = torch.empty(total, heads, device=q.device, dtype=torch.float32)
        _backward_preprocess[(triton.cdiv(total, PREPROCESS_BLOCK), heads)](
            out, d_out, delta, total, q.stride(0), q.stride(1), **constexprs["_backward_preprocess"])
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sequences_heads = (len(cu_seqlens) - 1) * heads
        key_blocks = triton.cdiv(ctx.longest, constexprs["_backward_dk_dv"]["BLOCK_N"])
        _backward_dk_dv[(key_blocks, sequences_heads)](q, k, v, d_out, lse, delta, dk, dv, cu_seqlens, scale * LOG2_E,
                                                       scale, q.stride(0), q.stride(1),
                                                       **constexprs["_backward_dk_dv"])
        query_blocks = triton.cdiv(ctx.longest, constexprs["_backward_dq"]["BLOCK_M"])
        _backward_dq[(query_blocks, sequences_heads)](q, k, v, d_out, lse, delta, dq, cu_seqlens, scale * LOG2_E,
                                                      scale, q.stride(0), q.stride(1), **constexprs["_backward_dq"])
        return dq, dk, dv, None, None


def flash_attention(q, k, v, cu_seqlens, longest):
    """Softmax attention within each sentence of a packed batch, fused (see the module docstring).

    q, k, v: [total_tokens, heads, head_dim] float32/bfloat16/float16 on the same device; cu_seqlens: int32
    [batch + 1]. Returns [total_tokens, heads, head_dim] in q's dtype; differentiable in q, k and v.
    """
    return FlashAttention.apply(q, k, v, cu_seqlens.to(torch.int32), int(longest))


def attention_reference(q, k, v, cu_seqlens):
    """The plain computation the kernel must equal: one sentence at a time, explicit softmax in float32."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1).float() for x in (q, k, v))  # [heads, L, D]
        probs = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out
