"""A saved model loads in sentence-transformers and transformers and gives minilm's embeddings."""

import json
import os
import stat

import numpy as np
import pytest
import torch

import minilm

SENTENCES = ["A saved model must round-trip.", "", "Ünïcödé and numbers 12345", "word " * 400]


@pytest.fixture(scope="module")
def changed_model(model_dir, tmp_path_factory):
    """The real model with its weights nudged, as after training, and saved."""
    model = minilm.load(str(model_dir), device="cpu")
    generator = torch.Generator().manual_seed(0)
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


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_umask_mode(tiny_model_dir, tmp_path, umask):
    """Every file of a saved model (the safetensors ones included, which safetensors' save_file would leave 0600)
    and the SoftmaxLoss classifier get 0666 less the umask, as any file the user creates; saving again over them
    too, and no temporary file stays behind."""
    from losses.softmax import SoftmaxLoss

    model = minilm.load(str(tiny_model_dir), device="cpu")
    previous = os.umask(umask)
    try:
        for _ in range(2):  # a new folder, then the same folder again (files replaced)
            model.save(tmp_path / "saved")
            SoftmaxLoss(model).save(tmp_path / "saved")
    finally:
        os.umask(previous)
    saved = [path for path in (tmp_path / "saved").rglob("*") if path.is_file()]
    assert {"model.safetensors", "softmax_classifier.safetensors", "config.json"} <= {p.name for p in saved}
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in saved}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))
    assert not [p for p in saved if p.name.startswith(".")]
    assert SoftmaxLoss.load_classifier(tmp_path / "saved").in_features == 3 * model.embedding_dim


def test_a_failed_tensor_save_keeps_the_old_file(tmp_path):
    from minilm import files

    path = tmp_path / "weights.safetensors"
    files.save_tensors({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # a non-contiguous tensor: safetensors refuses it midway
        files.save_tensors({"a": torch.zeros(2), "b": torch.ones(4, 4).t()}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_save_onto_a_file_is_a_named_error(tmp_path):
    import minilm as package

    target = tmp_path / "model.bin"
    target.write_text("mine")
    model = package.load("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    with pytest.raises(package.InputError, match="is a file; give a folder"):
        model.save(target)
    assert target.read_text() == "mine"
    for not_a_path in (None, "", 3):  # "" would be the current folder
        with pytest.raises(package.InputError, match="model_dir must be a folder's path"):
            model.save(not_a_path)


def test_every_saved_file_is_written_atomically(tiny_model_dir, tmp_path, monkeypatch):
    """model.save and SoftmaxLoss.save write every file through minilm/files.py's one writer (a temporary file
    renamed onto the name): a kill mid-save leaves each file old or new, never half written."""
    from losses.softmax import SoftmaxLoss
    from minilm import files

    written, replaced_atomically = [], files.replaced_atomically

    def recording(path):
        written.append(str(path.relative_to(tmp_path / "saved")))
        return replaced_atomically(path)

    monkeypatch.setattr(files, "replaced_atomically", recording)
    model = minilm.load(str(tiny_model_dir), device="cpu")
    model.save(tmp_path / "saved")
    SoftmaxLoss(model).save(tmp_path / "saved")
    on_disk = sorted(str(p.relative_to(tmp_path / "saved")) for p in (tmp_path / "saved").rglob("*") if p.is_file())
    assert sorted(written) == on_disk and "model.safetensors" in on_disk and "tokenizer.json" in on_disk


def test_a_half_precision_model_saves_the_float32_weights_minilm_computes_with(model_dir, tmp_path):
    """model.half() then save once wrote float16 weights: minilm loads them as float32, sentence-transformers
    computes in the file's float16, and their embeddings differed by 2e-4."""
    st = pytest.importorskip("sentence_transformers")
    model = minilm.load(str(model_dir), device="cpu").half()
    model.save(tmp_path)
    ours = minilm.load(str(tmp_path), device="cpu")
    assert ours.encoder.embeddings.word.weight.dtype == torch.float32
    assert torch.equal(ours.encoder.embeddings.word.weight, model.encoder.embeddings.word.weight.float())
    reference = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert np.abs(reference.encode(SENTENCES) - ours.encode(SENTENCES)).max() < 1e-5


def test_normalize_must_be_true_or_false(tiny_model_dir, tmp_path):
    """model.normalize = "no" once normalized every embedding and saved a Normalize module ("no" is truthy)."""
    model = minilm.load(str(tiny_model_dir), device="cpu")
    for value in ("no", None, 0):
        with pytest.raises(minilm.InputError, match=f"^normalize must be True or False, not {value!r}$"):
            model.normalize = value
    model.normalize = False
    model.save(tmp_path)
    assert not (tmp_path / "2_Normalize").exists() and not minilm.load(str(tmp_path), device="cpu").normalize
