"""MatryoshkaLoss: train the first k dimensions of the embeddings to work on their own, for several k at once."""

import logging
import math
import numbers

import torch.nn as nn

log = logging.getLogger(__name__)

CITATION = """@misc{kusupati2024matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and Ali Farhadi},
    year={2024},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}"""

# What train.py reads from a loss (losses/__init__.py): a MatryoshkaLoss is fed exactly what its inner loss reads.
DECLARATIONS = ("text_columns", "extra_text_columns", "label", "score_range", "in_batch_negatives",
                "needs_unique_texts", "num_classes")


def check_dims(dims, weights, embedding_dim: int) -> tuple:
    """-> (dims, weights) as tuples; weights None: 1 each. Raises ValueError (one line) for a dimension that is not
    a whole number from 1 to embedding_dim, one given twice, no dimension, or weights that are not one positive
    number per dimension. Any order is accepted: the loss is a sum, and weights pair with dims in the given order."""
    example = [embedding_dim, embedding_dim // 2, embedding_dim // 4]  # the halvings people train
    expected = f"expected whole numbers from 1 to {embedding_dim}, each once, e.g. {example}"
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        raise ValueError(f"matryoshka dims {dims!r}: {expected}")
    dims = tuple(dims)
    if not dims:
        raise ValueError(f"matryoshka dims []: no dimension; {expected}")
    for dim in dims:
        if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"matryoshka dims {list(dims)}: {dim!r} is not a positive whole number; {expected}")
        if dim > embedding_dim:
            raise ValueError(f"matryoshka dims {list(dims)}: {dim} is above the model's embedding size "
                             f"{embedding_dim}; {expected}")
        if dims.count(dim) > 1:
            raise ValueError(f"matryoshka dims {list(dims)}: {dim} is given twice; {expected}")
    if weights is None:
        return tuple(int(dim) for dim in dims), (1,) * len(dims)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise ValueError(f"matryoshka weights {weights!r}: expected a list of {len(dims)} numbers, one per dimension")
    weights = tuple(weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka weights {list(weights)}: {len(weights)} weight(s) for {len(dims)} dimension(s) "
                         f"{list(dims)}; expected one per dimension")
    for weight in weights:
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not (math.isfinite(weight)
                                                                                   and weight > 0):
            raise ValueError(f"matryoshka weights {list(weights)}: {weight!r} is not a number > 0")
    return tuple(int(dim) for dim in dims), weights


class MatryoshkaLoss(nn.Module):
    """The inner loss at each of several embedding sizes, summed with weights:

        loss = sum over k of weight_k * inner(embeddings cut to their first dims[k] dimensions)

    so that the first 256, 128, 64 ... dimensions of an embedding work on their own (`encode(truncate_dim=64)`
    gives a smaller index, searched faster). The columns are embedded once, at full size; each dimension costs one
    evaluation of the inner loss's maths on the cut embeddings (`compute_loss_from_embeddings`) and its backward,
    never another encoder pass. Wrapping CachedMultipleNegativesRankingLoss, each dimension's gradient with respect
    to the cached embeddings is added into the cache, and the mini-batches are embedded again once with the sum.

    Inner losses: those that declare `matryoshka = True` (mnrl, cached-mnrl, cosine, cosent, mse); not SoftmaxLoss,
    whose classifier reads embeddings of one width. With the mse loss, the teacher's embeddings (the labels) are
    cut the same way. A cut embedding is not re-normalized: the losses that score by cosine (mnrl and cached-mnrl
    with similarity "cos", cosine, cosent) normalize inside, so re-normalizing would change nothing, and they equal
    sentence-transformers' MatryoshkaLoss, which re-normalizes; mnrl with similarity "dot" scores the dot product
    of the cut embeddings, and mse compares the cut student with the cut teacher, as `encode(truncate_dim=k)`
    returns both (sentence-transformers re-normalizes the cut there too: its dot product becomes a cosine, and its
    mse compares a unit-length student with a teacher cut but not re-normalized).

    Args: model; loss: the inner loss, built on the same model; dims: the sizes, in any order, each from 1 to the
    model's embedding size, once (include the full size: the full embedding is trained only if it is there);
    weights: one number > 0 per dimension, in the order of dims (default 1 each).
    It reads exactly the data its inner loss reads (text_columns, label, ... are the inner loss's).
    Paper: Kusupati et al. 2022, "Matryoshka Representation Learning".
    """

    def __init__(self, model, loss, dims, weights=None):
        super().__init__()
        if not getattr(loss, "matryoshka", False):
            raise ValueError(f"MatryoshkaLoss cannot wrap {type(loss).__name__}: only a loss whose maths reads "
                             "embeddings of any width (mnrl, cached-mnrl, cosine, cosent, mse), and SoftmaxLoss's "
                             "classifier reads one width")
        if loss.model is not model:
            raise ValueError(f"MatryoshkaLoss: the {type(loss).__name__} given was built on another model")
        self.dims, self.weights = check_dims(dims, weights, model.embedding_dim)
        if model.embedding_dim not in self.dims:
            log.warning("matryoshka dims %s leave out the model's full size %d: the full embedding is not trained "
                        "as such; add %d to train it", list(self.dims), model.embedding_dim, model.embedding_dim)
        self.model = model
        # The inner loss is kept as a plain attribute, not a submodule: its only weights are the model's, registered
        # above once under `model.`, so a checkpoint, the optimizer and DDP see each weight once, by its usual name.
        # (A loss with weights of its own, such as SoftmaxLoss's classifier, is refused above.)
        self.__dict__["loss"] = loss
        for name in DECLARATIONS:
            if hasattr(loss, name):
                self.__dict__[name] = getattr(loss, name)
        self.citation = "\n".join(c for c in (CITATION, getattr(loss, "citation", None)) if c)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "model" and "loss" in self.__dict__:
            # train.py replaces loss_fn.model by the DDP-wrapped model: the inner loss, which runs it, must see it.
            self.loss.model = value

    def forward(self, features: list, labels=None):
        return self.loss(features, labels, terms=self.terms)

    def terms(self, embeddings: list, labels=None, *inputs):
        """The weighted inner loss at each dimension, one at a time (a generator: the cached loss takes each one's
        gradient before the next is built). embeddings: one [B, full dim] tensor per column; labels: the inner
        loss's (mse: [B, full dim] teacher embeddings, cut too); inputs: the inner loss's further arguments."""
        for dim, weight in zip(self.dims, self.weights):
            cut = [embedding[..., :dim] for embedding in embeddings]  # [B, dim] each
            cut_labels = labels[..., :dim] if self.loss.label == "embedding" else labels
            yield weight * self.loss.compute_loss_from_embeddings(cut, cut_labels, *inputs)

    def compute_loss_from_embeddings(self, embeddings: list, labels=None, *inputs):
        """embeddings: one [B, full dim] tensor per column -> scalar: the sum of `terms`."""
        return sum(self.terms(embeddings, labels, *inputs))

    def config(self) -> dict:
        return {"loss": type(self.loss).__name__, "matryoshka_dims": list(self.dims),
                "matryoshka_weights": list(self.weights), "n_dims_per_step": -1}
