"""Exact nearest-neighbour search over sentence embeddings, in chunks so that memory stays bounded.

    indices, scores = minilm.search(query_embeddings, corpus_embeddings, top_k=10)

The corpus may be a float array, a tensor, or a memory-mapped .npy far larger than RAM: it is read
`corpus_chunk` rows at a time, and only the best `top_k` of each query are kept between chunks, so peak extra
memory is about `query_chunk x (corpus_chunk + top_k)` scores — never the full query x corpus matrix.
"""

import numpy as np
import torch
import torch.nn.functional as F


def _as_float_tensor(rows, device) -> torch.Tensor:
    if not torch.is_tensor(rows):
        rows = torch.from_numpy(np.ascontiguousarray(rows))
    return rows.to(device=device, dtype=torch.float32)


def search(queries, corpus_embeddings, top_k: int = 10, similarity: str = "cos", query_chunk: int = 1024,
           corpus_chunk: int = 65536, device=None):
    """Exact top-k of every query over the corpus.

    queries: [num_queries, dim]; corpus_embeddings: [corpus_size, dim] (numpy, np.memmap or torch).
    similarity: "cos" (cosine) or "dot" (dot product). Returns (indices [num_queries, k] int64,
    scores [num_queries, k] float32) as tensors on the CPU, best first, k = min(top_k, corpus_size)."""
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be 'cos' or 'dot', not {similarity!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a whole number >= 1, not {top_k!r}")
    if len(queries.shape) != 2 or len(corpus_embeddings.shape) != 2 or queries.shape[1] != corpus_embeddings.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and corpus {tuple(corpus_embeddings.shape)} must be "
                         f"[rows, dim] with the same dim")
    device = torch.device(device) if device is not None else (
        queries.device if torch.is_tensor(queries) else torch.device("cpu"))
    corpus_size = corpus_embeddings.shape[0]
    k = min(top_k, corpus_size)
    all_indices, all_scores = [], []
    for q_start in range(0, queries.shape[0], query_chunk):
        query = _as_float_tensor(queries[q_start:q_start + query_chunk], device)  # [q, dim]
        if similarity == "cos":
            query = F.normalize(query, dim=-1)
        best_scores = torch.empty(query.shape[0], 0, device=device)
        best_indices = torch.empty(query.shape[0], 0, dtype=torch.long, device=device)
        for c_start in range(0, corpus_size, corpus_chunk):
            chunk = _as_float_tensor(corpus_embeddings[c_start:c_start + corpus_chunk], device)  # [c, dim]
            if similarity == "cos":
                chunk = F.normalize(chunk, dim=-1)
            chunk_scores = query @ chunk.T  # [q, c]
            chunk_best, chunk_at = chunk_scores.topk(min(k, chunk.shape[0]), dim=1)
            # Keep the best k of (best so far, this chunk's best): [q, <= 2k] -> [q, k]
            scores = torch.cat([best_scores, chunk_best], dim=1)
            indices = torch.cat([best_indices, chunk_at + c_start], dim=1)
            best_scores, at = scores.topk(min(k, scores.shape[1]), dim=1)
            best_indices = indices.gather(1, at)
        all_indices.append(best_indices.cpu())
        all_scores.append(best_scores.cpu())
    if not all_indices:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
    return torch.cat(all_indices), torch.cat(all_scores)
