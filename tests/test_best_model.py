"""The best evaluation's whole model (--load-best), early stopping (--early-stopping-patience), --metric-for-best,
resume keeping the best so far, and the curves of loss.png (minilm/best_model.py, minilm/curves.py). In-process
(train.main) on the tiny random BERT, with the evaluation scripted: the metric at each step is the test's, so
that the best step is known in advance; the real evaluators' metric names are checked against evaluation.py's."""

import json
from pathlib import Path

import pytest
import torch

import train
from minilm import best_model, checkpoint, curves, evaluation, training_data
from minilm.checkpoint import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")

# premise/hypothesis/label rows: the SoftmaxLoss's classifier is part of the whole model to keep
NLI = "premise\thypothesis\tlabel\n" + "".join(f"a man plays {i}\tsomeone plays {i % 5}\t{i % 3}\n" for i in range(24))
MODEL_FILES = ("model.safetensors", "config.json", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "1_Pooling/config.json", "tokenizer.json",
               "softmax_classifier.safetensors", "softmax_classifier.json")


class Scripted:
    """--eval-task nli whose accuracy at each step is the test's (values: {step: accuracy}); every evaluation's
    whole model is saved (as the final save writes it) into snapshots/step-N, to compare with what the run saved.
    stop_at: {step: what happens after that step's evaluation: "signal" (as Ctrl-C: a checkpoint, exit 130) or
    "kill" (stops at once, no checkpoint, as kill -9 would)}."""

    def __init__(self, monkeypatch, folder: Path, values: dict, stop_at=None):
        self.values, self.stop_at, self.snapshots, self.calls = values, stop_at or {}, folder / "snapshots", []
        self.stop, self.step = None, None
        evaluate, enter = train.evaluate, checkpoint.StopRequest.__enter__
        monkeypatch.setattr(training_data, "evaluator_for", lambda *given: self)
        monkeypatch.setattr(train, "evaluate", lambda run: self.evaluate(run, evaluate))
        monkeypatch.setattr(checkpoint.StopRequest, "__enter__",
                            lambda stop: setattr(self, "stop", stop) or enter(stop))

    name, precision = "scripted-nli", "fp32"  # as an evaluation.Evaluator (the card names its precision)

    def __call__(self, model) -> dict:
        self.calls.append(self.step)
        return {"accuracy": self.values[self.step]}

    def evaluate(self, run, evaluate) -> dict:
        self.step = run.state["step"]
        metrics = evaluate(run)
        snapshot = self.snapshots / f"step-{self.step}"
        run.model.save(snapshot)
        run.loss_fn.save(snapshot)
        action = self.stop_at.get(self.step)
        if action == "signal":
            self.stop.signal = "SIGINT"
        elif action == "kill":
            raise checkpoint.StoppedAtOnce
        return metrics


