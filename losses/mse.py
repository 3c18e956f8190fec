"""MSELoss: distillation, the student's embedding of a text trained toward the teacher's embedding of it."""

import torch
import torch.nn as nn
import torch.nn.functional as F

CITATION = """@inproceedings{reimers-2020-multilingual-sentence-bert,
    title = "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation",
    author = "Reimers, Nils and Gurevych, Iryna",
    booktitle = "Proceedings of the 2020 Conference on Empirical Methods in Natural Language Processing",
    month = "11",
    year = "2020",
    publisher = "Association for Computational Linguistics",
    url = "https://arxiv.org/abs/2004.09813",
}"""


class MSELoss(nn.Module):
    """Mean squared error between the student's embeddings and the teacher's, over every element of the batch:

        loss = mean over rows i and dimensions d of (student_i,d - teacher_i,d) ** 2

    (sentence-transformers' MSELoss, which is torch's mse_loss with its mean reduction.) The teacher's embeddings
    are computed once, before training (minilm/distillation.py's teacher_embeddings), and arrive as the labels;
    they must have the student's size (no projection). A student made of some of the teacher's layers
    (distillation.student_from_layers) starts close to the teacher and learns to match it with fewer layers.

    Inputs: one text column (text, or sentence); label: the teacher's embedding of that text, [B, dim] float.
    Paper: Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
    Distillation".
    """

    citation = CITATION

    # What train.py feeds this loss (see losses/__init__.py): texts one per row, each with its teacher embedding.
    text_columns = (("text",), ("sentence",))
    extra_text_columns = None
    label = "embedding"
    score_range = None
    in_batch_negatives = False
    matryoshka = True  # MatryoshkaLoss may wrap it (it cuts the teacher's embeddings as the student's)

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
        """embeddings: [student [B, dim]]; labels: teacher [B, dim] -> scalar."""
        if len(embeddings) != 1:
            raise ValueError(f"MSELoss reads one text column, got {len(embeddings)}")
        student = embeddings[0]
        if labels is None or labels.shape != student.shape:
            got = "no teacher embeddings" if labels is None else f"teacher embeddings of shape {tuple(labels.shape)}"
            raise ValueError(f"MSELoss: {got} for student embeddings of shape {tuple(student.shape)}; expected one "
                             "teacher embedding of the student's size per row")
        return F.mse_loss(student, labels.to(student.dtype))

    def config(self) -> dict:
        return {"projection_dim": None}
