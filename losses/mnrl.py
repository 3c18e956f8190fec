"""MultipleNegativesRankingLoss: in-batch negatives for (anchor, positive[, negative...]) pairs."""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CITATION = """@misc{henderson2017efficient,
    title={Efficient Natural Language Response Suggestion for Smart Reply},
    author={Matthew Henderson and Rami Al-Rfou and Brian Strope and Yun-hsuan Sung and Laszlo Lukacs and Ruiqi Guo and Sanjiv Kumar and Balint Miklos and Ray Kurzweil},
    year={2017},
    eprint={1705.00652},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}"""

SIMILARITIES = {"cos": "cos_sim", "dot": "dot_score"}


def similarity_matrix(a: torch.Tensor, b: torch.Tensor, similarity: str) -> torch.Tensor:
    """[n, dim] x [m, dim] -> [n, m] cosine similarities or dot products."""
    if similarity == "cos":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T


def gather_with_grad(embeddings: torch.Tensor) -> torch.Tensor:
    """Every rank's [batch, dim] stacked into [world * batch, dim], in rank order. The backward pass sends each
    rank the gradient that all ranks' losses put on its rows, so the loss sees the global batch."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(embeddings.contiguous()), dim=0)


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives: each anchor must pick its own positive among every positive (and negative) of the batch.

    For a batch of B (anchor_i, positive_i[, negative_i...]) rows: scores = similarity(anchors, candidates) * scale,
    where candidates are all B positives followed by all hard negatives; loss = cross-entropy with target i for
    anchor i. scale = 1 / temperature (20 = temperature 0.05).

    Inputs: text columns anchor, positive, then optional negative columns; no label column.
    Args: similarity "cos" (default) or "dot"; symmetric: also let every positive pick its anchor among the
    anchors and average the two losses (MultipleNegativesSymmetricRankingLoss); gather_across_devices: under
    torch.distributed, candidates from every rank join each rank's candidates (the global batch).
    Paper: Henderson et al. 2017, "Efficient Natural Language Response Suggestion for Smart Reply".
    """

    citation = CITATION

    def __init__(self, model, scale: float = 20.0, similarity: str = "cos", symmetric: bool = False,
                 gather_across_devices: bool = False):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)}, not {similarity!r}")
        self.model, self.scale, self.similarity = model, scale, similarity
        self.symmetric, self.gather_across_devices = symmetric, gather_across_devices

    def forward(self, features: list, labels=None) -> torch.Tensor:
        return self.compute_loss_from_embeddings([self.model(batch) for batch in features], labels)

    def compute_loss_from_embeddings(self, embeddings: list, labels=None) -> torch.Tensor:
        """embeddings: [anchors [B, dim], positives [B, dim], negatives [B, dim]...] -> scalar loss."""
        if len(embeddings) < 2:
            raise ValueError(f"{type(self).__name__} needs anchor and positive columns, got {len(embeddings)} column(s)")
        anchors, candidates = embeddings[0], embeddings[1:]
        gather = (self.gather_across_devices and dist.is_available() and dist.is_initialized()
                  and dist.get_world_size() > 1)
        offset = 0  # where this rank's positives start among the candidates
        if gather:
            candidates = [gather_with_grad(column) for column in candidates]
            offset = dist.get_rank() * anchors.shape[0]
        targets = torch.arange(anchors.shape[0], device=anchors.device) + offset
        scores = similarity_matrix(anchors, torch.cat(candidates), self.similarity) * self.scale  # [B, C]
        loss = F.cross_entropy(scores, targets)
        if self.symmetric:
            # Each positive also picks its own anchor among all anchors.
            all_anchors = gather_with_grad(anchors) if gather else anchors
            backward_scores = similarity_matrix(embeddings[1], all_anchors, self.similarity) * self.scale
            loss = (loss + F.cross_entropy(backward_scores, targets)) / 2
        return loss

    def config(self) -> dict:
        return {"scale": self.scale, "similarity_fct": SIMILARITIES[self.similarity],
                "symmetric": self.symmetric, "gather_across_devices": self.gather_across_devices}
