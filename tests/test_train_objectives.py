"""train.py's objectives beyond one loss on one model (issue 21), end to end on the tiny random BERT
(tests/conftest.py: 2 layers, 64 dimensions): --matryoshka-dims (mnrl and cached-mnrl, every size evaluated and on
the card), distillation (--loss mse --teacher --layers on a text file, resumed on the teacher embeddings it kept),
--prompts (put before each column's texts, kept in the saved model), their recipe values, --keep-self-matches, and
the one-line errors of each. The maths of each loss is tested beside it (test_matryoshka.py, test_distillation.py,
test_prompts.py); here, that train.py feeds it."""

import argparse
import json
import os

import numpy as np
import pytest
import torch

import train
from minilm import best_model, checkpoint, data, training_data
from minilm.errors import UsageError
from test_train import log_steps, ok, run_train, stopped_at_once, weights_equal
from test_retrieval import write_beir

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "red blue cat dog runs sits on the mat park ball green child eats apple river old man plays".split()


def texts(count: int, seed: int = 0) -> list:
    """Distinct short sentences of the words above (seeded)."""
    rng, made = np.random.default_rng(seed), {}
    while len(made) < count:
        made.setdefault(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))), None)
    return list(made)


def pairs_file(path, count: int = 16):
    sentences = texts(2 * count)
    path.write_text("anchor\tpositive\n" + "".join(f"{a}\t{b}\n" for a, b in zip(sentences[::2], sentences[1::2])))
    return path


def scored_file(path, count: int = 12):
    sentences = texts(2 * count, seed=1)
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{i % 5 / 4}\n" for i, (a, b) in enumerate(zip(sentences[::2], sentences[1::2]))))
    return path


def log(out) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# --- Matryoshka ------------------------------------------------------------------------------------------------

def test_matryoshka_trains_and_evaluates_every_size_and_cached_mnrl_equals_mnrl(capsys, tiny_model_dir, tmp_path):
    """One batch of all 16 rows per step: step 1's logged loss is MatryoshkaLoss(MNRL) with those sizes and weights
    on the untrained model (MNRL's mean over anchors does not depend on the rows' order). Every evaluation reports
    each metric at each size; the card has the sizes' table. cached-mnrl (GradCache) logs the same losses."""
    from losses import MatryoshkaLoss, MultipleNegativesRankingLoss
    import minilm

    pairs, scored = pairs_file(tmp_path / "pairs.tsv"), scored_file(tmp_path / "scored.tsv")
    logs = {}
    for loss, params in (("mnrl", "{}"), ("cached-mnrl", '{"mini_batch_size": 5}')):
        ok(capsys, "--model", tiny_model_dir, "--loss", loss, "--loss-params", params, "--data", pairs,
           "--batch-size", 16, "--lr", "1e-3", "--max-steps", 2, "--log-steps", 1, "--save-steps", 0,
           "--eval-task", "pairs", "--eval-data", scored, "--eval-steps", 1, "--matryoshka-dims", "64,32,16",
           "--matryoshka-weights", "1,1,0.5", "--out", tmp_path / loss)
        logs[loss] = log(tmp_path / loss)

    model = minilm.load(str(tiny_model_dir), device="cpu")
    matryoshka = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), [64, 32, 16], [1, 1, 0.5])
    rows = data.read_dataset(pairs).rows
    features, _ = data.collate(rows, ["anchor", "positive"], None, model.tokenize)
    with torch.no_grad():
        expected = float(matryoshka(features))
    losses = {loss: [entry["loss"] for entry in entries if "loss" in entry] for loss, entries in logs.items()}
    assert losses["mnrl"][0] == pytest.approx(expected, rel=1e-5)  # float32 sums over 16 x 16 scores
    assert losses["cached-mnrl"] == pytest.approx(losses["mnrl"], rel=1e-5)  # the bound for GradCache

    names = {f"eval_{metric}_dim{dim}" for metric in ("pearson_cosine", "spearman_cosine") for dim in (64, 32, 16)}
    evaluations = [entry for entry in logs["mnrl"] if "eval_spearman_cosine_dim64" in entry]
    assert [entry["step"] for entry in evaluations] == [1, 2]
    assert all(names == {key for key in entry if key.startswith("eval_")} for entry in evaluations)
    card = (tmp_path / "mnrl" / "README.md").read_text()
    final = evaluations[-1]
    table = "\n".join(f"| {dim} | {final[f'eval_spearman_cosine_dim{dim}']:.4f} |" for dim in (64, 32, 16))
    assert table in card and "eval_spearman_cosine_dim64" in card  # the default metric: the first size's
    assert '"matryoshka_weights": [\n        1.0,\n        1.0,\n        0.5\n    ]' in card


