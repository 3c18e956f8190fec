"""truncate_dim: encode keeps each embedding's first N dimensions as sentence-transformers does (after Normalize;
unit length again when normalize=True), as an argument or the model's default (load(truncate_dim=), the saved
config); bad values are one line; evaluators score several sizes from one encode; eval.py --truncate-dim."""

import json
import shutil

import numpy as np
import pytest
import torch

import eval as eval_script
import minilm
from minilm import evaluation
from minilm.errors import InputError

SENTENCES = ["A man is eating food.", "", "Ünïcödé and numbers 12345", "word " * 300]


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("truncate") / "model")


@pytest.fixture(scope="module")
def reference(saved):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(saved), device="cpu")


def test_truncated_embeddings_equal_sentence_transformers(model, saved, reference, tmp_path):
    import sentence_transformers as st

    whole = model.encode(SENTENCES)
    for dim in (1, 64, 384):
        ours = model.encode(SENTENCES, truncate_dim=dim)
        assert ours.shape == (4, dim) and np.array_equal(ours, whole[:, :dim])  # cut after Normalize
        assert np.abs(ours - reference.encode(SENTENCES, truncate_dim=dim)).max() < 1e-5
        unit = model.encode(SENTENCES, truncate_dim=dim, normalize=True)
        theirs = reference.encode(SENTENCES, truncate_dim=dim, normalize_embeddings=True)
        assert np.abs(unit - theirs).max() < 1e-5 and np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    assert model.encode("one text", truncate_dim=32).shape == (32,)
    # The model's default: load(truncate_dim=) as SentenceTransformer(truncate_dim=); saved and read back by both.
    cut = minilm.load(str(saved), device="cpu", truncate_dim=32)
    assert cut.truncate_dim == 32 and np.array_equal(cut.encode(SENTENCES), whole[:, :32])
    assert cut.encode(SENTENCES, truncate_dim=384).shape == (4, 384)  # the argument wins
    cut.save(tmp_path)
    assert json.loads((tmp_path / "config_sentence_transformers.json").read_text())["truncate_dim"] == 32
    assert minilm.load(str(tmp_path), device="cpu").truncate_dim == 32
    assert st.SentenceTransformer(str(tmp_path), device="cpu").truncate_dim == 32
    assert minilm.load(str(tmp_path), device="cpu", truncate_dim=100).truncate_dim == 100


@pytest.mark.parametrize("value", [0, 385, -1, 1.5, True, "64"])
def test_a_bad_truncate_dim_is_one_line(tiny_model_dir, value):
    tiny = minilm.load(str(tiny_model_dir), device="cpu")
    expected = f"truncate_dim must be a whole number from 1 to 64 (the model's embedding_dim), not {value!r}"
    for attempt in (lambda: tiny.encode("a", truncate_dim=value),
                    lambda: setattr(tiny, "truncate_dim", value),
                    lambda: minilm.load(str(tiny_model_dir), device="cpu", truncate_dim=value)):
        with pytest.raises(InputError) as error:
            attempt()
        assert str(error.value) == expected


@pytest.mark.parametrize("value, fragment", [(65, "field 'truncate_dim': truncate_dim must be a whole number from 1 "
                                                   "to 64"), ("64", "field 'truncate_dim' is '64'")])
def test_a_bad_saved_truncate_dim_names_the_file(tiny_model_dir, tmp_path, value, fragment):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    path = tmp_path / "m" / "config_sentence_transformers.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "truncate_dim": value}))
    with pytest.raises(InputError) as error:
        minilm.load(str(tmp_path / "m"), device="cpu")
    assert str(error.value).startswith(str(path)) and fragment in str(error.value)


