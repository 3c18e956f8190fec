"""One model, one forward: an edit to any part of the model reaches `encode` on every path (every precision, every
Linear and attention backend), and the backends are chosen in one place (minilm/fast_paths.py), once per call,
forcible by name, with every fallback logged once.

A tiny random BERT (2 layers, width 64) is enough: what is tested is which code runs, not the real weights."""

import logging
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import minilm
import minilm.kernels
from minilm import fast_paths, onednn, pooling
from minilm.quantize import Int8Linear
from minilm.encoder import BertConfig, BertEncoder, Embeddings, SelfAttention
from minilm.tokenizer import SentenceTokenizer

TEXTS = ["a short one", "two words", "a somewhat longer sentence with more words in it", "x",
         "another sentence of middling length", "and one more to encode"]
# name -> (precision, Linear backend, attention backend)
PATHS = {
    "fp32-onednn-sdpa": ("fp32", "onednn", "sdpa"),
    "fp32-plain-sdpa": ("fp32", "plain", "sdpa"),
    "fp32-plain-math": ("fp32", "plain", "math"),
    "bf16-onednn-sdpa": ("bf16", "onednn", "sdpa"),
    "bf16-plain-math": ("bf16", "plain", "math"),
    "fp16-onednn-sdpa": ("fp16", "onednn", "sdpa"),
    "fp16-plain-sdpa": ("fp16", "plain", "sdpa"),
    "int8-int8-sdpa": ("int8", "int8", "sdpa"),
}


def skip_unless_runs_here(path):
    precision, linear, _ = PATHS[path]
    dtype = fast_paths.PRECISIONS[precision] or torch.float32
    if linear == "onednn" and not onednn.available("cpu", dtype):
        pytest.skip(f"oneDNN cannot run {precision} on this CPU (it needs {onednn.NEEDS.get(dtype, 'oneDNN')})")


@pytest.fixture(scope="module")
def tiny(model_dir):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    encoder = BertEncoder(config).eval()
    return minilm.SentenceEncoder(encoder, SentenceTokenizer.from_dir(model_dir), ("mean",), normalize=True).eval()


class Scaled(nn.Module):
    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        return self.inner(x) * self.factor


def edit_attention(model, monkeypatch):
    """Class-level, as a user patching the source would: every SelfAttention halves its output."""
    original = SelfAttention.forward
    monkeypatch.setattr(SelfAttention, "forward", lambda self, *args: original(self, *args) * 0.5)
    return monkeypatch.undo


def edit_ffn(model, monkeypatch):
    """A replaced submodule: the first block's FFN output Linear wrapped in a module that negates it."""
    layer = model.encoder.layers[0]
    linear = layer.ffn_out
    layer.ffn_out = Scaled(linear, -1.0)
    return lambda: setattr(layer, "ffn_out", linear)


def edit_layer_norm(model, monkeypatch):
    """In place, as an optimizer step: the first block's attention LayerNorm weight halved."""
    weight = model.encoder.layers[0].attention_norm.weight
    with torch.no_grad():
        weight.mul_(0.5)

    def undo():
        with torch.no_grad():
            weight.mul_(2.0)
    return undo


def edit_embeddings(model, monkeypatch):
    """An instance-level forward override: the embeddings negated."""
    embeddings = model.encoder.embeddings
    embeddings.forward = types.MethodType(lambda self, *args: -Embeddings.forward(self, *args), embeddings)
    return lambda: embeddings.__dict__.pop("forward")


def edit_pooling(model, monkeypatch):
    """The pooling function behind the model's mode replaced: "mean" pools the first token instead."""
    monkeypatch.setitem(pooling.POOLERS, "mean", pooling.cls_pool)
    return monkeypatch.undo


EDITS = {"attention": edit_attention, "ffn": edit_ffn, "layer_norm": edit_layer_norm,
         "embeddings": edit_embeddings, "pooling": edit_pooling}


