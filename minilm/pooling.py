"""Token embeddings of a packed batch -> one vector per sentence, as `1_Pooling/config.json` says.

Every function takes `tokens [total_tokens, dim]` and `cu_seqlens [batch + 1]` and returns `[batch, dim]`.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

# The sentence-transformers mode names, in the order their vectors are concatenated when several are on.
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Older configs switch modes on with one boolean key each.
LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _sequence_ids(cu_seqlens, total_tokens):
    """[total_tokens]: the index of the sentence each token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                   output_size=total_tokens)


def _lengths(cu_seqlens, dtype):
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(dtype).unsqueeze(1)  # [batch, 1]


def _sum(tokens, cu_seqlens, weights=None):
    sequence = _sequence_ids(cu_seqlens, tokens.shape[0])
    values = tokens.float() if weights is None else tokens.float() * weights[:, None]
    return values.new_zeros(len(cu_seqlens) - 1, tokens.shape[1]).index_add_(0, sequence, values)


def cls_pool(tokens, cu_seqlens):
    return tokens[cu_seqlens[:-1].long()]


def lasttoken_pool(tokens, cu_seqlens):
    return tokens[cu_seqlens[1:].long() - 1]


def mean_pool(tokens, cu_seqlens):
    return (_sum(tokens, cu_seqlens) / _lengths(cu_seqlens, torch.float32)).to(tokens.dtype)


def mean_sqrt_len_pool(tokens, cu_seqlens):
    """The sum divided by sqrt(length): longer sentences get longer vectors."""
    return (_sum(tokens, cu_seqlens) / _lengths(cu_seqlens, torch.float32).sqrt()).to(tokens.dtype)


def weightedmean_pool(tokens, cu_seqlens):
    """Mean weighted by position (1, 2, ... n): later tokens count more (as in SGPT)."""
    sequence = _sequence_ids(cu_seqlens, tokens.shape[0])
    weights = (torch.arange(tokens.shape[0], device=tokens.device) - cu_seqlens[:-1].long()[sequence] + 1).float()
    lengths = _lengths(cu_seqlens, torch.float32)
    weight_sums = lengths * (lengths + 1) / 2
    return (_sum(tokens, cu_seqlens, weights) / weight_sums).to(tokens.dtype)


def max_pool(tokens, cu_seqlens):
    sequence = _sequence_ids(cu_seqlens, tokens.shape[0])[:, None].expand_as(tokens)
    start = tokens.new_full((len(cu_seqlens) - 1, tokens.shape[1]), float("-inf"))
    return start.scatter_reduce(0, sequence, tokens, reduce="amax", include_self=True)


POOLERS = {
    "cls": cls_pool,
    "max": max_pool,
    "mean": mean_pool,
    "mean_sqrt_len_tokens": mean_sqrt_len_pool,
    "weightedmean": weightedmean_pool,
    "lasttoken": lasttoken_pool,
}


def read_pooling_config(path) -> tuple:
    """The pooling modes named by a `1_Pooling/config.json`, legacy boolean keys or the `pooling_mode` key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the pooling config {path}: {error}") from None
    if "pooling_mode" in raw:
        modes = raw["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        modes = tuple(mode for key, mode in LEGACY_KEYS.items() if raw.get(key))
    unknown = [mode for mode in modes if mode not in POOLERS]
    if unknown or not modes:
        raise ValueError(f"{path}: pooling mode(s) {unknown or 'none'} not understood; expected some of {MODES}")
    return modes


def pooling_config(modes, dim) -> dict:
    """The legacy-format config that every sentence-transformers version reads."""
    return {"word_embedding_dimension": dim, **{key: mode in modes for key, mode in LEGACY_KEYS.items()},
            "include_prompt": True}


def pool(tokens, cu_seqlens, modes=("mean",), normalize=False, fused=None):
    """Pool each sentence with every mode in `modes` (concatenated in that order), then L2-normalize if asked.

    tokens: [total_tokens, dim]; cu_seqlens: [batch + 1]. -> [batch, len(modes) * dim].
    fused: use the Triton kernel that does mean pooling and normalization in one pass (mean mode only).
    None picks it on CUDA when Triton is installed; the plain code below is its reference.
    """
    if tuple(modes) == ("mean",):
        from minilm import kernels

        if fused if fused is not None else tokens.is_cuda and kernels.available():
            return kernels.fused_mean_pool(tokens, cu_seqlens, normalize)
    pooled = torch.cat([POOLERS[mode](tokens, cu_seqlens) for mode in modes], dim=-1)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
