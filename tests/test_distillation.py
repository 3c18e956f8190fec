"""Distillation: a student of some of the teacher's layers (saved, loaded by sentence-transformers, equal to those
layers run by hand), the teacher's embeddings kept on disk (round trip, refusals), and MSELoss against an explicit
computation and sentence-transformers' MSELoss."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minilm
from losses import MatryoshkaLoss, MSELoss
from minilm.distillation import check_teacher, student_from_layers, teacher_embeddings
from minilm.packing import token_coordinates

TEXTS = ["A man is playing a guitar.", "Two dogs run through a field of snow.", "The cell divides in two.",
         "", "Ünïcödé and numbers 12345", "word " * 300]


@pytest.fixture(scope="module")
def student(model):
    return student_from_layers(model, [0, 2, 4])


def test_student_saves_and_loads_in_sentence_transformers(student, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    student.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 3
    reference = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert reference.max_seq_length == student.max_seq_length == 256 and len(reference) == 3  # with Normalize
    assert reference[0].auto_model.config.num_hidden_layers == 3
    ours = student.encode(TEXTS)
    # float32 through 3 layers, measured 1.2e-7 apart; the 6-layer model's own parity bound (tests/test_save.py).
    assert np.abs(reference.encode(TEXTS) - ours).max() < 1e-5
    assert np.array_equal(minilm.load(str(tmp_path), device="cpu").encode(TEXTS), ours)


def test_student_encode_equals_those_layers_of_the_teacher_run_by_hand(model, student):
    """Embeddings, teacher layers 0, 2, 4, mean pooling and L2 normalization, written out on the teacher's own
    modules (math attention, one sentence at a time), against the student's encode (its fast path)."""
    expected = []
    with torch.no_grad():
        for text in TEXTS:
            batch = model.tokenize([text])
            _, positions = token_coordinates(batch["cu_seqlens"])
            hidden = model.encoder.embeddings(batch["input_ids"], positions)
            for index in (0, 2, 4):
                hidden = model.encoder.layers[index](hidden, batch["cu_seqlens"], batch["longest"], "math")
            expected.append(F.normalize(hidden.mean(0), dim=0))
    got = student.encode(TEXTS, convert_to="tensor")
    # float32; measured 1.2e-7 apart (oneDNN Linears and SDPA against plain ones).
    assert (got - torch.stack(expected)).abs().max() < 1e-5
    # The control: the teacher's 6 layers give other embeddings.
    assert (model.encode(TEXTS, convert_to="tensor") - got).abs().max() > 0.05


