"""One model, one forward: an edit to any part of the model reaches `encode` on every path, and the fast paths are
chosen in one place (minilm/fast_paths.py), forcible by name, with every fallback logged once.

A tiny random BERT (2 layers, width 64) is enough: what is tested is which code runs, not the real weights."""

import logging
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import minilm
from minilm import fast_paths, onednn, pooling
from minilm.encoder import BertConfig, BertEncoder, Embeddings, SelfAttention
from minilm.tokenizer import SentenceTokenizer

TEXTS = ["a short one", "two words", "a somewhat longer sentence with more words in it", "x",
         "another sentence of middling length", "and one more to encode"]
# name -> (precision, Linear kind, attention backend)
PATHS = {
    "fp32-onednn-sdpa": ("fp32", "onednn", "sdpa"),
    "fp32-plain-sdpa": ("fp32", "plain", "sdpa"),
    "fp32-plain-math": ("fp32", "plain", "math"),
    "bf16-onednn-sdpa": ("bf16", "onednn", "sdpa"),
    "bf16-plain-math": ("bf16", "plain", "math"),
}


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
    model.linear_kind, model.attention_backend = linear, attention
    try:
        return model.encode(TEXTS, batch_size=4, precision=precision)
    finally:
        model.linear_kind, model.attention_backend = None, None


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("path", PATHS)
def test_an_edit_reaches_encode_on_every_path(tiny, monkeypatch, path, edit):
    if PATHS[path][1] == "onednn" and not onednn.available("cpu", minilm.model.PRECISIONS[PATHS[path][0]]
                                                            or torch.float32):
        pytest.skip(f"oneDNN cannot run {PATHS[path][0]} on this CPU")
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


def test_environment_forces_each_choice_by_name(monkeypatch):
    assert fast_paths.choose("cpu", torch.float32) == fast_paths.FastPaths(
        "sdpa", "plain", "onednn" if onednn.available("cpu", torch.float32) else "plain")
    monkeypatch.setenv("MINILM_ATTENTION", "math")
    monkeypatch.setenv("MINILM_LINEAR", "plain")
    monkeypatch.setenv("MINILM_POOLING", "plain")
    assert fast_paths.choose("cpu", torch.float32) == fast_paths.FastPaths("math", "plain", "plain")
    assert fast_paths.choose("cpu", torch.float32, attention="sdpa_padded").attention == "sdpa_padded"  # argument wins
    monkeypatch.setenv("MINILM_ATTENTION", "flash")
    with pytest.raises(minilm.InputError, match=r"unknown attention backend 'flash' \(from \$MINILM_ATTENTION\)"):
        fast_paths.choose("cpu", torch.float32)


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
    with caplog.at_level(logging.WARNING, logger="minilm.fast_paths"):
        assert [fast_paths.linear_kind("cpu", torch.float32) for _ in range(3)] == ["plain"] * 3
        assert fast_paths.pooling_kernel("cpu", ("cls",), "triton") == "plain"  # the kernel does mean only
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "oneDNN cannot run" in messages[0] and "mean pooling only" in messages[1]
    with pytest.raises(minilm.InputError, match="linear 'onednn' cannot run"):
        fast_paths.linear_kind("cpu", torch.float32, "onednn")  # forced: an error, not a fallback
