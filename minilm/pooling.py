"""Token embeddings of a packed batch -> one vector per sentence, as `1_Pooling/config.json` says.

Every function takes `tokens [total_tokens, dim]` and `cu_seqlens [batch + 1]` and returns `[batch, dim]`.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from minilm import files
from minilm.errors import InputError
from minilm.packing import lengths, sequence_ids, token_coordinates

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


def _lengths(cu_seqlens):
    return lengths(cu_seqlens).float().unsqueeze(1)  # [batch, 1]


def _sum(tokens, cu_seqlens, weights=None):
    sequence = sequence_ids(cu_seqlens, tokens.shape[0])
    values = tokens.float() if weights is None else tokens.float() * weights[:, None]
    return values.new_zeros(len(cu_seqlens) - 1, tokens.shape[1]).index_add_(0, sequence, values)


def cls_pool(tokens, cu_seqlens):
    return tokens[cu_seqlens[:-1].long()]


def lasttoken_pool(tokens, cu_seqlens):
    return tokens[cu_seqlens[1:].long() - 1]


def mean_pool(tokens, cu_seqlens):
    return (_sum(tokens, cu_seqlens) / _lengths(cu_seqlens)).to(tokens.dtype)


def mean_sqrt_len_pool(tokens, cu_seqlens):
    """The sum divided by sqrt(length): longer sentences get longer vectors."""
    return (_sum(tokens, cu_seqlens) / _lengths(cu_seqlens).sqrt()).to(tokens.dtype)


def weightedmean_pool(tokens, cu_seqlens):
    """Mean weighted by position (1, 2, ... n): later tokens count more (as in SGPT)."""
    _, position = token_coordinates(cu_seqlens)
    weights = (position + 1).float()  # [total_tokens]
    count = _lengths(cu_seqlens)
    weight_sums = count * (count + 1) / 2
    return (_sum(tokens, cu_seqlens, weights) / weight_sums).to(tokens.dtype)


def max_pool(tokens, cu_seqlens):
    sequence = sequence_ids(cu_seqlens, tokens.shape[0])[:, None].expand_as(tokens)
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


def read_pooling_config(path, dim=None) -> tuple:
    """The pooling modes named by a `1_Pooling/config.json`, legacy boolean keys or the `pooling_mode` key.

    dim: the encoder's width, checked against the file's word_embedding_dimension when it gives one."""
    path = Path(path)
    raw = files.read_json(path, "the pooling settings that modules.json names")
    if "pooling_mode" in raw:
        modes = raw["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else modes
        if not isinstance(modes, (list, tuple)) or not all(isinstance(mode, str) for mode in modes):
            raise InputError(f"{path}: field 'pooling_mode' is {raw['pooling_mode']!r}; expected a mode name or a "
                             f"list of them, from {MODES}")
        modes = tuple(modes)
    else:
        for key in LEGACY_KEYS:
            if key in raw and not isinstance(raw[key], bool):
                raise InputError(f"{path}: field {key!r} is {raw[key]!r}; expected true or false")
        modes = tuple(mode for key, mode in LEGACY_KEYS.items() if raw.get(key))
    unknown = [mode for mode in modes if mode not in POOLERS]
    if unknown or not modes:
        raise InputError(f"{path}: pooling mode(s) {unknown or 'none'} not understood; expected some of {MODES}")
    if raw.get("include_prompt", True) is not True:  # sentence-transformers' Pooling(include_prompt=False)
        raise InputError(f"{path}: field 'include_prompt' is {raw['include_prompt']!r}; minilm pools every token, "
                         "a prompt's too (expected true, or no such field)")
    width = raw.get("word_embedding_dimension")
    if dim is not None and width is not None and width != dim:
        raise InputError(f"{path}: field 'word_embedding_dimension' is {width!r}; the encoder's hidden_size is {dim}")
    return modes


def pooling_config(modes, dim) -> dict:
    """The legacy-format config that every sentence-transformers version reads."""
    return {"word_embedding_dimension": dim, **{key: mode in modes for key, mode in LEGACY_KEYS.items()},
            "include_prompt": True}


def pool(tokens, cu_seqlens, modes=("mean",), normalize=False, backend="plain"):
    """Pool each sentence with every mode in `modes` (concatenated in that order), then L2-normalize if asked.

    tokens: [total_tokens, dim]; cu_seqlens: [batch + 1]. -> [batch, len(modes) * dim].
    backend: "plain" for the code above (the reference), or "triton" for the kernel that does mean pooling and
    normalization in one pass (mean mode only); the model passes minilm/fast_paths.py's choice.
    """
    if backend == "triton":
        if tuple(modes) != ("mean",):
            raise InputError(f"the 'triton' pooling backend does mean pooling only, not {tuple(modes)}")
        from minilm import kernels

        return kernels.fused_mean_pool(tokens, cu_seqlens, normalize)
    if backend != "plain":
        raise InputError(f"unknown pooling backend {backend!r}; expected 'plain' or 'triton'")
    pooled = torch.cat([POOLERS[mode](tokens, cu_seqlens) for mode in modes], dim=-1)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
