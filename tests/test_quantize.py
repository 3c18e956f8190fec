"""minilm/quantize.py: Int8Linear against nn.Linear, and the swap that puts it in place of every Linear."""

import copy
import logging

import pytest
import torch
import torch.nn as nn

from minilm.encoder import BertConfig, BertEncoder
from minilm import cpu, quantize
from minilm.quantize import Int8Linear, int8_linear_reference, keep_qkv_float, quantize_linears, quantize_rows

# The weights' step here: +-127, or +-64 where the CPU's int8 products are summed in 16 bits (no VNNI / AMX:
# minilm/cpu.py, int8_sums_saturate); the tolerances below were measured at +-127 and grow with the step.
COARSER = quantize.QMAX / quantize.weight_qmax("cpu")
# max |int8 - float| / max |float| of a Linear's output on standard-normal inputs and nn.Linear's initial
# weights: 0.8e-2 to 1.1e-2 measured (8-bit steps of each row's and each channel's range; 1.0e-2 to 1.2e-2 at +-64)
RELATIVE_TOLERANCE = 3e-2 * COARSER
# 1 - cosine of int8 vs fp32 encode on the real weights (all but q/k/v in int8): 1.8e-3 measured
INT8_ENCODE_TOLERANCE = 6e-3 * COARSER ** 2


def relative_error(got, expected):
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


SHAPES = [
    (1, 384, 1152, True),      # one token: fewer rows than torch._int_mm takes, padded
    (16, 384, 384, True),      # the edge of that padding
    (300, 1536, 384, True),    # an FFN output
    (33, 64, 40, False),       # no bias, sizes that are not multiples of anything
]
NO_ONEDNN_INT8 = ("Int8Linear runs torch._int_mm here: oneDNN's int8 linear (torch.ops.onednn.qlinear_pointwise) "
                  "runs where torch has it and the CPU has amx_int8")
needs_onednn_int8 = pytest.mark.skipif(not cpu.onednn_int8_runs_here(), reason=NO_ONEDNN_INT8)


@pytest.mark.parametrize("path", ["onednn", "reference"])
@pytest.mark.parametrize("rows, in_features, out_features, bias", SHAPES)
def test_int8_linear_is_close_to_linear(rows, in_features, out_features, bias, path):
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(rows, in_features)
    quantized = Int8Linear.from_linear(linear)
    if path == "reference":
        quantized.packed = None  # what runs where this torch has no oneDNN int8 linear: torch._int_mm
    elif quantized.packed is None:
        pytest.skip(NO_ONEDNN_INT8)
    got = quantized(x)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    error = relative_error(got, linear(x).detach())
    assert 1e-4 < error < RELATIVE_TOLERANCE  # above 1e-4: it really ran in int8


