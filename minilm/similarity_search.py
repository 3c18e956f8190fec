"""Exact nearest-neighbour search over sentence embeddings, in chunks so that memory stays bounded, and the
int8 / binary embedding formats it searches.

    indices, scores = minilm.search(query_embeddings, corpus_embeddings, top_k=10)

The corpus may be a float array, a tensor, or a memory-mapped .npy far larger than RAM: it is read
`corpus_chunk` rows at a time, and only the best `top_k` of each query are kept between chunks, so peak extra
memory is about `query_chunk x (corpus_chunk + top_k)` scores plus one chunk in float32 — never the full
query x corpus matrix.

Three corpus formats, told apart by the array's dtype:
- float (float32/float16/...): cosine or dot product, as is.
- int8 codes with `calibration` (per-dimension ranges, see calibrate_int8): each chunk is decoded back to float
  (lo + (code + 128) * (hi - lo) / 255) and scored exactly like a float corpus, so the ranking is the exact one
  of the decoded vectors; queries stay float.
- binary, uint8 of ceil(dim / 8) columns (np.packbits(embeddings > 0, axis=1)): queries are binarized the same
  way and scored by Hamming distance, reported as 1 - 2 * hamming / dim (the cosine of the two +-1 vectors).
  With `rescore=m`, the m * top_k best by Hamming are rescored with the float query against the candidates'
  +-1 vectors (cosine: query . bits / (|query| sqrt(dim)); dot: query . bits), which recovers most of the
  quality binary loses (see benchmarks/bench_corpus.py), at the cost of reading m * top_k rows per query.
"""

import numpy as np
import torch
import torch.nn.functional as F


def _as_float_tensor(rows, device) -> torch.Tensor:
    if not torch.is_tensor(rows):
        rows = np.ascontiguousarray(rows)
        # a read-only memory map: copy the chunk (it is being read anyway) rather than alias read-only memory
        rows = torch.from_numpy(rows if rows.flags.writeable else rows.copy())
    return rows.to(device=device, dtype=torch.float32)


# --- int8 and binary embeddings -------------------------------------------------------------------------------
def calibrate_int8(sample) -> dict:
    """Per-dimension int8 ranges from a sample of float embeddings [n, dim]: {"min": [...], "max": [...], "size": n}.

    The range of a dimension is the sample's min..max, widened where the sample cannot tell (one text, or a
    dimension constant over the sample) to at least a floor: half the median half-range of all dimensions, and
    no less than the standard deviation of all the sample's values. Without the floor, a zero-width range maps
    every later value of that dimension to one code (the int8 collapse of sentence-transformers #2837)."""
    sample = np.asarray(sample, dtype=np.float32)
    if sample.ndim != 2 or sample.shape[0] < 1:
        raise ValueError(f"calibration needs a [n >= 1, dim] array of embeddings, not shape {sample.shape}")
    lo, hi = sample.min(axis=0), sample.max(axis=0)  # [dim]
    center, half = (lo + hi) / 2, (hi - lo) / 2
    floor = max(0.5 * float(np.median(half)), float(sample.std()), 1e-6)
    half = np.maximum(half, np.float32(floor))
    return {"size": int(sample.shape[0]), "min": (center - half).astype(np.float32).tolist(),
            "max": (center + half).astype(np.float32).tolist()}


def _ranges(calibration, dim: int):
    if isinstance(calibration, dict):
        lo, hi = calibration.get("min"), calibration.get("max")
    else:
        lo, hi = calibration
    lo, hi = np.asarray(lo, dtype=np.float32), np.asarray(hi, dtype=np.float32)
    if lo.shape != (dim,) or hi.shape != (dim,) or not (hi > lo).all():
        raise ValueError(f"int8 calibration must give min and max of {dim} values each, with max > min")
    return lo, (hi - lo) / np.float32(255)  # [dim] lowest value, step per code


def quantize_int8(embeddings, calibration) -> np.ndarray:
    """Float [n, dim] -> int8 codes [n, dim]: code = round((x - min) / step) - 128, clipped to [-128, 127]."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    lo, step = _ranges(calibration, embeddings.shape[1])
    codes = np.rint((embeddings - lo) / step) - 128
    return np.clip(codes, -128, 127).astype(np.int8)


def dequantize_int8(codes, calibration) -> np.ndarray:
    """int8 codes [n, dim] -> float32 [n, dim], the middle of each code's interval."""
    codes = np.asarray(codes)
    lo, step = _ranges(calibration, codes.shape[1])
    return lo + (codes.astype(np.float32) + 128) * step


def pack_binary(embeddings) -> np.ndarray:
    """Float [n, dim] -> uint8 [n, ceil(dim / 8)]: one bit per dimension (1 where > 0), 8 per byte."""
    return np.packbits(np.asarray(embeddings) > 0, axis=1)


