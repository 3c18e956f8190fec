"""A saved model loads in sentence-transformers and transformers and gives minilm's embeddings."""

import json

import numpy as np
import pytest
import torch

import minilm

SENTENCES = ["A saved model must round-trip.", "", "Ünïcödé and numbers 12345", "word " * 400]


@pytest.fixture(scope="module")
def changed_model(model_dir, tmp_path_factory):
    """The real model with its weights nudged, as after training, and saved."""
    model = minilm.load(str(model_dir), device="cpu")
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    out = tmp_path_factory.mktemp("saved")
    model.save(out)
    return model, out


def test_saved_layout(changed_model):
    _, out = changed_model
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "modules.json",
                 "sentence_bert_config.json", "1_Pooling/config.json", "config_sentence_transformers.json"):
        assert (out / name).is_file(), name
    assert (out / "2_Normalize").is_dir()
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256


def test_minilm_reloads_identically(changed_model):
    model, out = changed_model
    reloaded = minilm.load(str(out), device="cpu")
    assert np.array_equal(reloaded.encode(SENTENCES), model.encode(SENTENCES))


def test_sentence_transformers_loads_it(changed_model):
    st = pytest.importorskip("sentence_transformers")
    model, out = changed_model
    reference = st.SentenceTransformer(str(out), device="cpu")
    assert reference.max_seq_length == model.max_seq_length
    assert np.abs(reference.encode(SENTENCES) - model.encode(SENTENCES)).max() < 1e-5


def test_transformers_loads_it(changed_model):
    transformers = pytest.importorskip("transformers")
    model, out = changed_model
    bert = transformers.AutoModel.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt")
    with torch.no_grad():
        tokens = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)
    assert np.abs(pooled.numpy() - model.encode(SENTENCES)).max() < 1e-5


def test_model_without_normalize_round_trips(model_dir, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    model = minilm.load(str(model_dir), device="cpu")
    model.normalize = False
    model.max_seq_length = 512
    model.save(tmp_path)
    reference = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert len(reference) == 2 and reference.max_seq_length == 512
    assert np.abs(reference.encode(SENTENCES) - model.encode(SENTENCES)).max() < 1e-5