@pytest.mark.parametrize("path", ["onednn", "reference"])
def test_int8_sums_are_exact_on_every_cpu(path):
    """The int32 sums of int8 products are exact: with VNNI/AMX natively; without them, where pairs of products
    are added in 16 bits, because the weights are kept within +-64 (unchecked, 0.15 relative error). Run under
    ONEDNN_MAX_CPU_ISA=AVX2 or =AVX512_CORE to see the second case on a CPU that has them."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 48)
    with torch.no_grad():
        linear.weight[0] = 1.0  # the worst case: a row of equal weights, against a token of equal activations
    x = torch.randn(40, 256)
    x[0] = 3.0
    quantized = Int8Linear.from_linear(linear)
    if path == "reference":
        quantized.packed = None
    elif quantized.packed is None:
        pytest.skip(NO_ONEDNN_INT8)
    q, scale = quantize_rows(x)
    assert int(quantized.weight_t.abs().max()) == quantize.weight_qmax("cpu")
    exact = (q.double() @ quantized.weight_t.double()) * scale.double() * quantized.weight_scale.double()
    exact += linear.bias.detach().double()
    eps = torch.finfo(torch.float32).eps  # three float32 roundings of each output, none of the sums
    torch.testing.assert_close(quantized(x).double(), exact, rtol=8 * eps, atol=8 * eps * float(exact.abs().max()))


def test_weights_are_kept_within_64_where_int8_sums_saturate(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "int8_sums_saturate", lambda: True)
    monkeypatch.setattr(quantize, "_logged", set())
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with caplog.at_level(logging.WARNING, logger="minilm.quantize"):
        coarse, again = Int8Linear.from_linear(linear), Int8Linear.from_linear(linear)
    assert int(coarse.weight_t.abs().max()) == quantize.WEIGHT_QMAX_SATURATING == 64
    torch.testing.assert_close(coarse.weight_t.float() * coarse.weight_scale, linear.weight.detach().t(),
                               rtol=0, atol=float(coarse.weight_scale.max()) / 2 * 1.001)
    assert len(caplog.records) == 1 and "weights are quantized to +-64, not +-127" in caplog.records[0].getMessage()
    assert quantize.weight_qmax("cuda") == quantize.QMAX  # a GPU's int8 is not this CPU's


def test_int8_linear_shapes_dtypes_and_zero_rows():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    quantized = Int8Linear.from_linear(linear)
    x = torch.randn(2, 20, 64)
    x[0, 3] = 0  # an all-zero token: its output is the bias, not NaN
    out = quantized(x)
    assert out.shape == (2, 20, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 3], linear.bias.detach())
    assert quantized(x.bfloat16()).dtype == torch.bfloat16
    q, scale = quantize_rows(x.reshape(-1, 64))
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert float((q.float() * scale - x.reshape(-1, 64)).abs().max()) <= float(scale.max()) / 2 * 1.001


def tiny_encoder():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertEncoder(config).eval()


def test_quantize_linears_swaps_every_linear_and_stays_close():
    encoder = tiny_encoder()
    linears = [name for name, module in encoder.named_modules() if isinstance(module, nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # qkv, out, ffn_in, ffn_out per layer, and the pooler
    quantized = quantize_linears(copy.deepcopy(encoder))
    assert not [name for name, module in quantized.named_modules() if isinstance(module, nn.Linear)]
    assert sorted(name for name, module in quantized.named_modules() if isinstance(module, Int8Linear)) == \
        sorted(linears)
    ids = torch.randint(0, 100, (23,))
    cu_seqlens = torch.tensor([0, 5, 23], dtype=torch.int32)
    with torch.inference_mode():
        expected, got = encoder(ids, cu_seqlens, 18), quantized(ids, cu_seqlens, 18)
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert 1e-7 < 1 - float(cosine.min()) < 4e-5 * COARSER ** 2  # 1.1e-5 to 1.4e-5 measured (3.3e-5 at +-64)


def test_quantize_linears_skip_keeps_the_named_linears():
    encoder = quantize_linears(tiny_encoder(), skip=lambda name, linear: ".attention." in name)
    kinds = {name: type(module).__name__ for name, module in encoder.named_modules()
             if isinstance(module, (nn.Linear, Int8Linear))}
    assert kinds["layers.0.attention.qkv"] == kinds["layers.1.attention.out"] == "Linear"
    assert kinds["layers.0.ffn_in"] == kinds["layers.1.ffn_out"] == kinds["pooler"] == "Int8Linear"


def test_keep_qkv_float_leaves_only_the_qkv_projections():
    encoder = quantize_linears(tiny_encoder(), skip=keep_qkv_float)
    floats = sorted(name for name, module in encoder.named_modules() if isinstance(module, nn.Linear))
    assert floats == ["layers.0.attention.qkv", "layers.1.attention.qkv"]


def test_encode_int8_precision_swaps_all_but_qkv_and_stays_close(model):
    texts = ["A man is playing a guitar.", "The cat sits on the mat in the sun.", "Stocks fell sharply today.",
             "A woman is slicing an onion with a large kitchen knife.", "Two dogs run across a snowy field."]
    expected = model.encode(texts, convert_to="tensor")
    got = model.encode(texts, convert_to="tensor", precision="int8")
    int8_copy = model._inference_copies[(None, "int8")][1]
    kinds = {name: type(module).__name__ for name, module in int8_copy.named_modules()
             if isinstance(module, (nn.Linear, Int8Linear))}
    assert {kind for name, kind in kinds.items() if name.endswith("attention.qkv")} == {"Linear"}
    assert {kind for name, kind in kinds.items() if not name.endswith("attention.qkv")} == {"Int8Linear"}
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert 1e-6 < 1 - float(cosine.min()) < INT8_ENCODE_TOLERANCE


@needs_onednn_int8
@pytest.mark.parametrize("rows, in_features, out_features, bias", SHAPES)
def test_onednn_int8_path_equals_the_eager_reference(rows, in_features, out_features, bias):
    """The same integers multiplied (int32 sums are exact): only the order of the three float32 scalings differs,
    a few float32 roundings of each output (measured: 1e-7 of the largest output)."""
    torch.manual_seed(rows)
    quantized = Int8Linear.from_linear(nn.Linear(in_features, out_features, bias=bias))
    x = torch.randn(rows, in_features) * torch.rand(rows, 1) * 10  # rows of different ranges: per-token scales
    got = quantized(x)
    expected = int8_linear_reference(x, quantized.weight_t, quantized.weight_scale, quantized.bias)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got, expected, rtol=8 * eps, atol=8 * eps * float(expected.abs().max()))


def test_compiled_quantization_equals_the_eager_one():
    """torch.compile of quantize_rows (one compile, ~2-3 CPU-s, on a tiny shape) gives the same integers and
    scales as the eager passes, and an Int8Linear asking for it gives the eager module's output."""
    compiled = quantize.compiled_quantize_rows()
    assert compiled is quantize.compiled_quantize_rows()  # one compiled function per process
    torch.manual_seed(0)
    x = torch.randn(37, 64) * torch.rand(37, 1)
    x[5] = 0
    with torch.inference_mode():  # as encode runs it
        q, scale = compiled(x)
    expected_q, expected_scale = quantize_rows(x)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)
    linear = nn.Linear(64, 24)
    eager, fused = Int8Linear.from_linear(linear), Int8Linear.from_linear(linear, compile_quantization=True)
    assert fused.quantize is compiled and eager.quantize is quantize_rows
    torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=0)


