"""CoSENTLoss: rank the pairs of a batch by cosine similarity in the order of their scores."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses.params import check_params

CITATION = """@article{10531646,
    author={Huang, Xiang and Peng, Hao and Zou, Dongcheng and Liu, Zhiwei and Li, Jianxin and Liu, Kay and Wu, Jia and Su, Jianlin and Yu, Philip S.},
    journal={IEEE/ACM Transactions on Audio, Speech, and Language Processing},
    title={CoSENT: Consistent Sentence Embedding via Similarity Ranking},
    year={2024},
    doi={10.1109/TASLP.2024.3402087}
}"""


class CoSENTLoss(nn.Module):
    """For every two pairs (i, j) and (k, l) of a batch where score_ij > score_kl, penalise cos_kl >= cos_ij:

        loss = log(1 + sum over such (ij, kl) of exp(scale * (cos_kl - cos_ij)))

    Only the order of the scores matters, not their values, so it suits any scale of scores.
    Inputs: text columns sentence1, sentence2; label column score (float).
    Paper: Su 2022 / Huang et al. 2024, "CoSENT: Consistent Sentence Embedding via Similarity Ranking".
    """

    citation = CITATION

    # What train.py feeds this loss (see losses/__init__.py): only the order of scores matters, so any
    # finite score is accepted.
    text_columns = (("sentence1", "sentence2"), ("premise", "hypothesis"))
    extra_text_columns = None
    label = "score"
    score_range = None
    in_batch_negatives = False
    matryoshka = True  # MatryoshkaLoss may wrap it: its maths reads embeddings of any width

    def __init__(self, model, scale: float = 20.0):
        super().__init__()
        check_params({"scale": scale})
        self.model, self.scale = model, scale

    def forward(self, features: list, labels: torch.Tensor, terms=None) -> torch.Tensor:
        """terms: None, or MatryoshkaLoss's terms (the loss at each of its dimensions, from these embeddings)."""
        embeddings = [self.model(batch) for batch in features]
        if terms is not None:
            return sum(terms(embeddings, labels))
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list, labels: torch.Tensor) -> torch.Tensor:
        """embeddings: [u [B, dim], v [B, dim]]; labels: [B] -> scalar."""
        cosine = F.cosine_similarity(embeddings[0], embeddings[1], dim=-1) * self.scale  # [B]
        differences = cosine[None, :] - cosine[:, None]  # [B, B]: entry (a, b) = cos_b - cos_a
        ordered = labels[:, None] > labels[None, :]  # pairs (a, b) where a should score above b
        differences = differences.masked_fill(~ordered, float("-inf")).flatten()
        # log(1 + sum exp(x)) = logsumexp over [0, x...]
        return torch.logsumexp(torch.cat([differences.new_zeros(1), differences]), dim=0)

    def config(self) -> dict:
        return {"scale": self.scale, "similarity_fct": "pairwise_cos_sim"}
