"""Training objectives over sentence embeddings, one file each; `LOSSES` maps train.py's --loss names to them.

Each loss class declares the data it reads, and train.py builds batches from these declarations alone (it names
no loss), so adding a loss is one file here plus one line in LOSSES:
  text_columns        the layouts of text columns it accepts, in order of preference: (("anchor", "positive"),)
  extra_text_columns  a prefix of further text columns read when present ("negative": negative, negative_2, ...)
  label               None (no label), "score" (a float column `score`) or "class" (an int column `label`)
  score_range         for "score": (low, high) of the scores it can learn from, None for any finite score
  num_classes(params) for "class": how many labels (0..n-1) it takes under its --loss-params
  in_batch_negatives  the other rows of a batch are its negatives: a batch needs 2 rows or more
  needs_unique_texts(params)  for in_batch_negatives: whether a batch must hold no text twice (a duplicate would
                      be scored as its own negative) because the loss does not mask duplicates itself
A loss without a label also takes scored pairs (sentence1, sentence2[, score]): those scoring at least
--min-score fill its first two text columns.
"""

from losses.cached_mnrl import CachedMultipleNegativesRankingLoss
from losses.cosent import CoSENTLoss
from losses.cosine import CosineSimilarityLoss
from losses.mnrl import MultipleNegativesRankingLoss
from losses.softmax import SoftmaxLoss

LOSSES = {
    "mnrl": MultipleNegativesRankingLoss,
    "cached-mnrl": CachedMultipleNegativesRankingLoss,
    "cosine": CosineSimilarityLoss,
    "cosent": CoSENTLoss,
    "softmax": SoftmaxLoss,
}

__all__ = ["LOSSES", "MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "CosineSimilarityLoss",
           "CoSENTLoss", "SoftmaxLoss"]