def call(capsys, *argv) -> tuple:
    code = train.main(["--no-progress", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def nli_run(tiny_model_dir, folder: Path, *extra) -> list:
    data = folder / "nli.tsv"
    data.write_text(NLI)
    return ["--model", tiny_model_dir, "--loss", "softmax", "--data", data, "--batch-size", 4, "--lr", "1e-3",
            "--log-steps", 1, "--eval-task", "nli", "--eval-steps", 1, "--save-steps", 0, *extra]


def assert_same_model(saved: Path, snapshot: Path) -> None:
    """Every file of the whole model (encoder, tokenizer, pooling, Normalize, the classifier) byte for byte."""
    for name in MODEL_FILES:
        assert (saved / name).read_bytes() == (snapshot / name).read_bytes(), name
    assert (saved / "2_Normalize").is_dir() == (snapshot / "2_Normalize").is_dir()


def eval_steps(out: Path) -> list:
    return [entry["step"] for entry in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "eval_accuracy" in entry]


def test_load_best_saves_the_whole_model_of_the_best_evaluation(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """The evaluation peaks at step 2 of 5: the saved model is step 2's, file by file (the classifier included),
    though training went on to step 5; the card and the curves say so. Checkpointed every step, one kept: step 1's
    best file goes once the checkpoint that needed it does (it stayed until the next improvement, here none)."""
    scripted = Scripted(monkeypatch, tmp_path, {1: 0.3, 2: 0.7, 3: 0.5, 4: 0.7, 5: 0.6})  # a tie is no improvement
    out = tmp_path / "run"
    code, stdout, err = call(capsys, *nli_run(tiny_model_dir, tmp_path, "--max-steps", 5, "--load-best",
                                              "--save-steps", 1, "--save-total-limit", 1), "--out", out)
    assert code == 0, err
    assert scripted.calls == [1, 2, 3, 4, 5]
    assert_same_model(out, scripted.snapshots / "step-2")
    last = scripted.snapshots / "step-5"
    assert (out / "model.safetensors").read_bytes() != (last / "model.safetensors").read_bytes()
    classifier = "softmax_classifier.safetensors"
    assert (out / classifier).read_bytes() != (last / classifier).read_bytes()
    assert "keeping the model of step 2 of 5" in stdout and "accuracy: 0.7000" in stdout
    card = (out / "README.md").read_text()
    assert ("The model saved is step 2's of 5: the best eval_accuracy of 5 evaluation(s), 0.7000 (higher is better; "
            "--load-best)." in card and "| **2** |" in card)
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["best-step-0000002.safetensors",
                                                                              "step-0000004"]
    assert (out / "loss.png").is_file()
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    drawn = curves.series(history, "eval_accuracy", 2)
    assert drawn["kept"] == (2, 0.7) and [step for step, _ in drawn["eval"]] == [1, 2, 3, 4, 5]
    assert [step for step, _ in drawn["loss"]] == [1, 2, 3, 4, 5] and drawn["partial"] is None


def test_early_stopping_ends_the_run_after_n_evaluations_without_improvement(capsys, tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    """Patience 2: best at step 2, no better at 3 and 4 -> training ends at step 4 of 10; the evaluation of step 4
    is the final one (not run twice), and the last step's model is saved (no --load-best). Logged every 3 steps,
    the loss of step 4 (a window of 1) is logged as a last step's is: loss.png and the card end where the run did."""
    values = {1: 0.3, 2: 0.6, 3: 0.6, 4: 0.5, **{step: 0.9 for step in range(5, 11)}}
    scripted = Scripted(monkeypatch, tmp_path, values)
    out = tmp_path / "run"
    code, stdout, err = call(capsys, *nli_run(tiny_model_dir, tmp_path, "--max-steps", 10, "--log-steps", 3,
                                              "--early-stopping-patience", 2), "--out", out)
    assert code == 0, err
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in history if "loss" in entry] == [3, 4]
    assert curves.series(history, "eval_accuracy")["partial"][0::2] == (4, 1)
    assert scripted.calls == [1, 2, 3, 4] and eval_steps(out) == [1, 2, 3, 4]
    assert "early stopping at step 4: 2 evaluation(s) without a better eval_accuracy than 0.6000 (step 2" in stdout
    assert "saved to" in stdout and "after 4 steps" in stdout
    assert_same_model(out, scripted.snapshots / "step-4")
    card = (out / "README.md").read_text()
    assert "Training stopped early at step 4 of 10: 2 evaluation(s) in a row without a better eval_accuracy" in card
    assert ("The model saved is the last step's (4, eval_accuracy 0.5000); the best eval_accuracy of 4 evaluation(s), "
            "0.6000 (higher is better) was at step 2: --load-best would keep that step's model." in card)
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())  # no best files kept


@pytest.mark.parametrize("how", ["signal", "kill"])
def test_resume_keeps_the_best_so_far(capsys, tiny_model_dir, tmp_path, monkeypatch, how):
    """Best at step 3 of 6. 'signal': stopped after step 4 (a checkpoint there), then --resume. 'kill': a checkpoint
    at step 2, the best of step 3 written, then killed at step 4 before any checkpoint: the resume from step 2 finds
    step 2's best (kept for that checkpoint) and trains step 3 again. Either way the saved model is the one an
    uninterrupted run saves, byte for byte."""
    values = {1: 0.2, 2: 0.4, 3: 0.8, 4: 0.5, 5: 0.6, 6: 0.7}
    common = nli_run(tiny_model_dir, tmp_path, "--max-steps", 6, "--load-best", "--save-steps", 2)
    with monkeypatch.context() as patch:
        Scripted(patch, tmp_path / "straight", values)
        assert call(capsys, *common, "--out", tmp_path / "straight")[0] == 0
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        Scripted(patch, tmp_path / "first", values, stop_at={4: how})
        code, _, err = call(capsys, *common, "--out", out)
    assert code == 130, err
    kept = sorted(path.name for path in (out / "checkpoints").iterdir())
    if how == "signal":
        assert kept == ["best-step-0000002.safetensors", "best-step-0000003.safetensors", "step-0000002",
                        "step-0000004"]  # step 2's best stays while checkpoint step 2 does
    else:
        assert kept == ["best-step-0000002.safetensors", "best-step-0000003.safetensors", "step-0000002"]
    with monkeypatch.context() as patch:
        resumed = Scripted(patch, tmp_path / "second", values)
        code, stdout, err = call(capsys, "--out", out, "--resume")
    assert code == 0, err
    assert resumed.calls == ([5, 6] if how == "signal" else [3, 4, 5, 6])
    assert "keeping the model of step 3 of 6" in stdout and "note:" not in err
    assert_same_model(out, tmp_path / "straight")
    assert eval_steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.usefixtures("one_thread")  # forked ranks hang when the parent's OpenMP pool ran with several threads
def test_two_ranks_stop_early_together_and_save_the_best(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """Under torchrun rank 0 alone evaluates: its early stop reaches the other rank (which would otherwise wait in
    the next step's all-reduce), and the model saved is the best step's, the classifier included."""
    from test_distributed import forked_ranks

    scripted = Scripted(monkeypatch, tmp_path, {1: 0.3, 2: 0.6, 3: 0.5, 4: 0.4, **{step: 0.9 for step in range(5, 9)}})
    argv = nli_run(tiny_model_dir, tmp_path, "--max-steps", 8, "--load-best", "--early-stopping-patience", 2)
    assert forked_ranks(argv, tmp_path / "run") == [0, 0]
    assert eval_steps(tmp_path / "run") == [1, 2, 3, 4]
    assert_same_model(tmp_path / "run", scripted.snapshots / "step-2")  # rank 0 (forked) wrote the snapshots


def stopped_at_step_4(capsys, monkeypatch, argv, folder: Path, values: dict) -> Path:
    out = folder / "run"
    with monkeypatch.context() as patch:
        Scripted(patch, folder / "first", values, stop_at={4: "signal"})
        assert call(capsys, *argv, "--out", out)[0] == 130
    return out


def test_a_checkpoint_of_an_earlier_version_resumes_with_early_stopping(capsys, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """A checkpoint without the new flags resumes, and --early-stopping-patience (which may change on --resume)
    counts the evaluations before the resume: 3 without improvement there, the 4th after it stops the run."""
    values = {1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2, 5: 0.1, 6: 0.9, 7: 0.9, 8: 0.9}
    out = stopped_at_step_4(capsys, monkeypatch, nli_run(tiny_model_dir, tmp_path, "--max-steps", 8), tmp_path, values)
    state = out / "checkpoints" / "step-0000004" / CHECKPOINT
    saved = torch.load(state, weights_only=True)
    for flag in ("metric_for_best", "load_best", "early_stopping_patience"):
        del saved["args"][flag]
    torch.save(saved, state)
    with monkeypatch.context() as patch:
        resumed = Scripted(patch, tmp_path / "second", values)
        code, stdout, err = call(capsys, "--out", out, "--resume", "--early-stopping-patience", 4)
    assert code == 0, err
    assert resumed.calls == [5] and "early stopping at step 5: 4 evaluation(s)" in stdout


def test_a_damaged_best_file_is_said_and_the_best_from_the_resume_on_is_kept(capsys, tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    values = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4, 5: 0.6, 6: 0.3}
    out = stopped_at_step_4(capsys, monkeypatch, nli_run(tiny_model_dir, tmp_path, "--max-steps", 6, "--load-best",
                                                         "--save-steps", 2), tmp_path, values)
    best = out / "checkpoints" / "best-step-0000002.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    with monkeypatch.context() as patch:
        resumed = Scripted(patch, tmp_path / "second", values)
        code, stdout, err = call(capsys, "--out", out, "--resume")
    assert code == 0, err
    assert f"note: {best}: cannot be read" in err and "the best from this resume on is" in err
    assert_same_model(out, resumed.snapshots / "step-5")
    assert not best.exists()


def test_each_evaluation_during_training_scores_the_weights_of_its_step(capsys, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    """The real pairs evaluator, every step: each evaluation equals that of the step's model saved and loaded
    afresh. (torch's fused AdamW changes the weights without bumping their versions, by which encode tells that
    its inference copy is stale: without a refresh, every evaluation after the first scored the first's weights,
    and --load-best kept the first evaluated step.)"""
    import minilm

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a man plays {i}\tsomeone plays {i % 5}\t0.{i % 10}\n"
                                                            for i in range(24)))
    scored = []
    evaluate = train.evaluate

    def evaluate_and_check(run):
        metrics = evaluate(run)
        run.model.save(tmp_path / "snapshot")
        scored.append((metrics, run.evaluator(minilm.load(str(tmp_path / "snapshot"), device="cpu"))))
        return metrics
    monkeypatch.setattr(train, "evaluate", evaluate_and_check)
    code, _, err = call(capsys, "--model", tiny_model_dir, "--loss", "cosine", "--data", pairs, "--batch-size", 8,
                        "--lr", "1e-2", "--max-steps", 3, "--eval-task", "pairs", "--eval-steps", 1, "--out",
                        tmp_path / "run")
    assert code == 0, err
    assert len(scored) == 3 and len({during["pearson_cosine"] for during, _ in scored}) == 3
    for during, afresh in scored:
        assert during == pytest.approx(afresh, abs=1e-6)  # the same weights, encoded in another order


@pytest.mark.parametrize("precision", ["int8", "auto"])
def test_the_evaluation_encodes_in_eval_precision(capsys, tiny_model_dir, tmp_path, precision):
    """--eval-precision: the final evaluation is eval.py's at that precision on the saved model (auto: what
    fast_paths.resolve_precision picks on this CPU), and int8's differs from fp32's: the precision reached encode."""
    import minilm
    from minilm import fast_paths

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a man plays {i}\tsomeone plays {i % 5}\t0.{i % 10}\n"
                                                            for i in range(24)))
    code, _, err = call(capsys, "--model", tiny_model_dir, "--loss", "cosine", "--data", pairs, "--batch-size", 8,
                        "--max-steps", 2, "--eval-task", "pairs", "--eval-precision", precision, "--out",
                        tmp_path / "run")
    assert code == 0, err
    logged = [entry for entry in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
              if "eval_pearson_cosine" in entry][-1]
    evaluator = evaluation.for_task("pairs", pairs, "test")
    saved = minilm.load(str(tmp_path / "run"), device="cpu")
    evaluator.precision = ran = fast_paths.resolve_precision("cpu", precision)
    assert logged["eval_pearson_cosine"] == pytest.approx(evaluator(saved)["pearson_cosine"], abs=1e-6)
    if precision == "int8":
        evaluator.precision = "fp32"
        assert logged["eval_pearson_cosine"] != pytest.approx(evaluator(saved)["pearson_cosine"], abs=1e-6)
    card = (tmp_path / "run" / "README.md").read_text().replace("`", "")
    assert f"eval_precision: {precision}" in card
    # the metrics say what they were encoded in: auto resolved on this machine, never just "auto"
    line = f"The embeddings of these metrics were computed in {ran} (--eval-precision {precision}"
    assert (line in card) == (ran != "fp32"), card


# --- flags -----------------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--load-best"], "--load-best needs --eval-task"),
    (["--early-stopping-patience", 2], "--early-stopping-patience needs --eval-task"),
    (["--metric-for-best", "accuracy"], "--metric-for-best needs --eval-task"),
    (["--eval-task", "stsb", "--load-best"], "--load-best needs --eval-steps"),
    (["--eval-task", "stsb", "--early-stopping-patience", 3], "--early-stopping-patience needs --eval-steps"),
    (["--eval-task", "stsb", "--metric-for-best", "ndcg@10"],
     "--metric-for-best ndcg@10: the stsb evaluation reports pearson_cosine, spearman_cosine"),
    (["--eval-task", "binary", "--metric-for-best", "cosine_f1_threshold"],
     "cosine_f1_threshold: is a threshold the evaluation chose, not a score"),
    (["--eval-task", "stsb", "--metric-for-best", ""], "--metric-for-best : the stsb evaluation reports"),
    (["--metric-for-best", ""], "--metric-for-best needs --eval-task"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(map(str, f)) for f, _ in BAD_FLAGS])
