"""The values the losses' parameters accept: one table, checked by train.py before anything is loaded (so that
--loss-params '{"scale": "x"}' is one line naming the parameter, not a traceback at the first step) and by the
losses' constructors (for code that builds a loss directly)."""

import math
import numbers


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# name -> (check, what is accepted)
RULES = {
    # The similarity is multiplied by it (the losses use logsumexp, stable for any finite product); a temperature t
    # is scale 1/t. Past 10,000 it is a typo, and past float32's range a NaN loss at the first step.
    "scale": (lambda v: _number(v) and 0 < v <= 10_000,
              "a number > 0 and at most 10000 (sentence-transformers uses 20; a temperature t is scale 1/t)"),
    "similarity": (lambda v: isinstance(v, str), "a string"),
    "symmetric": (lambda v: isinstance(v, bool), "true or false"),
    "gather_across_devices": (lambda v: isinstance(v, bool), "true or false"),
    "mask_duplicates": (lambda v: isinstance(v, bool), "true or false"),
    "false_negative_margin": (lambda v: v is None or _number(v), "a number, or null for none"),
    "mini_batch_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "num_labels": (lambda v: _whole(v) and v >= 2, "a whole number >= 2"),
    "embedding_dim": (lambda v: v is None or (_whole(v) and v >= 1), "a whole number >= 1, or null for the model's"),
}


def check_params(params: dict) -> None:
    """Raise ValueError naming the first parameter whose value the table refuses (unknown names pass: the
    loss's signature refuses those)."""
    for name, value in params.items():
        if name in RULES and not RULES[name][0](value):
            raise ValueError(f"{name} is {value!r}; expected {RULES[name][1]}")