def unpack_binary(packed, dim: int) -> np.ndarray:
    """uint8 [n, ceil(dim / 8)] -> float32 [n, dim] of +1 / -1."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=dim)
    return bits.astype(np.float32) * 2 - 1


# --- search ---------------------------------------------------------------------------------------------------
def search(queries, corpus_embeddings, top_k: int = 10, similarity: str = "cos", query_chunk: int = 1024,
           corpus_chunk: int = 65536, device=None, calibration=None, rescore=None):
    """Exact top-k of every query over the corpus.

    queries: float [num_queries, dim], or one query [dim] (what encode returns for a string; the result still has
    one row per query); corpus_embeddings: [corpus_size, dim] (numpy, np.memmap or torch; lists work too), or
    int8 codes [corpus_size, dim] with `calibration` ({"min", "max"} per dimension, as in a corpus manifest),
    or packed bits uint8 [corpus_size, ceil(dim / 8)] (see the module docstring).
    similarity: "cos" (cosine) or "dot" (dot product). rescore: binary corpora only, None or a whole number m:
    rescore the m * top_k best by Hamming distance with the float queries.
    Returns (indices [num_queries, k] int64, scores [num_queries, k] float32) as tensors on the CPU, best
    first, k = min(top_k, corpus_size)."""
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be 'cos' or 'dot', not {similarity!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a whole number >= 1, not {top_k!r}")
    queries, corpus_embeddings = (np.asarray(x, dtype=np.float32) if isinstance(x, (list, tuple)) else x
                                  for x in (queries, corpus_embeddings))
    if len(queries.shape) == 1:
        queries = queries[None]  # [dim] -> [1, dim]
    if len(queries.shape) != 2 or len(corpus_embeddings.shape) != 2:
        raise ValueError(f"queries {tuple(queries.shape)} and corpus {tuple(corpus_embeddings.shape)} must be "
                         f"[rows, dim]")
    dim = queries.shape[1]
    kind = _corpus_kind(corpus_embeddings)
    if kind == "binary":
        if corpus_embeddings.shape[1] != (dim + 7) // 8:
            raise ValueError(f"a packed binary corpus of {dim}-d embeddings has {(dim + 7) // 8} uint8 columns, "
                             f"not {corpus_embeddings.shape[1]} (queries {tuple(queries.shape)})")
    elif corpus_embeddings.shape[1] != dim:
        raise ValueError(f"queries {tuple(queries.shape)} and corpus {tuple(corpus_embeddings.shape)} must be "
                         f"[rows, dim] with the same dim")
    if kind == "int8" and calibration is None:
        raise ValueError("an int8 corpus needs its calibration (the per-dimension min and max it was quantized "
                         "with, manifest.json's 'calibration')")
    if rescore is not None and (kind != "binary" or not isinstance(rescore, int) or rescore < 1):
        raise ValueError(f"rescore is for binary corpora and must be a whole number >= 1, not {rescore!r}")
    device = torch.device(device) if device is not None else (
        queries.device if torch.is_tensor(queries) else torch.device("cpu"))
    if kind == "int8":
        lo, step = (torch.from_numpy(x).to(device) for x in _ranges(calibration, dim))
        decode = lambda rows: _as_float_tensor(rows, device) * step + (lo + 128 * step)  # noqa: E731
    elif kind == "binary":
        decode = lambda rows: torch.from_numpy(unpack_binary(rows, dim)).to(device)  # noqa: E731
    else:
        decode = lambda rows: _as_float_tensor(rows, device)  # noqa: E731
    corpus_size = corpus_embeddings.shape[0]
    k = min(top_k, corpus_size)
    keep = min(k * rescore, corpus_size) if rescore else k  # candidates kept between chunks
    all_indices, all_scores = [], []
    for q_start in range(0, queries.shape[0], query_chunk):
        query = _as_float_tensor(queries[q_start:q_start + query_chunk], device)  # [q, dim]
        if kind == "binary":
            scored_query = torch.where(query > 0, 1.0, -1.0) / dim  # agreement / dim = 1 - 2 hamming / dim
        else:
            scored_query = F.normalize(query, dim=-1) if similarity == "cos" else query
        best_scores = torch.empty(query.shape[0], 0, device=device)
        best_indices = torch.empty(query.shape[0], 0, dtype=torch.long, device=device)
        for c_start in range(0, corpus_size, corpus_chunk):
            chunk = decode(corpus_embeddings[c_start:c_start + corpus_chunk])  # [c, dim] float32
            if similarity == "cos" and kind != "binary":
                chunk = F.normalize(chunk, dim=-1)
            chunk_scores = scored_query @ chunk.T  # [q, c]
            chunk_best, chunk_at = chunk_scores.topk(min(keep, chunk.shape[0]), dim=1)
            # Keep the best of (best so far, this chunk's best): [q, <= 2 keep] -> [q, keep]
            scores = torch.cat([best_scores, chunk_best], dim=1)
            indices = torch.cat([best_indices, chunk_at + c_start], dim=1)
            best_scores, at = scores.topk(min(keep, scores.shape[1]), dim=1)
            best_indices = indices.gather(1, at)
        if rescore:
            best_indices, best_scores = _rescore(query, best_indices, corpus_embeddings, dim, k, similarity)
        all_indices.append(best_indices.cpu())
        all_scores.append(best_scores.cpu())
    if not all_indices:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
    return torch.cat(all_indices), torch.cat(all_scores)


def _corpus_kind(corpus) -> str:
    dtype = corpus.dtype
    if dtype in (np.int8, torch.int8):
        return "int8"
    if dtype in (np.uint8, torch.uint8):
        return "binary"
    return "float"


def _rescore(query, candidates, corpus, dim: int, k: int, similarity: str):
    """Float queries [q, dim] against the +-1 vectors of their candidates [q, m] -> the best k of each."""
    rows = np.unique(candidates.cpu().numpy())  # sorted: one forward read of a memory-mapped corpus
    packed = corpus[torch.from_numpy(rows)] if torch.is_tensor(corpus) else corpus[rows]
    signs = torch.from_numpy(unpack_binary(packed.cpu().numpy() if torch.is_tensor(packed) else packed, dim))
    signs = signs.to(query.device)[torch.from_numpy(np.searchsorted(rows, candidates.cpu().numpy())).to(
        query.device)]  # [q, m, dim]
    if similarity == "cos":
        query = F.normalize(query, dim=-1) / dim ** 0.5
    scores = torch.einsum("qd,qmd->qm", query, signs)  # [q, m]
    best, at = scores.topk(k, dim=1)
    return candidates.gather(1, at), best
