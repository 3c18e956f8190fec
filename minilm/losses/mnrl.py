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


class GatherWithGrad(torch.autograd.Function):
    """all_gather that gradients flow back through.

    Forward: every rank's [batch, dim] stacked into [world * batch, dim], in rank order (every rank must hold
    the same batch size: train.py gives each rank an equal slice of the global batch).
    Backward: each rank's loss puts gradient on every rank's rows, so the gradients of the gathered tensor are
    summed over ranks and each rank keeps its own rows: d(sum of all ranks' losses) / d(its embeddings).
    DDP then averages parameter gradients over ranks: the gradient of the mean loss over the global batch."""

    @staticmethod
    def forward(ctx, embeddings):
        parts = [torch.empty_like(embeddings) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, embeddings.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming gradient is not ours to change
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_with_grad(embeddings: torch.Tensor) -> torch.Tensor:
    """[batch, dim] on each rank -> [world * batch, dim], differentiable (see GatherWithGrad)."""
    return GatherWithGrad.apply(embeddings)


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

    # What train.py feeds this loss (see minilm/losses/__init__.py).
    text_columns = (("anchor", "positive"),)
    extra_text_columns = "negative"  # negative, negative_2, ...: hard negatives, when the data has them
    label = None
    score_range = None
    in_batch_negatives = True

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