def encode(model, path):
    precision, linear, attention = PATHS[path]
    model.backends = {"linear": None if precision == "int8" else linear, "attention": attention}
    try:
        assert fast_paths.choose("cpu", precision, model.pooling_modes, model.backends) == fast_paths.Backends(
            linear, attention, "plain")
        return model.encode(TEXTS, batch_size=4, precision=precision)
    finally:
        model.backends = None


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("path", PATHS)
def test_an_edit_reaches_encode_on_every_path(tiny, monkeypatch, path, edit):
    skip_unless_runs_here(path)
    before = encode(tiny, path)
    undo = EDITS[edit](tiny, monkeypatch)
    try:
        edited = encode(tiny, path)
    finally:
        undo()
    after = encode(tiny, path)
    assert np.abs(edited - before).max() > 1e-2, f"the {edit} edit did not reach encode on {path}"
    assert np.abs(after - before).max() < 1e-6, f"undoing the {edit} edit did not restore encode on {path}"


def test_onednn_path_swaps_modules_and_equals_the_plain_path(tiny):
    """The fast path is modules on encode's copy (the model itself keeps nn.Linear), equal to the plain path."""
    skip_unless_runs_here("fp32-onednn-sdpa")
    fast = encode(tiny, "fp32-onednn-sdpa")
    copy = tiny._inference_encoder(None, "onednn")
    assert isinstance(copy.layers[0].ffn_in, onednn.OneDNNLinear) and copy.layers[0].ffn_in.post_op == "gelu"
    assert isinstance(copy.layers[0].activation, nn.Identity)
    assert type(tiny.encoder.layers[0].ffn_in) is nn.Linear and isinstance(tiny.encoder.layers[0].activation, nn.GELU)
    assert np.abs(fast - encode(tiny, "fp32-plain-sdpa")).max() < 1e-6
    # A Linear the user wrapped or overrode keeps running as written: the swap leaves it alone.
    tiny.encoder.layers[1].ffn_in.forward = types.MethodType(nn.Linear.forward, tiny.encoder.layers[1].ffn_in)
    try:
        copy = tiny._inference_encoder(None, "onednn")
        assert type(copy.layers[1].ffn_in) is nn.Linear and isinstance(copy.layers[1].activation, nn.GELU)
    finally:
        del tiny.encoder.layers[1].ffn_in.forward


def test_int8_path_swaps_all_but_qkv_and_the_model_keeps_its_linears(tiny):
    encode(tiny, "int8-int8-sdpa")
    copy = tiny._inference_encoder(None, "int8")
    assert isinstance(copy.layers[0].ffn_in, Int8Linear) and isinstance(copy.layers[1].attention.out, Int8Linear)
    assert type(copy.layers[0].attention.qkv) is nn.Linear  # keep_qkv_float
    assert type(tiny.encoder.layers[0].ffn_in) is nn.Linear


def test_choose_follows_the_table_and_forced_names(monkeypatch):
    for variable in fast_paths.ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    onednn_fp32 = "onednn" if onednn.available("cpu", torch.float32) else "plain"
    assert fast_paths.choose("cpu", "fp32") == fast_paths.Backends(onednn_fp32, "sdpa", "plain")
    assert fast_paths.choose("cpu", "int8").linear == "int8"  # the precision's one Linear backend
    assert fast_paths.choose("cpu", "bf16", training=True).linear == "plain"  # training: the model's own Linears
    monkeypatch.setenv("MINILM_ATTENTION", "math")
    monkeypatch.setenv("MINILM_LINEAR", "plain")
    monkeypatch.setenv("MINILM_POOLING", "plain")
    assert fast_paths.choose("cpu", "fp32") == fast_paths.Backends("plain", "math", "plain")
    assert fast_paths.choose("cpu", "fp32", forced_names={"attention": "sdpa_padded"}).attention == "sdpa_padded"
    assert fast_paths.choose("cpu", "int8").linear == "int8"  # a forced linear backend is for the float precisions
    monkeypatch.setenv("MINILM_ATTENTION", "flash")
    with pytest.raises(minilm.InputError, match=r"unknown attention backend 'flash' \(from \$MINILM_ATTENTION\)"):
        fast_paths.choose("cpu", "fp32")
    monkeypatch.setenv("MINILM_ATTENTION", "math")
    monkeypatch.setenv("MINILM_LINEAR", "int8")  # a precision, not a backend to force: refused before any work
    with pytest.raises(minilm.InputError, match=r"'int8' \(from \$MINILM_LINEAR\) is chosen by the precision"):
        fast_paths.check_environment()