def test_bad_flag_combinations_are_one_line_before_anything_is_read(capsys, tmp_path, flags, message):
    out = tmp_path / "run"
    code, _, err = call(capsys, "--model", tmp_path / "no-model", "--loss", "cosine", "--data", tmp_path / "none.tsv",
                        "--out", out, *flags)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_the_metric_for_best_is_named_as_the_evaluator_or_the_log_names_it():
    def args(task, metric=None):
        return train.parse_args(["--out", "x", "--eval-task", task, *(["--metric-for-best", metric] if metric
                                                                       else [])])[0]
    assert best_model.metric_for_best(args("retrieval")) == "cosine_ndcg@10"
    assert best_model.metric_for_best(args("stsb", "eval_pearson_cosine")) == "pearson_cosine"
    assert best_model.metric_for_best(args("stsb", "pearson_cosine")) == "pearson_cosine"
    assert best_model.metric_for_best(train.parse_args(["--out", "x"])[0]) is None


def test_higher_is_better_except_for_a_loss_and_a_nan_never_improves(tmp_path, monkeypatch, capsys):
    """The rule, on BestModel alone (no files: rank 1): a tie keeps the earlier step; nan counts as no improvement,
    also when every evaluation so far is nan (early stopping then still ends the run)."""
    class WithALoss:
        main_metric, metric_names = "spearman_cosine", ("spearman_cosine", "mse_loss")
    monkeypatch.setitem(evaluation.TASK_EVALUATORS, "pairs", WithALoss)
    nan = float("nan")
    for metric, values, best_step in (("spearman_cosine", [nan, 0.5, 0.6, 0.6, 0.2], 3),
                                      ("mse_loss", [nan, 0.5, 0.4, 0.4, 0.9], 3)):
        args = train.parse_args(["--out", "x", "--eval-task", "pairs", "--metric-for-best", metric,
                                 "--early-stopping-patience", "9"])[0]
        best = best_model.BestModel(args, tmp_path, [], 10, 1, [])
        for step, value in enumerate(values, 1):
            best.update(step, {"spearman_cosine": value, "mse_loss": value}, None, None)
        assert (best.best_step, best.since_best, best.stopped_at) == (best_step, 2, None), metric
    best = best_model.BestModel(train.parse_args(["--out", "x", "--eval-task", "pairs", "--eval-steps", "1",
                                                  "--early-stopping-patience", "2"])[0], tmp_path, [], 10, 1, [])
    for step in (1, 2):
        best.update(step, {"spearman_cosine": nan, "mse_loss": 0.0}, None, None)
    assert best.best_step is None and best.stopped_at == 2 and "than nan (all" in capsys.readouterr().out
    assert "Training stopped early at step 2 of 10" in best.summary()["text"]
    notes = []  # --eval-steps at or past the last step: no evaluation during training, the flags do nothing
    args = train.parse_args(["--out", "x", "--eval-task", "pairs", "--eval-steps", "10", "--load-best"])[0]
    best_model.BestModel(args, tmp_path, [], 10, 1, notes)
    assert notes == ["--eval-steps 10: the run has 10 step(s), so no evaluation falls during training and --load-best "
                     "has only the last step's; lower --eval-steps"]


