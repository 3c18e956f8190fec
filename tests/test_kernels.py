"""The Triton kernels equal their references: random inputs (seeded) in every case, values and gradients.

On a machine without a GPU they run under TRITON_INTERPRET=1 (set in conftest.py), so sizes stay small.
"""

import pytest
import torch

pytest.importorskip("triton")

from minilm import kernels  # noqa: E402

if not kernels.available():
    pytest.skip("Triton can run neither on CUDA nor under its interpreter here", allow_module_level=True)

from minilm.kernels.attention import attention_reference, flash_attention  # noqa: E402
from minilm.kernels.pooling import fused_mean_pool, mean_pool_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its random inputs from the same seed: a failure repeats."""
    torch.manual_seed(0)


def relative_error(got, expected):
    """max |got - expected| over the scale of expected. Inputs are standard normal, so that scale is about 1;
    it is floored at 1 because some gradients are exactly 0 (a length-1 sentence's dq and dk)."""
    got, expected = got.detach().float(), expected.detach().float()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1.0))


def packed(lengths, heads, head_dim, dtype):
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(int(cu_seqlens[-1]), heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
               for _ in range(3))
    return q, k, v, cu_seqlens


@pytest.mark.parametrize("lengths, heads, head_dim", [
    ([1], 2, 32),                       # a length-1 sentence alone
    ([1, 1, 1], 2, 32),                 # several of them
    ([1, 37, 5, 64, 2], 2, 32),         # ragged, crossing block edges
    ([3, 70, 1], 2, 64),                # BERT-base head size
    ([1, 512, 9], 1, 32),               # the longest BERT input, beside a length 1 (fp32 d64's 16-row key
                                        # blocks run in the case above; lengths to 512 at d64 run on the GPU)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flash_attention_forward_and_backward(lengths, heads, head_dim, dtype):
    if dtype != torch.float32 and max(lengths) == 512 and DEVICE == "cpu":
        pytest.skip("half precision at length 512 adds nothing the fp32 case and short bf16 cases do not cover, "
                    "and costs minutes in the interpreter")
    q, k, v, cu_seqlens = packed(lengths, heads, head_dim, dtype)
    grad_out = torch.randn_like(q)
    out = flash_attention(q, k, v, cu_seqlens, max(lengths))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    # The reference in float32 from the same (possibly rounded) inputs.
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    expected = attention_reference(q32, k32, v32, cu_seqlens)
    expected_grads = torch.autograd.grad(expected, (q32, k32, v32), grad_out.float())
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, expected) < TOLERANCE[dtype]
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) < TOLERANCE[dtype] * (5 if dtype != torch.float32 else 1)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mean_pool_forward_and_backward(normalize, dtype):
    lengths = [1, 512] + torch.randint(1, 40, (5,)).tolist()
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    tokens = torch.randn(int(cu_seqlens[-1]), 384, device=DEVICE).to(dtype).requires_grad_()
    grad_out = torch.randn(len(lengths), 384, device=DEVICE)
    out = fused_mean_pool(tokens, cu_seqlens, normalize)
    (grad,) = torch.autograd.grad(out, tokens, grad_out.to(dtype))
    tokens32 = tokens.detach().float().requires_grad_()
    expected = mean_pool_reference(tokens32, cu_seqlens, normalize)
    (expected_grad,) = torch.autograd.grad(expected, tokens32, grad_out)
    assert relative_error(out, expected) < TOLERANCE[dtype]
    assert relative_error(grad, expected_grad) < TOLERANCE[dtype]


def test_attention_backend_triton_matches_math():
    from minilm.attention import attention

    q, k, v, cu_seqlens = packed([4, 17, 1, 33], 3, 32, torch.float32)
    assert relative_error(attention(q, k, v, cu_seqlens, 33, backend="triton"),
                          attention(q, k, v, cu_seqlens, 33, backend="math")) < 1e-5


def test_rejects_unsupported_head_dim():
    q, k, v, cu_seqlens = packed([3], 1, 24, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(q, k, v, cu_seqlens, 3)


@pytest.mark.parametrize("normalize", [False, True])
def test_pool_uses_the_fused_kernel_equal_to_plain_pooling(normalize):
    from minilm.pooling import pool

    lengths = [1, 9, 30]
    cu_seqlens = torch.tensor([0, 1, 10, 40], dtype=torch.int32, device=DEVICE)
    tokens = torch.randn(40, 384, device=DEVICE)
    fused = pool(tokens, cu_seqlens, ("mean",), normalize, backend="triton")
    plain = pool(tokens, cu_seqlens, ("mean",), normalize, backend="plain")
    assert fused.shape == (len(lengths), 384)
    assert relative_error(fused, plain) < 1e-5


def test_real_model_with_triton_backend_equals_sentence_transformers(model):
    """The encoder with the fused kernel reproduces the reference embeddings. The interpreter runs every program
    in Python (the longest sentences cost most), so on a CPU this checks a slice of the fixture: the longest
    sentence of at most 100 tokens (several query and key blocks), a few short ones and a few of middle length, in
    one ragged batch; the kernel tests above cover lengths up to 512 on random inputs."""
    import numpy as np
    from pathlib import Path

    data = np.load(Path(__file__).parent / "fixtures" / "reference_embeddings.npz")
    sentences = [str(s) for s in data["sentences"]]
    lengths = [len(ids) for ids in model.tokenizer.encode_ids(sentences)]
    order = np.argsort(lengths)
    long_one = max((i for i in order if lengths[i] <= 100), key=lambda i: lengths[i])
    chosen = sorted([long_one] + order[:2].tolist() + order[len(order) // 2:][:2].tolist())
    model.backends = {"attention": "triton"}
    try:
        got = model.encode([sentences[i] for i in chosen], batch_size=8)
    finally:
        model.backends = None
    assert np.abs(got - data["embeddings"][chosen]).max() < 1e-5