def test_metric_for_best_names_a_trained_size():
    """The default is the main metric at the first size given; a name without a size is at that size too."""
    def metric(*flags):
        return best_model.metric_for_best(train.parse_args(["--out", "x", "--eval-task", "stsb", *flags])[0])

    assert metric("--matryoshka-dims", "128,64") == "spearman_cosine_dim128"
    assert metric("--matryoshka-dims", "128,64", "--metric-for-best", "eval_pearson_cosine_dim64") == \
        "pearson_cosine_dim64"
    assert metric("--matryoshka-dims", "128,64", "--metric-for-best", "pearson_cosine") == "pearson_cosine_dim128"
    for flags, said in ((("--metric-for-best", "spearman_cosine_dim64"), "reports pearson_cosine, spearman_cosine"),
                        (("--matryoshka-dims", "128,64", "--metric-for-best", "spearman_cosine_dim32"),
                         "evaluation reports pearson_cosine, spearman_cosine at each of the sizes 128, 64")):
        with pytest.raises(UsageError, match=said):
            metric(*flags)


# --- distillation ----------------------------------------------------------------------------------------------

def test_distillation_trains_a_smaller_student_and_resumes_on_the_teacher_embeddings_it_kept(
        capsys, tiny_model_dir, tmp_path, monkeypatch):
    """--loss mse --teacher --layers 1 on a text file (one text a line, a blank line left out): a 1-layer student
    of the 2-layer model learns its embeddings (the loss falls), is saved as a model minilm and sentence-transformers
    load alike, and a run stopped after step 1 resumes to the uninterrupted run's weights on the teacher embeddings
    it kept (not one encode call, the file untouched)."""
    import minilm

    sentences = texts(12)
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(sentences[:6]) + "\n\n" + "\r\n".join(sentences[6:]) + "\n")
    common = ["--model", tiny_model_dir, "--loss", "mse", "--teacher", tiny_model_dir, "--layers", "1",
              "--data", corpus, "--batch-size", 4, "--lr", "3e-3", "--max-steps", 9, "--log-steps", 1]
    said = ok(capsys, *common, "--out", tmp_path / "straight")
    assert "training mse on 12 rows" in said
    losses = [entry["loss"] for entry in log(tmp_path / "straight")]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        code, _, err = run_train(capsys, *common, "--out", tmp_path / "stopped")
    assert code == 130, err
    kept = tmp_path / "stopped" / "checkpoints" / "teacher-embeddings-0.npy"
    before = kept.stat()
    teacher = minilm.load(str(tiny_model_dir), device="cpu")
    assert np.allclose(np.load(kept), teacher.encode([s.strip() for s in sentences]), atol=1e-6)
    encode, calls = minilm.SentenceEncoder.encode, []
    monkeypatch.setattr(minilm.SentenceEncoder, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    ok(capsys, "--out", tmp_path / "stopped", "--resume")
    assert calls == [] and (kept.stat().st_mtime_ns, kept.stat().st_ino) == (before.st_mtime_ns, before.st_ino)
    weights_equal(tmp_path / "straight", tmp_path / "stopped")
    assert log_steps(tmp_path / "stopped") == list(range(1, 10))

    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    st = pytest.importorskip("sentence_transformers")
    student = minilm.load(str(tmp_path / "straight"), device="cpu")
    reference = st.SentenceTransformer(str(tmp_path / "straight"), device="cpu")
    assert len(reference[0].auto_model.encoder.layer) == 1
    # float32, one layer of width 64 through two code paths: measured 5.2e-8
    assert np.abs(reference.encode(sentences) - student.encode(sentences)).max() < 1e-6


def test_distillation_reads_the_texts_of_any_columns_and_a_text_file_only_for_one_column_losses(tmp_path):
    """mse learns each distinct text of the usual files' text columns; a .txt is one text a line for it, and a
    TSV with a header for the losses of two columns, as before."""
    from losses import LOSSES

    rows = [{"sentence1": "a", "sentence2": "b", "score": 0.5}, {"sentence1": "b", "sentence2": "c", "score": 0.1}]
    assert training_data.columns_for_loss(rows, LOSSES["mse"], 0.8, "x.tsv") == \
        ([{"text": "a"}, {"text": "b"}, {"text": "c"}], ["text"], "embedding")
    table = tmp_path / "pairs.txt"
    table.write_text("sentence1\tsentence2\tscore\nA man\tA woman\t0.5\n")
    as_texts, _, _ = training_data.load_training_rows(table, "train", plain_text=True)
    assert as_texts == [{"text": "sentence1\tsentence2\tscore"}, {"text": "A man\tA woman\t0.5"}]
    assert training_data.load_training_rows(table, "train")[0] == [{"sentence1": "A man", "sentence2": "A woman",
                                                                   "score": 0.5}]


# --- prompts ---------------------------------------------------------------------------------------------------

def test_prompts_go_before_each_columns_texts_and_the_saved_model_keeps_them(capsys, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    """--prompts '{"anchor": "query: "}': every anchor of a batch starts with the prompt's tokens (after [CLS]),
    no positive does; the saved model keeps the prompt by name (and as "query", which encode_query uses), in
    minilm and in sentence-transformers."""
    import minilm

    batches, collate = [], data.collate
    monkeypatch.setattr(train.data, "collate", lambda *args: batches.append(collate(*args)) or batches[-1])
    out = tmp_path / "run"
    ok(capsys, "--model", tiny_model_dir, "--loss", "mnrl", "--data", pairs_file(tmp_path / "pairs.tsv"),
       "--batch-size", 8, "--max-steps", 2, "--save-steps", 0, "--prompts", '{"anchor": "query: "}', "--out", out)
    model = minilm.load(str(out), device="cpu")
    prompt = model.tokenizer.encode_ids(["query:"])[0][1:-1]  # without [CLS] and [SEP]
    assert len(batches) == 2 and len(prompt) == 2
    for features, _ in batches:
        for column, batch in zip(("anchor", "positive"), features):
            ids, starts = batch["input_ids"].tolist(), batch["cu_seqlens"][:-1].tolist()
            prompted = [ids[start + 1:start + 1 + len(prompt)] == prompt for start in starts]
            assert all(prompted) if column == "anchor" else not any(prompted), column

    expected = {"query": "query: ", "document": "", "anchor": "query: "}
    saved = json.loads((out / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == model.prompts == expected and saved["default_prompt_name"] is None
    assert np.array_equal(model.encode_query(["a red ball"]), model.encode(["query: a red ball"]))
    st = pytest.importorskip("sentence_transformers")
    assert st.SentenceTransformer(str(out), device="cpu").prompts == expected


# --- flags: recipes, checkpoints, evaluation -------------------------------------------------------------------

def test_a_recipe_gives_the_new_flags_as_json_values_and_a_checkpoint_holds_them(tmp_path):
    """Lists (or the flag's own "a,b" text) for the sizes, weights and layers; an object (or a string) for the
    prompts. What the run saves in its checkpoints passes their checks as it is; a wrong kind is one line."""
    recipe = tmp_path / "recipe.json"

    def parse(**values):
        recipe.write_text(json.dumps({"loss": "mnrl", "data": ["pairs.tsv"], **values}))
        return train.parse_args(["--recipe", str(recipe), "--out", str(tmp_path / "run")])[0]

    args = parse(prompts={"anchor": "query: "}, matryoshka_dims=[64, 32], matryoshka_weights=[1, 0.5], layers="0,1")
    assert (args.matryoshka_dims, args.matryoshka_weights, args.layers) == ([64, 32], [1.0, 0.5], [0, 1])
    assert data.parse_prompts(args.prompts, train.LOSSES["mnrl"]) == {"anchor": "query: "}
    assert parse(prompts="query: ").prompts == "query: "
    settings = dict(vars(args))
    assert checkpoint.check_flags(settings, train.build_parser()) == settings
    with pytest.raises(checkpoint.BadField, match="'layers' is '0,1'"):
        checkpoint.check_flags({**settings, "layers": "0,1"}, train.build_parser())
    for value, said in (([64, "x"], "expected a whole number >= 1, got 'x'"), ([], "expected a list of numbers"),
                        ([True], "expected a list of numbers"), ("64,,32", "got ''")):
        with pytest.raises(UsageError, match=f"'matryoshka_dims'.*{said}"):
            parse(matryoshka_dims=value)


def test_resume_compares_the_prompts_not_the_spacing_of_their_json(tmp_path):
    """--resume with the run's --prompts retyped with other JSON spacing (or quoted) continues it; other prompts
    are refused, naming both."""
    run = {"args": {"prompts": '{"anchor": "query: "}', "loss": "mnrl"}, "cwd": str(tmp_path)}
    for same in ('{"anchor":"query: "}', ' { "anchor" : "query: " } '):
        args = checkpoint.resume_args(run, {"out": "run", "resume": True, "prompts": same})
        assert args.prompts == '{"anchor": "query: "}'  # the run's own value goes on
    for other in ('{"anchor": "passage: "}', "query: ", '{"anchor": '):
        with pytest.raises(UsageError, match="the run being resumed used"):
            checkpoint.resume_args(run, {"out": "run", "resume": True, "prompts": other})
    quoted = {"args": {"prompts": "query: "}, "cwd": str(tmp_path)}
    assert checkpoint.resume_args(quoted, {"out": "run", "resume": True, "prompts": '"query: "'}).prompts == "query: "


def test_resume_takes_the_default_matryoshka_weights_written_out(tmp_path):
    """--matryoshka-weights 1,1 on --resume of a run that gave none is the same setting (1 per size); other
    weights are refused."""
    run = {"args": {"matryoshka_dims": [64, 32], "matryoshka_weights": None, "loss": "mnrl"}, "cwd": str(tmp_path)}
    assert checkpoint.resume_args(run, {"out": "run", "resume": True, "matryoshka_weights": [1.0, 1.0]})
    with pytest.raises(UsageError, match="the run being resumed used"):
        checkpoint.resume_args(run, {"out": "run", "resume": True, "matryoshka_weights": [1.0, 0.5]})
    weighted = {"args": {**run["args"], "matryoshka_weights": [1.0, 0.5]}, "cwd": str(tmp_path)}
    assert checkpoint.resume_args(weighted, {"out": "run", "resume": True, "matryoshka_weights": [1.0, 0.5]})


def test_help_says_what_each_new_flag_takes():
    shown = " ".join(train.build_parser().format_help().split())
    for words in ("--matryoshka-dims D,...", "--matryoshka-weights W,...", "--teacher MODEL", "--layers L,...",
                  "--metric-for-best NAME", "--early-stopping-patience N", "(default: 0, never)"):
        assert words in shown, words


def test_help_shows_every_default_zero_included():
    """docs/training.md: `train.py --help` shows every flag with its default. A default of 0 counts: 0 == False
    once hid --weight-decay's, --warmup-ratio's, --max-steps' and --eval-steps'."""
    parser = train.build_parser()
    for action in parser._actions:
        if action.default not in (None, argparse.SUPPRESS) and action.default is not False and action.default != {}:
            shown = parser._get_formatter()._expand_help(action)  # the flag's help as --help prints it
            assert f"(default: {action.default}" in shown, (action.option_strings, shown)


def test_keep_self_matches_and_matryoshka_dims_reach_the_evaluator(tmp_path):
    """A BEIR folder whose query ids are its document ids (issue 23): --keep-self-matches counts them."""
    beir = write_beir(tmp_path / "beir", [{"_id": "1", "title": "", "text": "a cat"}],
                      [{"_id": "1", "text": "cats"}], ["1\t1\t1"])
    for flags, skip in (([], [0]), (["--keep-self-matches"], None)):
        args, _ = train.parse_args(["--loss", "mnrl", "--data", str(beir), "--out", "x", "--eval-task", "retrieval",
                                    "--eval-split", "test", "--matryoshka-dims", "64,8", *flags])
        evaluator = training_data.evaluator_for(args, training_data.TrainingData([], [], []))
        assert evaluator.skip == skip and evaluator.truncate_dims == [64, 8]
        assert evaluator.primary_metric == "cosine_ndcg@10_dim64" == best_model.metric_for_best(args)


def test_a_checkpoint_without_the_flags_added_later_resumes(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """A run stopped by an earlier version has none of checkpoint.ADDED_LATER's flags: it resumes as it ran."""
    pairs = scored_file(tmp_path / "pairs.tsv", 16)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        code, _, err = run_train(capsys, "--model", tiny_model_dir, "--loss", "cosine", "--data", pairs,
                                 "--batch-size", 4, "--max-steps", 3, "--log-steps", 1, "--out", out)
    assert code == 130, err
    state = out / "checkpoints" / "step-0000001" / checkpoint.CHECKPOINT
    saved = torch.load(state, weights_only=True)
    for flag in checkpoint.ADDED_LATER:
        del saved["args"][flag]
    torch.save(saved, state)
    ok(capsys, "--out", out, "--resume")
    assert log_steps(out) == [1, 2, 3]


# --- one-line errors -------------------------------------------------------------------------------------------

ERRORS = [  # (name, flags after --model tiny --data pairs.tsv --out run, what the line says)
    ("size-above-the-models", ["--loss", "mnrl", "--matryoshka-dims", "128,64"],
     ["--matryoshka-dims", "128 is above the model's embedding size 64"]),
    ("a-weight-short", ["--loss", "mnrl", "--matryoshka-dims", "64,32", "--matryoshka-weights", "1"],
     ["--matryoshka-weights 1:", "1 weight(s) for the 2 sizes of --matryoshka-dims 64,32"]),
    ("weights-without-sizes", ["--loss", "mnrl", "--matryoshka-weights", "1"], ["needs --matryoshka-dims"]),
    ("sizes-not-numbers", ["--loss", "mnrl", "--matryoshka-dims", "64,x"], ["--matryoshka-dims", "'x'"]),
    ("matryoshka-softmax", ["--loss", "softmax", "--matryoshka-dims", "64"], ["--matryoshka-dims", "softmax"]),
    ("unknown-layer", ["--loss", "mnrl", "--layers", "0,5"], ["--layers", "no layer 5", "0 to 1"]),
    ("teacher-of-another-size", ["--loss", "mse", "--teacher", "REAL_MODEL"],
     ["--teacher", "384 dimensions", "64"]),
    ("teacher-without-mse", ["--loss", "mnrl", "--teacher", "TINY_MODEL"], ["--teacher", "mse"]),
    ("teacher-a-folder-but-no-model", ["--loss", "mse", "--teacher", "NO_MODEL"], ["--teacher", "config.json"]),
    ("mse-without-teacher", ["--loss", "mse"], ["--loss mse", "--teacher"]),
    ("teacher-empty", ["--loss", "mnrl", "--teacher", ""], ["--teacher ''", "folder or hub id"]),
    ("prompt-of-a-column-not-read", ["--loss", "mnrl", "--prompts", '{"premise": "x: "}'],
     ["--prompts", "'premise'", "anchor"]),
    ("prompts-not-json", ["--loss", "mnrl", "--prompts", '{"anchor": '], ["--prompts", "not valid JSON"]),
    ("prompts-a-json-array", ["--loss", "mnrl", "--prompts", '["query: "]'], ["--prompts", "a JSON array"]),
    ("prompt-of-a-column-the-data-lacks", ["--loss", "mnrl", "--prompts", '{"negative": "x: "}'],
     ["--prompts", "'negative' is in no --data", "pairs.tsv: anchor, positive"]),
    ("keep-self-matches-without-retrieval", ["--loss", "mnrl", "--keep-self-matches"], ["--keep-self-matches"]),
    ("metric-at-an-untrained-size", ["--loss", "mnrl", "--matryoshka-dims", "64,32", "--eval-task", "pairs",
                                     "--metric-for-best", "spearman_cosine_dim16"], ["--metric-for-best", "64, 32"]),
]


@pytest.mark.parametrize("flags, said", [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_bad_objective_flags_are_one_line_and_write_nothing(capsys, tiny_model_dir, tmp_path, request, flags, said):
    if "REAL_MODEL" in flags:
        flags = [str(request.getfixturevalue("model_dir")) if flag == "REAL_MODEL" else flag for flag in flags]
    no_model = tiny_model_dir.parent  # a folder that holds a model, and is none: no config.json, no modules.json
    flags = [{"TINY_MODEL": str(tiny_model_dir), "NO_MODEL": str(no_model)}.get(flag, flag) for flag in flags]
    out = tmp_path / "run"
    code, _, err = run_train(capsys, "--model", tiny_model_dir, "--data", pairs_file(tmp_path / "pairs.tsv"),
                             *flags, "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    for words in said:
        assert words in lines[0], lines[0]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["pairs.tsv"]
