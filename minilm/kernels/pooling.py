"""Masked mean pooling and L2 normalization in one pass over the packed tokens, in Triton.

tokens: [total_tokens, dim]; cu_seqlens: int32 [batch + 1]. One program per sentence sums its tokens in blocks,
divides by the length and (optionally) by the vector's norm, reading each token once: total_tokens * dim * bytes
read, batch * dim written. The backward pass spreads each sentence's gradient evenly over its tokens.
"""

import torch
import triton
import triton.language as tl

EPSILON = tl.constexpr(1e-12)  # as torch.nn.functional.normalize: norms below it are clamped (a constexpr:
# compiled Triton reads no other module globals; the interpreter did not catch it)


@triton.jit
def _sentence(cu_seqlens, dim, BLOCK_D: tl.constexpr):
    """This program's sentence: its index, first token, length, and the feature columns (with their mask)."""
    sequence = tl.program_id(0)
    start = tl.load(cu_seqlens + sequence)
    length = tl.load(cu_seqlens + sequence + 1) - start
    dims = tl.arange(0, BLOCK_D)
    return sequence, start, length, dims, dims < dim


@triton.jit
def _pool_forward(Tokens, Out, Norm, cu_seqlens, dim, stride_t,
                  NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    sequence, start, length, dims, dim_ok = _sentence(cu_seqlens, dim, BLOCK_D)
    total = tl.zeros([BLOCK_D], tl.float32)
    for block_start in range(0, length, BLOCK_T):
        rows = block_start + tl.arange(0, BLOCK_T)
        ok = (rows < length)[:, None] & dim_ok[None, :]
        block = tl.load(Tokens + (start + rows)[:, None] * stride_t + dims[None, :], mask=ok, other=0.0)
        total += tl.sum(block.to(tl.float32), 0)
    mean = total / length
    norm = tl.maximum(tl.sqrt(tl.sum(mean * mean, 0)), EPSILON)
    out = mean / norm if NORMALIZE else mean
    tl.store(Out + sequence * dim + dims, out.to(Out.dtype.element_ty), mask=dim_ok)
    tl.store(Norm + sequence, norm)


@triton.jit
def _pool_backward(dOut, Out, Norm, dTokens, cu_seqlens, dim, stride_t,
                   NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    sequence, start, length, dims, dim_ok = _sentence(cu_seqlens, dim, BLOCK_D)
    d_out = tl.load(dOut + sequence * dim + dims, mask=dim_ok, other=0.0).to(tl.float32)
    if NORMALIZE:
        # y = m / |m|  =>  dm = (dy - y * <dy, y>) / |m|   (with the clamped norm, as F.normalize)
        out = tl.load(Out + sequence * dim + dims, mask=dim_ok, other=0.0).to(tl.float32)
        norm = tl.load(Norm + sequence)
        d_mean = (d_out - out * tl.sum(d_out * out, 0)) / norm
        d_mean = tl.where(norm > EPSILON, d_mean, d_out / EPSILON)
    else:
        d_mean = d_out
    d_token = d_mean / length
    for block_start in range(0, length, BLOCK_T):
        rows = block_start + tl.arange(0, BLOCK_T)
        ok = (rows < length)[:, None] & dim_ok[None, :]
        values = tl.zeros([BLOCK_T, BLOCK_D], tl.float32) + d_token[None, :]
        tl.store(dTokens + (start + rows)[:, None] * stride_t + dims[None, :],
                 values.to(dTokens.dtype.element_ty), mask=ok)


BLOCK_T = 16  # tokens per block of the loop over a sentence


def launch_constexprs(dim: int, normalize: bool) -> dict:
    """The compile-time constants each kernel here is launched with, by kernel name (the launcher below and
    tests/test_kernels_compile.py both call this, so what is compiled there is what runs here)."""
    blocks = {"NORMALIZE": bool(normalize), "BLOCK_T": BLOCK_T, "BLOCK_D": triton.next_power_of_2(dim)}
    return {"_pool_forward": blocks, "_pool_backward": blocks}


class FusedMeanPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, cu_seqlens, normalize):
        tokens = tokens.contiguous()
        batch, dim = len(cu_seqlens) - 1, tokens.shape[1]
        out = torch.empty(batch, dim, device=tokens.device, dtype=tokens.dtype)
        norm = torch.empty(batch, device=tokens.device, dtype=torch.float32)
        _pool_forward[(batch,)](tokens, out, norm, cu_seqlens, dim, tokens.stride(0),
                                **launch_constexprs(dim, normalize)["_pool_forward"])
        ctx.save_for_backward(out, norm, cu_seqlens)
        ctx.normalize, ctx.total = normalize, tokens.shape[0]
        return out

    @staticmethod
    def backward(ctx, d_out):
        out, norm, cu_seqlens = ctx.saved_tensors
        batch, dim = out.shape
        d_tokens = torch.empty(ctx.total, dim, device=out.device, dtype=out.dtype)
        _pool_backward[(batch,)](d_out.contiguous(), out, norm, d_tokens, cu_seqlens, dim, d_tokens.stride(0),
                                 **launch_constexprs(dim, ctx.normalize)["_pool_backward"])
        return d_tokens, None, None


def fused_mean_pool(tokens, cu_seqlens, normalize: bool):
    """Mean of each sentence's tokens, L2-normalized if asked. [total_tokens, dim] -> [batch, dim]."""
    return FusedMeanPool.apply(tokens, cu_seqlens.to(torch.int32), bool(normalize))


def mean_pool_reference(tokens, cu_seqlens, normalize: bool):
    """The plain computation the kernel must equal: one sentence at a time."""
    bounds = cu_seqlens.tolist()
    means = torch.stack([tokens[start:end].float().mean(0) for start, end in zip(bounds[:-1], bounds[1:])])
    means = torch.nn.functional.normalize(means, dim=-1) if normalize else means
    return means.to(tokens.dtype)
