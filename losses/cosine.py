"""CosineSimilarityLoss: regress the cosine similarity of a pair onto its score."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class CosineSimilarityLoss(nn.Module):
    """MSE between cos(u, v) and the gold score of each (sentence1, sentence2) pair.

    Inputs: text columns sentence1, sentence2; label column score, a float in 0..1 (STS's 0..5 divided by 5).
    Paper: Reimers & Gurevych 2019, "Sentence-BERT".
    """

    citation = None  # the Sentence-BERT citation, which every card carries already

    # What train.py feeds this loss (see losses/__init__.py). A cosine lies in -1..1: a score outside
    # it (raw STS 0..5, say) cannot be reached, so it is refused rather than trained towards.
    text_columns = (("sentence1", "sentence2"), ("premise", "hypothesis"))
    extra_text_columns = None
    label = "score"
    score_range = (-1.0, 1.0)
    in_batch_negatives = False
    matryoshka = True  # MatryoshkaLoss may wrap it: its maths reads embeddings of any width

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features: list, labels: torch.Tensor, terms=None) -> torch.Tensor:
        """terms: None, or MatryoshkaLoss's terms (the loss at each of its dimensions, from these embeddings)."""
        embeddings = [self.model(batch) for batch in features]
        if terms is not None:
            return sum(terms(embeddings, labels))
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list, labels: torch.Tensor) -> torch.Tensor:
        """embeddings: [u [B, dim], v [B, dim]]; labels: [B] -> scalar."""
        cosine = F.cosine_similarity(embeddings[0], embeddings[1], dim=-1)  # [B]
        return F.mse_loss(cosine, labels.to(cosine.dtype))

    def config(self) -> dict:
        return {"loss_fct": "torch.nn.modules.loss.MSELoss",
                "cos_score_transformation": "torch.nn.modules.linear.Identity"}
