"""Training objectives over sentence embeddings, one file each; `LOSSES` maps train.py's --loss names to them.

Each loss class declares the data it reads, and train.py builds batches from these declarations alone (it names
no loss), so adding a loss is one file here plus one line in LOSSES:
  text_columns        the layouts of text columns it accepts, in order of preference: (("anchor", "positive"),)
  extra_text_columns  a prefix of further text columns read when present ("negative": negative, negative_2, ...)
  label               None (no label), "score" (a float column `score`), "class" (an int column `label`) or
                      "embedding" (distillation: the teacher's embedding of the row's text, [embedding_dim] float32,
                      never read from the data file: train.py computes it once with the teacher,
                      minilm.distillation.teacher_embeddings, and collates the rows' embeddings as labels [B, dim])
  score_range         for "score": (low, high) of the scores it can learn from, None for any finite score
  num_classes(params) for "class": how many labels (0..n-1) it takes under its --loss-params
  in_batch_negatives  the other rows of a batch are its negatives: a batch needs 2 rows or more
  needs_unique_texts(params)  for in_batch_negatives: whether a batch must hold no text twice (a duplicate would
                      be scored as its own negative) because the loss does not mask duplicates itself
  matryoshka          MatryoshkaLoss may wrap it: its maths reads embeddings of any width (not SoftmaxLoss)
A loss without a label also takes scored pairs (sentence1, sentence2[, score]): those scoring at least
--min-score fill its first two text columns. A loss of one text column with the label "embedding" (mse) takes any
texts: a .txt file (one text per line), or each distinct text of the text columns of the usual files.

A loss declaring `matryoshka` has `forward(features, labels, terms=None)`: it embeds the columns once and returns
compute_loss_from_embeddings(embeddings, labels, ...) or, given MatryoshkaLoss's `terms`, the sum of those terms
(the loss at each Matryoshka dimension) over the same embeddings. MatryoshkaLoss (losses/matryoshka.py) wraps a
built loss, `MatryoshkaLoss(model, loss, dims, weights)`, and carries its inner loss's declarations: it is no
--loss of its own.
"""

import inspect

from losses.cached_mnrl import CachedMultipleNegativesRankingLoss
from losses.cosent import CoSENTLoss
from losses.cosine import CosineSimilarityLoss
from losses.matryoshka import MatryoshkaLoss
from losses.mnrl import MultipleNegativesRankingLoss
from losses.mse import MSELoss
from losses.params import check_params
from losses.softmax import SoftmaxLoss

LOSSES = {
    "mnrl": MultipleNegativesRankingLoss,
    "cached-mnrl": CachedMultipleNegativesRankingLoss,
    "cosine": CosineSimilarityLoss,
    "cosent": CoSENTLoss,
    "softmax": SoftmaxLoss,
    "mse": MSELoss,
}



def check_loss_params(name: str, params: dict) -> None:
    """--loss-params of the --loss `name`, before anything is loaded: the loss's own arguments, by name, and their
    values (losses/params.py). A ValueError says what is wrong (and which parameters the loss takes)."""
    names = [parameter for parameter in inspect.signature(LOSSES[name]).parameters if parameter != "model"]
    if set(params) - set(names):
        raise ValueError(f"the {name} loss takes {', '.join(names) or 'no parameters'}")
    check_params(params)


__all__ = ["LOSSES", "check_loss_params", "MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "CosineSimilarityLoss",
           "CoSENTLoss", "SoftmaxLoss", "MSELoss", "MatryoshkaLoss"]
