"""CPU inference fast path: the encoder's Linear layers through oneDNN, with weights packed once.

torch's CPU `F.linear` re-lays out the weight for the GEMM kernel at every call; with the few hundred tokens of
an encode batch that costs as much as a good part of the multiply itself. oneDNN (bundled with torch) can take
the weight packed once into its own blocked layout, and can apply GELU (or add the residual) inside the matmul
instead of in a separate pass over the output. On the 2-core test machine this takes encode from ~705 to ~750
sentences/s in fp32, and from ~1,540 to ~1,840 in bf16 (where the packing matters most, feeding AMX).

Inference only: the packed weights are copies, do not take gradients, and go stale if the weights change, so
`SentenceEncoder.encode` builds them on its private inference copy of the encoder and rebuilds that copy when a
weight changes. The plain `nn.Linear` path in encoder.py is the reference; tests hold the two equal.
The ops used are torch's own (the ones torch.compile emits for CPU inference), reached through `torch.ops`.
"""

import torch
import torch.nn as nn

# hidden_act -> oneDNN's post-op name and algorithm
FUSED_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                     "relu": ("relu", "")}


def available(device, dtype) -> bool:
    """oneDNN packed linears can run here: a CPU torch build with oneDNN and, for bf16/fp16, CPU support."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        ops._linear_pointwise.binary, ops._reorder_linear_weight  # noqa: B018  (raise if this build lacks them)
        if dtype == torch.bfloat16:
            return bool(ops._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(ops._is_mkldnn_fp16_supported())
        return dtype == torch.float32
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """`linear(x)` (optionally followed by an activation), with the weight packed once for oneDNN.

    x: [tokens, in_features] -> [tokens, out_features], in the weight's dtype."""

    def __init__(self, linear: nn.Linear):
        weight = linear.weight.detach()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # any number of tokens
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def __call__(self, x: torch.Tensor, activation=None, residual=None) -> torch.Tensor:
        """activation: a hidden_act name, applied inside the matmul; residual: [tokens, out_features], added
        inside the matmul (one pass over the output instead of two). Not both."""
        if residual is not None:
            assert activation is None, "oneDNN fuses either an activation or a residual add here, not both"
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        name, algorithm = FUSED_ACTIVATIONS[activation] if activation else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, name, [], algorithm)
