"""Swapping the modules of an inference copy from outside the model, as gpt-fast's quantize.py rewrites Linears.

minilm/onednn.py and minilm/quantize.py use these to put their Linears into encode's private copy of the encoder;
the model keeps one forward per module. A module the user replaced, subclassed, patched or hooked is never
swapped: it keeps running as the user wrote it. This module imports nothing of minilm.
"""

import torch.nn as nn

# The forwards of the modules that swaps replace, as torch defines them (a class-level patch makes a module not plain).
_TORCH_FORWARDS = {cls: cls.forward for cls in (nn.Linear, nn.GELU, nn.ReLU)}


def is_plain(module, cls) -> bool:
    """`module` is exactly a `cls`, running torch's own forward, with no instance-level forward and no hooks."""
    return (type(module) is cls and cls.forward is _TORCH_FORWARDS[cls] and "forward" not in module.__dict__
            and not (module._forward_hooks or module._forward_pre_hooks))


def replace_linears(module: nn.Module, make, skip=lambda name, linear: False) -> nn.Module:
    """Swap every plain nn.Linear child of `module` (recursively, in place) for `make(linear)`, except where
    skip(name, linear) is true; name is the Linear's dotted path in `module`. Returns `module`."""
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            if is_plain(child, nn.Linear) and not skip(full_name, child):
                setattr(parent, name, make(child))
    return module