@pytest.mark.parametrize("forced, message", [
    ({"attention": "flash"}, "unknown attention backend 'flash'; expected one of ('math', 'sdpa'"),
    ({"linear": "int4"}, "unknown linear backend 'int4'"),
    ({"pooling": "fused"}, "unknown pooling backend 'fused'"),
    ({"attention_backend": "math"}, "unknown piece 'attention_backend'; expected some of ('linear', 'attention'"),
    ("math", "backends must be None, a dict"),
    ({"linear": "int8"}, "linear backend 'int8' is chosen by the precision (encode(precision='int8')"),
])
def test_a_bad_forced_name_is_one_line(tiny, forced, message):
    with pytest.raises(minilm.InputError) as error:
        tiny.backends = forced
        tiny.encode("x")
    tiny.backends = None
    assert message in str(error.value) and "\n" not in str(error.value)


def test_backends_are_chosen_once_per_call(tiny, monkeypatch):
    """One decision per encode call (however many batches and layers) and one per training forward; the layers
    run the name they are handed."""
    calls, ran = [], []
    choose = fast_paths.choose
    monkeypatch.setattr(fast_paths, "choose", lambda *args, **kwargs: calls.append(kwargs) or choose(*args, **kwargs))
    implementations = dict(minilm.attention._IMPLEMENTATIONS)
    for name, function in implementations.items():
        monkeypatch.setitem(minilm.attention._IMPLEMENTATIONS, name,
                            lambda *args, name=name, function=function: ran.append(name) or function(*args))
    tiny.encode(TEXTS, batch_size=2, token_budget=False)  # 3 batches x 2 layers
    assert len(calls) == 1 and ran == ["sdpa"] * 6
    tiny(tiny.tokenize(TEXTS[:2]))
    assert len(calls) == 2 and calls[1] == {"training": True}


def test_encode_runs_the_attention_backend_the_environment_names(tiny, monkeypatch):
    seen = []
    implementations = dict(minilm.attention._IMPLEMENTATIONS)
    for name, function in implementations.items():
        monkeypatch.setitem(minilm.attention._IMPLEMENTATIONS, name,
                            lambda *args, name=name, function=function: seen.append(name) or function(*args))
    monkeypatch.setenv("MINILM_ATTENTION", "sdpa_padded")
    tiny.encode(TEXTS[:2])
    assert set(seen) == {"sdpa_padded"}


def test_a_fallback_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(fast_paths, "_logged", set())
    monkeypatch.setattr(onednn, "available", lambda device, dtype: False)
    if not minilm.kernels.available():
        pytest.skip("the forced 'triton' pooling backend needs Triton (or its interpreter)")
    with caplog.at_level(logging.WARNING, logger="minilm.fast_paths"):
        assert [fast_paths.choose("cpu", "fp32").linear for _ in range(3)] == ["plain"] * 3
        assert [fast_paths.choose("cpu", "bf16").linear for _ in range(2)] == ["plain"] * 2  # as on an AVX2 CPU
        # the kernel does mean pooling only
        assert fast_paths.choose("cpu", "fp32", ("cls",), {"pooling": "triton"}).pooling == "plain"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3 and "oneDNN cannot run fp32" in messages[0] and "mean pooling only" in messages[2]
    assert "oneDNN cannot run bf16 on this CPU; bf16 needs avx512bw or avx_ne_convert" in messages[1]
    with pytest.raises(minilm.InputError, match="linear backend 'onednn' cannot run"):
        fast_paths.choose("cpu", "fp32", forced_names={"linear": "onednn"})  # forced: an error, not a fallback
