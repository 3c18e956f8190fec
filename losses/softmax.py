"""SoftmaxLoss: a linear classifier over (u, v, |u - v|) trained with cross-entropy, as in Sentence-BERT's NLI."""

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from losses.params import check_params
from minilm import files
from minilm.model import pair_features

CLASSIFIER_FILE = "softmax_classifier.safetensors"
CLASSIFIER_CONFIG = "softmax_classifier.json"


class SoftmaxLoss(nn.Module):
    """Cross-entropy of Linear(3 * dim, num_labels) applied to concat(u, v, |u - v|) of each pair.

    Inputs: text columns premise, hypothesis (or sentence1, sentence2); label column label, an int in
    0..num_labels-1 (SICK/NLI: entailment 0, neutral 1, contradiction 2). The classifier is saved beside the
    model (softmax_classifier.safetensors) so eval.py can measure its accuracy.
    Paper: Reimers & Gurevych 2019, "Sentence-BERT".
    """

    citation = None  # the Sentence-BERT citation, which every card carries already

    # What train.py feeds this loss (see losses/__init__.py).
    text_columns = (("premise", "hypothesis"), ("sentence1", "sentence2"))
    extra_text_columns = None
    label = "class"
    score_range = None
    in_batch_negatives = False
    matryoshka = False  # its classifier reads embeddings of one width: MatryoshkaLoss cannot wrap it

    @staticmethod
    def num_classes(params: dict) -> int:
        """The labels this loss accepts under its --loss-params: 0..num_labels-1."""
        return params.get("num_labels", 3)

    def __init__(self, model, num_labels: int = 3, embedding_dim=None):
        super().__init__()
        check_params({"num_labels": num_labels, "embedding_dim": embedding_dim})
        self.model, self.num_labels = model, num_labels
        embedding_dim = embedding_dim or model.embedding_dim
        self.classifier = nn.Linear(3 * embedding_dim, num_labels)

    def forward(self, features: list, labels: torch.Tensor) -> torch.Tensor:
        return self.compute_loss_from_embeddings([self.model(batch) for batch in features], labels)

    def compute_loss_from_embeddings(self, embeddings: list, labels: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(pair_features(embeddings[0], embeddings[1]))  # [B, num_labels]
        return F.cross_entropy(logits, labels)

    def config(self) -> dict:
        return {"num_labels": self.num_labels, "concatenation_sent_rep": True,
                "concatenation_sent_difference": True, "concatenation_sent_multiplication": False}

    def save(self, out_dir) -> None:
        out_dir = Path(out_dir)
        files.save_tensors({k: v.detach().contiguous().cpu() for k, v in self.classifier.state_dict().items()},
                           out_dir / CLASSIFIER_FILE)
        files.write_json(out_dir / CLASSIFIER_CONFIG,
                         {"num_labels": self.num_labels, "in_features": self.classifier.in_features})

    @staticmethod
    def load_classifier(model_dir) -> nn.Linear:
        """The classifier a SoftmaxLoss run saved in model_dir."""
        model_dir = Path(model_dir)
        if not (model_dir / CLASSIFIER_FILE).is_file():
            raise FileNotFoundError(f"no {CLASSIFIER_FILE} in {model_dir}: was this model trained with SoftmaxLoss?")
        config = json.loads((model_dir / CLASSIFIER_CONFIG).read_text())
        classifier = nn.Linear(config["in_features"], config["num_labels"])
        classifier.load_state_dict(load_file(str(model_dir / CLASSIFIER_FILE)))
        return classifier.eval()