def test_the_student_is_a_copy(model):
    """Training the student leaves the teacher as it was: no weight or tokenizer setting is shared."""
    before = model.encode(TEXTS[:2])
    student = student_from_layers(model, [5, 1])
    assert student.encoder.config.num_hidden_layers == 2 and model.encoder.config.num_hidden_layers == 6
    assert torch.equal(student.encoder.layers[0].ffn_in.weight, model.encoder.layers[5].ffn_in.weight)
    assert torch.equal(student.encoder.embeddings.word.weight, model.encoder.embeddings.word.weight)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    student.max_seq_length = 32
    assert model.max_seq_length == 256 and np.array_equal(model.encode(TEXTS[:2]), before)
    assert not {p.data_ptr() for p in student.parameters()} & {p.data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("layers, message", [
    ([0, 2, 6], "no layer 6 (it has 6: 0 to 5)"),
    ([0, -1], "no layer -1"),
    ([0, 2, 2], "layer 2 is given twice"),
    ([], "no layer"),
    ([0, "2"], "'2' is not a layer number"),
    ([0, 1.0], "1.0 is not a layer number"),
    ("0,2,4", "expected distinct layer numbers from 0 to 5"),
])
def test_bad_layers_are_one_line_errors(model, layers, message):
    with pytest.raises(minilm.InputError) as error:
        student_from_layers(model, layers)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_teacher_of_another_size_is_refused(model, tiny_model_dir):
    tiny = minilm.load(str(tiny_model_dir), device="cpu")
    with pytest.raises(minilm.InputError, match="384 dimensions and the student's 64") as error:
        check_teacher(model, tiny)
    assert "\n" not in str(error.value) and "projection" in str(error.value)
    check_teacher(model, student_from_layers(model, [3]))  # the same size: accepted


@pytest.fixture
def tiny(tiny_model_dir):
    return minilm.load(str(tiny_model_dir), device="cpu")


def test_teacher_embeddings_are_computed_once_and_read_back(tiny, tmp_path, monkeypatch):
    path = tmp_path / "teacher.npy"
    first = teacher_embeddings(tiny, TEXTS, path, teacher_name="tiny")
    assert first.dtype == np.float32 and first.shape == (len(TEXTS), 64)
    assert np.array_equal(first, tiny.encode(TEXTS))
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["count"] == len(TEXTS) and manifest["shape"] == [len(TEXTS), 64] and manifest["teacher"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.json", "teacher.npy"]  # no temporary left
    monkeypatch.setattr(tiny, "encode", lambda *args, **kwargs: pytest.fail("computed again"))
    again = teacher_embeddings(tiny, TEXTS, path, teacher_name="elsewhere/tiny")  # the name is not the identity
    assert np.array_equal(again, first)
    assert np.array_equal(np.load(path, allow_pickle=False), first)  # a plain .npy


def test_a_teacher_with_a_truncate_dim_gives_its_whole_embeddings(tiny_model_dir, tmp_path):
    """A teacher saved with a truncate_dim (a Matryoshka model) is distilled from its whole embedding, the size
    check_teacher compares and the student learns, not the smaller size its encode returns by default."""
    teacher = minilm.load(str(tiny_model_dir), device="cpu", truncate_dim=16)
    embeddings = teacher_embeddings(teacher, TEXTS, tmp_path / "teacher.npy")
    assert embeddings.shape == (len(TEXTS), 64)
    assert np.array_equal(embeddings, teacher.encode(TEXTS, truncate_dim=64))


def test_an_interrupted_write_is_computed_again(tiny, tmp_path):
    """The manifest is written first: one without its array is this module's, from a run killed in between."""
    path = tmp_path / "teacher.npy"
    teacher_embeddings(tiny, TEXTS[:3], path)
    path.unlink()
    assert np.array_equal(teacher_embeddings(tiny, TEXTS, path), tiny.encode(TEXTS))


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _rewrite(path, array):
    """Write another array and a manifest that vouches for it (every field consistent but the values)."""
    from minilm.corpus import file_sha256

    np.save(path, array)
    manifest_path = path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "sha256": file_sha256(path)}))


