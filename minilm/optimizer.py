"""The optimizer's two details that sentence-transformers' trainer (the Hugging Face Trainer under it) decides and
a run must match to train as it does: which weights AdamW decays, and which gradients are clipped."""

import torch


def parameter_groups(model, loss_fn, weight_decay: float) -> list:
    """AdamW's parameters: the model's and any weights the loss has (SoftmaxLoss's classifier), in two groups as
    the Hugging Face trainer under sentence-transformers makes them: weight decay on weight matrices and
    embeddings, none on biases and LayerNorm weights."""
    loss_weights = [p for name, p in loss_fn.named_parameters() if not name.startswith("model.")]
    no_decay = {id(p) for module in loss_fn.modules() if isinstance(module, torch.nn.LayerNorm)
                for p in module.parameters()}
    no_decay |= {id(p) for name, p in loss_fn.named_parameters() if name.endswith("bias")}
    parameters = list(model.parameters()) + loss_weights
    return [{"params": [p for p in parameters if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in parameters if id(p) in no_decay], "weight_decay": 0.0}]


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Scale the model's gradients so that their total norm is at most max_norm; returns the norm before.

    The model's own weights only, as in sentence-transformers' trainer (transformers' Trainer clips
    `model.parameters()`): a loss's own weights, SoftmaxLoss's new classifier, neither count in the norm nor are
    scaled, so that a run clips exactly when the reference's does."""
    return torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