def test_each_evaluator_declares_the_metrics_it_reports():
    """evaluation.py's lists (what --metric-for-best is checked against before anything is read) are the names
    the metric functions return, the primary metric among them, for every task."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    scores, labels = [0.1, 0.5, 0.2, 0.9, 0.0, 1.0], [0, 1, 0, 1, 1, 0]
    returned = {evaluation.EmbeddingSimilarityEvaluator: evaluation.similarity_metrics(a, b, scores),
                evaluation.BinaryClassificationEvaluator: evaluation.binary_metrics(a, b, labels),
                evaluation.InformationRetrievalEvaluator: evaluation.retrieval_metrics(a, b, [{i} for i in range(6)]),
                evaluation.LabelAccuracyEvaluator: {"accuracy": 0.5}}
    for evaluator, metrics in returned.items():
        assert tuple(metrics) == evaluator.metric_names and evaluator.main_metric in evaluator.metric_names
    assert set(evaluation.TASK_EVALUATORS) == set(evaluation.TASKS)


# --- curves ----------------------------------------------------------------------------------------------------

def test_a_partial_last_window_is_kept_apart_and_marked():
    """360 steps logged every 50: the last entry averages 10 steps; it is not drawn as part of the curve but as a
    marked point of its own, and the table says so."""
    from minilm import model_card

    history = [{"step": step, "epoch": step / 360, "loss": 0.02} for step in range(50, 351, 50)]
    history += [{"step": 360, "epoch": 1.0, "loss": 0.028}, {"step": 360, "epoch": 1.0, "eval_spearman_cosine": 0.8}]
    drawn = curves.series(history, "eval_spearman_cosine")
    assert [step for step, _ in drawn["loss"]] == list(range(50, 351, 50))
    assert drawn["partial"] == (360, 0.028, 10) and drawn["eval"] == [(360, 0.8)] and drawn["kept"] is None
    table = model_card.training_log_table(history, drawn, "eval_spearman_cosine", None)
    assert "| 1.0 | 360 | 0.0280 (mean of the last 10 step(s) only) | 0.8000 |" in table
    whole = curves.series(history[:-2] + [{"step": 400, "epoch": 1.1, "loss": 0.03}])
    assert whole["partial"] is None and whole["loss"][-1] == (400, 0.03)  # a whole window is a point like others
    assert curves.series([{"step": 4, "epoch": 1.0, "loss": 0.5}])["partial"] is None  # nothing to stand apart from


def test_loss_png_draws_the_series(tmp_path, monkeypatch):
    """plot draws what series gives: the partial point hollow and alone, the evaluation in a second panel, the
    kept step starred (matplotlib's calls recorded, no pixels compared)."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda axes, *args, **kwargs: drawn.append((args, kwargs)) or plot(axes, *args, **kwargs))
    history = [{"step": step, "epoch": 0.0, "loss": 1.0 / step} for step in (10, 20, 30, 35)]
    history += [{"step": step, "epoch": 0.0, "eval_accuracy": value} for step, value in ((20, 0.5), (35, 0.4))]
    assert curves.plot(curves.series(history, "eval_accuracy", 20), "eval_accuracy", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    (loss, _), (partial, hollow), (evaluations, _), (kept, star) = drawn
    assert list(loss[0]) == [10, 20, 30] and partial == ([35], [1.0 / 35]) and hollow["markerfacecolor"] == "none"
    assert "last 5 step(s)" in hollow["label"]
    assert list(evaluations[0]) == [20, 35] and kept == ([20], [0.5]) and "kept: step 20" in star["label"]