DAMAGE = {
    "other texts": (lambda path, tiny: None, {"texts": TEXTS[:-1] + ["changed"]}, "are of other texts"),
    "fewer texts": (lambda path, tiny: None, {"texts": TEXTS[:-1]}, "have count 6, not 5"),
    "another teacher": (lambda path, tiny: tiny.encoder.layers[0].ffn_in.bias.data.add_(1e-3), {},
                        "were computed by another teacher"),
    "another precision": (lambda path, tiny: None, {"precision": "bf16"}, 'have precision "fp32", not "bf16"'),
    "a changed byte": (lambda path, tiny: _flip_last_byte(path), {},
                       "SHA-256 is not the one its manifest teacher.json records"),
    "a truncated file": (lambda path, tiny: path.write_bytes(path.read_bytes()[:-4]), {}, "the file is truncated"),
    "another shape": (lambda path, tiny: _rewrite(path, np.zeros((6, 32), np.float32)), {}, "of shape (6, 32)"),
    "another dtype": (lambda path, tiny: _rewrite(path, np.zeros((6, 64), np.float64)), {}, "holds a float64 array"),
    "NaN values": (lambda path, tiny: _rewrite(path, np.full((6, 64), np.nan, np.float32)), {}, "NaN or infinite"),
    "a broken manifest": (lambda path, tiny: path.with_suffix(".json").write_text("{"), {}, "cannot read"),
    "a foreign manifest": (lambda path, tiny: path.with_suffix(".json").write_text('{"format": "x"}'), {},
                           "is not a minilm teacher-embeddings manifest"),
    "no manifest": (lambda path, tiny: path.with_suffix(".json").unlink(), {}, "exists without its manifest"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_file_that_does_not_match_is_refused_and_left_alone(tiny_model_dir, tmp_path, damage):
    tiny = minilm.load(str(tiny_model_dir), device="cpu")  # its own copy: one case changes a weight
    change, call, message = DAMAGE[damage]
    path = tmp_path / "teacher.npy"
    teacher_embeddings(tiny, TEXTS, path)
    change(path, tiny)
    tiny.refresh_inference_copies()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(minilm.InputError) as error:
        teacher_embeddings(tiny, call.get("texts", TEXTS), path, precision=call.get("precision", "fp32"))
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


class Table(nn.Module):
    """A sentence-transformers model whose "embedding" of a batch is the batch's tensor."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Linear(1, 1)

    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}

    def get_embedding_dimension(self):
        return 8

    get_sentence_embedding_dimension = get_embedding_dimension


def test_mse_loss_equals_an_explicit_computation_and_sentence_transformers():
    torch.manual_seed(5)
    student = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 8, dtype=torch.float64)
    value = MSELoss(None).compute_loss_from_embeddings([student], teacher)
    expected = sum((student[i, d] - teacher[i, d]) ** 2 for i in range(6) for d in range(8)) / 48
    assert torch.allclose(value, expected, atol=5e-15, rtol=1e-14)
    (grad,), (expected_grad,) = torch.autograd.grad(value, [student]), torch.autograd.grad(expected, [student])
    assert torch.allclose(grad, expected_grad, atol=5e-15, rtol=1e-14)

    st = pytest.importorskip("sentence_transformers")
    student32, teacher32 = student.detach().float().requires_grad_(), teacher.float()
    theirs = st.sentence_transformer.losses.MSELoss(Table())([{"embedding": student32}], teacher32)
    ours = MSELoss(None).compute_loss_from_embeddings([student32], teacher32)
    # float32; both are torch's mse_loss, the same reduction over all 48 elements.
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    assert torch.equal(torch.autograd.grad(ours, student32)[0], torch.autograd.grad(theirs, student32)[0])
    with pytest.raises(ValueError, match="teacher embeddings of shape \\(6, 4\\) for student embeddings of shape"):
        MSELoss(None).compute_loss_from_embeddings([student], teacher[:, :4])


def test_matryoshka_mse_cuts_the_teacher_as_the_student(tiny):
    """Through forward on a real (tiny) student: the loss at 64 and 16 dimensions, the teacher cut the same way."""
    torch.manual_seed(6)
    features = [tiny.tokenize(TEXTS)]
    teacher = F.normalize(torch.randn(len(TEXTS), 64), dim=-1)
    with torch.no_grad():
        loss = MatryoshkaLoss(tiny, MSELoss(tiny), [64, 16], [1.0, 3.0])(features, teacher)
        student = tiny(features[0])
    expected = ((student - teacher) ** 2).mean() + 3.0 * ((student[:, :16] - teacher[:, :16]) ** 2).mean()
    # float32 means over 384 and 96 elements.
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)


def test_the_distillation_texts_are_the_training_texts_and_no_held_out_one(tmp_path):
    """recipes/distill_sentences.py: one distinct text per line (line breaks inside a text made spaces, blanks left
    out), exactly the texts of the training sources read here on their own: SciFact's corpus as the evaluator
    embeds it, Quora's pairs of recipe 001's training split, STS-B train, SNLI dev. The control: Quora's held-out
    questions, STS-B dev/test and SNLI test sentences that no training source has exist, and are not written."""
    import importlib.util

    from conftest import REPO, shared_data
    from minilm import data, evaluation

    root = shared_data()
    spec = importlib.util.spec_from_file_location("distill_sentences", REPO / "recipes" / "distill_sentences.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    texts, added = script.distinct_texts({"a": ["one", "two\nlines", " ", "one"], "b": ["one", "three"]})
    assert texts == ["one", "two lines", "three"] and added == {"a": 2, "b": 1}

    assert script.main([str(root), "--out", str(tmp_path / "texts.txt")]) == 0
    lines = (tmp_path / "texts.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(set(lines[:-1])) == len(lines) - 1 > 30_000
    quora = [(r["anchor"], r["positive"]) for r in data.read_dataset(root / "quora" / "duplicates.tsv").rows]
    quora_train, quora_held = script.split(quora, 0.1)
    allowed = set(evaluation.read_corpus(root / "scifact" / "corpus.jsonl").values())
    allowed |= {text for pair in quora_train for text in pair}
    allowed |= {r[c] for r in data.load_stsb(root / "stsb", "train") for c in ("sentence1", "sentence2")}
    snli_dev, snli_test = (data.load_snli(root / "snli" / f"snli_1.0_{split}.jsonl.gz") for split in ("dev", "test"))
    allowed |= {r[c] for r in snli_dev for c in ("premise", "hypothesis")}
    assert set(lines[:-1]) == {" ".join(t.splitlines()).strip() for t in allowed} - {""}
    held_out = {text for pair in quora_held for text in pair}
    held_out |= {r[c] for split in ("dev", "test") for r in data.load_stsb(root / "stsb", split)
                 for c in ("sentence1", "sentence2")}
    held_out |= {r[c] for r in snli_test for c in ("premise", "hypothesis")}
    assert len(held_out - allowed) > 10_000
    assert script.main([str(root), "--out", str(tmp_path / "texts.txt")]) == 2  # no --overwrite: refused
