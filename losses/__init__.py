"""Training objectives over sentence embeddings, one file each; `LOSSES` maps train.py's --loss names to them."""

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