def test_a_failing_compile_falls_back_to_eager_and_says_so_once(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda function, dynamic: broken)
    monkeypatch.setattr(quantize, "_logged", set())
    fallback = quantize._CompiledOnce(quantize_rows)
    x = torch.randn(20, 16)
    with caplog.at_level(logging.WARNING, logger="minilm.quantize"):
        first, second = fallback(x), fallback(x)
    expected = quantize_rows(x)
    assert all(torch.equal(got, want) for got, want in zip(first + second, expected + expected))
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "torch.compile failed for quantize_rows (RuntimeError: no C++ compiler)" in \
        messages[0] and "runs eagerly" in messages[0]


def test_compiled_code_that_differs_from_eager_is_dropped_and_said_once(monkeypatch, caplog):
    """Wrong generated code (torch 2.13's inductor, AVX2, one thread: quantize_rows's scales) is found on the
    first call, which returns the eager result, as every call after it does."""
    def wrong(x):
        q, scale = quantize_rows(x)
        return q, scale * 2

    monkeypatch.setattr(torch, "compile", lambda function, dynamic: wrong)
    monkeypatch.setattr(quantize, "_logged", set())
    checked = quantize._CompiledOnce(quantize_rows)
    x = torch.randn(20, 16)
    with caplog.at_level(logging.WARNING, logger="minilm.quantize"):
        first, second = checked(x), checked(x)
    expected = quantize_rows(x)
    assert all(torch.equal(got, want) for got, want in zip(first + second, expected + expected))
    assert [record.getMessage() for record in caplog.records] == [
        "torch.compile's quantize_rows differs from the eager function on this CPU (a code generation bug): it "
        "runs eagerly"]