class Counting:
    """The model, counting encode calls (an evaluator at several sizes encodes once)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.model.encode(*args, **kwargs)


def test_an_evaluator_scores_every_size_from_one_encode(model, reference):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    rng = np.random.default_rng(0)
    words = "a man woman dog eats runs sleeps food park river city music".split()
    s1 = [" ".join(rng.choice(words, size=5)) for _ in range(30)]
    s2 = [" ".join(rng.choice(words, size=5)) for _ in range(30)]
    scores = rng.random(30).tolist()
    single = evaluation.EmbeddingSimilarityEvaluator(s1, s2, scores)
    several = evaluation.EmbeddingSimilarityEvaluator(s1, s2, scores)
    several.truncate_dims = (384, 64, 8)
    counting = Counting(model)
    metrics = several(counting)
    assert counting.calls == 1 and several.primary_metric == "spearman_cosine_dim384"
    assert list(metrics) == [f"{name}_dim{dim}" for dim in (384, 64, 8) for name in ("pearson_cosine",
                                                                                     "spearman_cosine")]
    for dim in (384, 64, 8):
        single.truncate_dim = dim
        alone = single(model)
        theirs = EmbeddingSimilarityEvaluator(s1, s2, scores, name="x", write_csv=False, truncate_dim=dim)(reference)
        for name, value in alone.items():
            assert abs(value - metrics[f"{name}_dim{dim}"]) < 1e-9 and abs(value - theirs[f"x_{name}"]) < 1e-6
    assert metrics["spearman_cosine_dim8"] != metrics["spearman_cosine_dim384"]
    several.truncate_dims = (64, 500)
    with pytest.raises(InputError, match="from 1 to 384"):
        several(model)
    nli = evaluation.LabelAccuracyEvaluator(s1, s2, [0] * 30, torch.nn.Linear(3 * 384, 3))
    nli.truncate_dims = (384, 64)
    with pytest.raises(ValueError, match="SoftmaxLoss classifier"):
        nli(model)


def test_eval_py_truncate_dim(tiny_model_dir, tmp_path, capsys):
    rows = [{"sentence1": f"a dog {word}", "sentence2": f"the {word} cat", "score": score}
            for word, score in (("runs", 0.1), ("eats", 0.5), ("sleeps", 0.9), ("sings", 0.3), ("reads", 0.7))]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = ["--model", str(tiny_model_dir), "--task", "pairs", "--data", str(tmp_path / "pairs.jsonl"),
            "--device", "cpu"]
    assert eval_script.main(base + ["--truncate-dim", "64,16", "--json", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["truncate_dim"] == [64, 16] and set(result["metrics"]) == {
        f"{name}_dim{dim}" for dim in (64, 16) for name in ("pearson_cosine", "spearman_cosine")}
    assert eval_script.main(base + ["--truncate-dim", "16", "--json", str(tmp_path / "m.json")]) == 0
    one = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert one == {name.removesuffix("_dim16"): value for name, value in result["metrics"].items()
                   if name.endswith("_dim16")}
    # a model saved with a truncate_dim is scored at it, and the output and --json say so
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    settings = json.loads((cut / "config_sentence_transformers.json").read_text())
    (cut / "config_sentence_transformers.json").write_text(json.dumps({**settings, "truncate_dim": 16}))
    capsys.readouterr()
    assert eval_script.main([*base[:1], str(cut), *base[2:], "--json", str(tmp_path / "m.json")]) == 0
    assert "truncate_dim 16 (the model's)" in capsys.readouterr().out
    own = json.loads((tmp_path / "m.json").read_text())
    assert own["truncate_dim"] == [16] and own["metrics"] == one
    capsys.readouterr()
    for flags, message in ((["--truncate-dim", "65"], "--truncate-dim 65: truncate_dim must be a whole number "
                                                      "from 1 to 64"),
                           (["--truncate-dim", "0"], "expected a whole number >= 1"),
                           (["--query-prompt", "q: "], "--query-prompt and --corpus-prompt are for --task "
                                                       "retrieval")):
        assert eval_script.main(base + flags) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_card_of_a_model_with_a_truncate_dim_says_the_size_encode_returns(tiny_model_dir, tmp_path, capsys,
                                                                                one_thread):
    """A base model saved with truncate_dim 16 is trained (and saved) with it, as sentence-transformers keeps it:
    its card's output size is 16, what encode returns, as sentence-transformers' card says it."""
    import train

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    settings = json.loads((base / "config_sentence_transformers.json").read_text())
    (base / "config_sentence_transformers.json").write_text(json.dumps({**settings, "truncate_dim": 16}))
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n" + "".join(f"a dog {i}\tthe cat {i}\n" for i in range(8)))
    out = tmp_path / "run"
    assert train.main(["--no-progress", "--model", str(base), "--loss", "mnrl", "--data", str(pairs), "--batch-size",
                       "4", "--max-steps", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    assert minilm.load(str(out), device="cpu").encode("a dog").shape == (16,)
    card = (out / "README.md").read_text()
    assert "16-dimensional dense vector space" in card, card
    assert "**Output Dimensionality:** 16 dimensions (the first of its 64: truncate_dim)" in card
