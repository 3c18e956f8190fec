"""MultipleNegativesRankingLoss: in-batch negatives for (anchor, positive[, negative...]) pairs."""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from losses.params import check_params

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


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """[batch] int64 on each rank -> [world * batch], in rank order (no gradient)."""
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


# Two polynomial hashes of a token sequence, modulo primes below 2**31 so that every product fits in int64.
_HASH_PRIMES = (2147483629, 2147483587)
_HASH_BASES = (1000003, 998244353)
_hash_powers = {}


def _powers(length: int, device) -> torch.Tensor:
    """[2, length]: base**position mod prime, for each of the two hashes (cached, grown as needed)."""
    key = str(device)
    cached = _hash_powers.get(key)
    if cached is None or cached.shape[1] < length:
        size = max(length, 512)
        rows = []
        for prime, base in zip(_HASH_PRIMES, _HASH_BASES):
            row, value = [], 1
            for _ in range(size):
                row.append(value)
                value = value * base % prime
            rows.append(row)
        cached = _hash_powers[key] = torch.tensor(rows, dtype=torch.long, device=device)
    return cached


def text_ids(batch: dict) -> torch.Tensor:
    """A packed batch -> [batch] int64 ids, equal for equal token sequences, different otherwise (with
    probability 1 - ~2**-62 per pair: two independent polynomial hashes mod primes near 2**31).

    The model sees a text only as its token ids, so equal ids mean the same embedding: exactly the candidates
    that must not count as negatives. Computed from the tokens, it needs nothing from the data pipeline and
    is the same on every rank. The reference is exact comparison of the token lists (tests hold them equal)."""
    input_ids, cu_seqlens = batch["input_ids"], batch["cu_seqlens"].long()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)  # [tokens]
    position = torch.arange(len(input_ids), device=input_ids.device) - cu_seqlens[sequence]
    powers = _powers(int(lengths.max()) if len(lengths) else 1, input_ids.device)
    hashes = []
    for row, prime in enumerate(_HASH_PRIMES):
        terms = (input_ids + 1) % prime * powers[row, position] % prime  # [tokens], each < 2**31
        total = torch.zeros(len(lengths), dtype=torch.long, device=input_ids.device).index_add_(0, sequence, terms)
        hashes.append((total + lengths * 7919) % prime)  # sums of <= 2**20 terms stay far below 2**63
    return hashes[0] * _HASH_PRIMES[1] + hashes[1]  # < 2**62


def false_negative_mask(scores: torch.Tensor, targets: torch.Tensor, own_ids: list, candidate_ids, margin) -> torch.Tensor:
    """[B, C] bool, True where candidate j must not count as a negative of query i (never at i's target).

    own_ids: [B] text-id tensors of each query's own texts (itself, its positive); candidate_ids: [C] (None: no
    duplicate masking). A candidate is masked when its text equals one of the query's own texts. margin: also mask
    candidates whose similarity exceeds the positive's minus margin (scores unscaled, no gradient)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if candidate_ids is not None:
        for ids in own_ids:
            mask |= ids[:, None] == candidate_ids[None, :]
    if margin is not None:
        positive = scores.gather(1, targets[:, None])  # [B, 1]
        mask |= scores > positive - margin
    mask[torch.arange(len(targets), device=targets.device), targets] = False
    return mask


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives: each anchor must pick its own positive among every positive (and negative) of the batch.

    For a batch of B (anchor_i, positive_i[, negative_i...]) rows: scores = similarity(anchors, candidates) * scale,
    where candidates are all B positives followed by all hard negatives; loss = cross-entropy with target i for
    anchor i. scale = 1 / temperature (20 = temperature 0.05).

    Inputs: text columns anchor, positive, then optional negative columns; no label column.
    Args: similarity "cos" (default) or "dot"; symmetric: also let every positive pick its anchor among the
    anchors and average the two losses (MultipleNegativesSymmetricRankingLoss); gather_across_devices: under
    torch.distributed, candidates from every rank join each rank's candidates (the global batch).
    False negatives: mask_duplicates (default on; costs a hash of the token ids) leaves out of each anchor's
    softmax every candidate whose text equals the anchor's own positive or the anchor itself (the same text
    twice in a batch would otherwise be pushed away from itself), so that batches need not be sampled without
    duplicates. false_negative_margin (default off): also leave out every candidate scoring above the
    positive's similarity minus this margin (GISTEmbed's absolute margin, with the model as its own guide).
    Paper: Henderson et al. 2017, "Efficient Natural Language Response Suggestion for Smart Reply".
    """

    citation = CITATION

    # What train.py feeds this loss (see losses/__init__.py).
    text_columns = (("anchor", "positive"),)
    extra_text_columns = "negative"  # negative, negative_2, ...: hard negatives, when the data has them
    label = None
    score_range = None
    in_batch_negatives = True
    matryoshka = True  # MatryoshkaLoss may wrap it: its maths reads embeddings of any width

    @staticmethod
    def needs_unique_texts(params: dict) -> bool:
        """Batches need the no-duplicates sampler only when the loss does not mask duplicates itself."""
        return not params.get("mask_duplicates", True)

    def __init__(self, model, scale: float = 20.0, similarity: str = "cos", symmetric: bool = False,
                 gather_across_devices: bool = False, mask_duplicates: bool = True, false_negative_margin=None):
        super().__init__()
        check_params({"scale": scale, "similarity": similarity, "symmetric": symmetric, "gather_across_devices":
                      gather_across_devices, "mask_duplicates": mask_duplicates,
                      "false_negative_margin": false_negative_margin})
        if similarity not in SIMILARITIES:  # the table checks the type; the names are this loss's
            raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)}, not {similarity!r}")
        self.model, self.scale, self.similarity = model, scale, similarity
        self.symmetric, self.gather_across_devices = symmetric, gather_across_devices
        self.mask_duplicates, self.false_negative_margin = mask_duplicates, false_negative_margin

    def forward(self, features: list, labels=None, terms=None) -> torch.Tensor:
        """features: one packed batch per text column. terms: None, or MatryoshkaLoss's terms (the loss at each of
        its dimensions, computed from these embeddings: the columns are embedded once)."""
        embeddings, ids = [self.model(batch) for batch in features], self.text_ids(features)
        if terms is not None:
            return sum(terms(embeddings, labels, ids))
        return self.compute_loss_from_embeddings(embeddings, labels, ids)

    def text_ids(self, features: list):
        """One [B] id tensor per column (see text_ids), or None when duplicates are not masked."""
        return [text_ids(batch) for batch in features] if self.mask_duplicates else None

    def compute_loss_from_embeddings(self, embeddings: list, labels=None, ids=None) -> torch.Tensor:
        """embeddings: [anchors [B, dim], positives [B, dim], negatives [B, dim]...] -> scalar loss.
        ids: None, or one [B] text-id tensor per column (for mask_duplicates)."""
        if len(embeddings) < 2:
            raise ValueError(f"{type(self).__name__} needs anchor and positive columns, got {len(embeddings)} column(s)")
        anchors, candidates = embeddings[0], embeddings[1:]
        gather = (self.gather_across_devices and dist.is_available() and dist.is_initialized()
                  and dist.get_world_size() > 1)
        offset = 0  # where this rank's positives start among the candidates
        candidate_ids = torch.cat(ids[1:]) if ids is not None else None
        if gather:
            candidates = [gather_with_grad(column) for column in candidates]
            offset = dist.get_rank() * anchors.shape[0]
            if ids is not None:
                candidate_ids = torch.cat([gather_ids(column) for column in ids[1:]])
        targets = torch.arange(anchors.shape[0], device=anchors.device) + offset
        similarities = similarity_matrix(anchors, torch.cat(candidates), self.similarity)  # [B, C]
        scores = self._masked(similarities, targets, ids[:2] if ids is not None else None, candidate_ids)
        loss = F.cross_entropy(scores * self.scale, targets)
        if self.symmetric:
            # Each positive also picks its own anchor among all anchors.
            all_anchors = gather_with_grad(anchors) if gather else anchors
            anchor_ids = None
            if ids is not None:
                anchor_ids = gather_ids(ids[0]) if gather else ids[0]
            backward = similarity_matrix(embeddings[1], all_anchors, self.similarity)
            backward = self._masked(backward, targets, ids[1::-1] if ids is not None else None, anchor_ids)
            loss = (loss + F.cross_entropy(backward * self.scale, targets)) / 2
        return loss

    def _masked(self, similarities, targets, own_ids, candidate_ids) -> torch.Tensor:
        """Similarities with false negatives set to -inf (they drop out of the softmax and get no gradient)."""
        if candidate_ids is None and self.false_negative_margin is None:
            return similarities
        mask = false_negative_mask(similarities.detach(), targets, own_ids or [], candidate_ids,
                                   self.false_negative_margin)
        return similarities.masked_fill(mask, float("-inf"))

    def config(self) -> dict:
        return {"scale": self.scale, "similarity_fct": SIMILARITIES[self.similarity],
                "symmetric": self.symmetric, "gather_across_devices": self.gather_across_devices,
                "mask_duplicates": self.mask_duplicates, "false_negative_margin": self.false_negative_margin}
