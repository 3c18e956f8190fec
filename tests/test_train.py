"""train.py end to end on the tiny random BERT (tests/conftest.py): recipes, kill-and-resume, SIGINT, NaN stop,
--overwrite, log.jsonl after a resume; one recipe on the real weights. Runs are in-process (train.main) unless
the process itself is the point (kill -9, a signal)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from minilm import checkpoint, optimizer, run_folder
from conftest import REPO, child_env, shared_data

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = sorted((REPO / "recipes").glob("*.json"))
SEEDS = REPO.parent / "shared" / "seeds"


def run_train(capsys, *argv) -> tuple:
    """train.main in this process -> (exit status, stdout, stderr)."""
    try:
        code = train.main([str(a) for a in ("--no-progress", *argv)])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(capsys, *argv) -> str:
    code, out, err = run_train(capsys, *argv)
    assert code == 0, out[-2000:] + err[-2000:]
    return out


def small_stsb(folder: Path, train_rows=96, dev_rows=40) -> Path:
    """A slice of STS-B in its own layout (train.tsv, dev.tsv) under a temporary folder."""
    stsb = shared_data("stsb")
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_rows), ("dev", dev_rows)):
        lines = (stsb / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[:count]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def log_steps(out: Path) -> list:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def weights_equal(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key  # measured: bit-identical


# --- recipes ---------------------------------------------------------------------------------------------------

def test_recipes_cover_every_seed_card():
    """Every seed card has a recipe (on local stand-in data, and for three of them on real retrieval/NLI data),
    and every recipe names a seed card that exists."""
    if not SEEDS.is_dir():
        pytest.skip(f"{SEEDS} is absent: the seed cards live in ../shared/seeds beside the repo")
    cards = {Path(json.loads(r.read_text())["seed_card"]).name for r in RECIPES
             if "seed_card" in json.loads(r.read_text())}  # recipe 005 (distillation) follows no seed card
    assert cards == {p.name for p in SEEDS.glob("*.txt")}
    assert len(RECIPES) >= len(cards) == 5


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_flags_are_valid(recipe, tmp_path):
    """Every recipe parses through the same checks as the flags, and with its data passes check_args."""
    values = train.build_parser().values_from_json(str(recipe), "--recipe", ignored=train.RECIPE_NOTES)
    settings = json.loads(recipe.read_text())
    assert set(values) == set(settings) - set(train.RECIPE_NOTES)
    data = shared_data("sick", "SICK.tsv") if values["loss"] == "softmax" else shared_data("stsb")
    args, given = train.parse_args(["--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "r")])
    train.check_args(args)
    assert args.loss in train.LOSSES and args.batch_size == settings["batch_size"]
    if SEEDS.is_dir() and "seed_card" in settings:
        assert (REPO / settings["seed_card"]).resolve().is_file(), settings["seed_card"]


def test_recipe_end_to_end_on_the_real_weights(capsys, model_dir, tmp_path):
    """Recipe 002 on the real all-MiniLM-L6-v2 (a slice of STS-B): the card, the log, the evaluation, and a
    save that sentence-transformers loads to the same embeddings."""
    recipe = REPO / "recipes" / "002_binary_cosine.json"
    settings = json.loads(recipe.read_text())
    out = tmp_path / "run"
    ok(capsys, "--recipe", recipe, "--model", model_dir, "--data", small_stsb(tmp_path / "stsb"),
       "--max-steps", 4, "--log-steps", 2, "--eval-steps", 2, "--batch-size", 8, "--out", out)
    card = (out / "README.md").read_text()
    for section in ("## Model Details", "### Full Model Architecture", "#### Non-Default Hyperparameters",
                    "### Training Logs", "## Evaluation", "### Framework Versions", "min:", "mean:", "max:"):
        assert section in card, section
    assert f"Maximum Sequence Length:** {settings['max_seq_length']} tokens" in card
    assert ("Normalize()" in card) == (settings["normalize"] != "no")
    assert log_steps(out) == [2, 4]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "eval_cosine_ap" in entry] == [2, 4]
    manifest = json.loads((out / run_folder.MANIFEST).read_text())
    assert set(manifest["files"]) == set(os.listdir(out))

    st = pytest.importorskip("sentence_transformers")
    import minilm

    ours = minilm.load(str(out), device="cpu")
    reference = st.SentenceTransformer(str(out), device="cpu")
    assert reference.max_seq_length == settings["max_seq_length"]
    sentences = ["A man is playing a guitar.", "Someone plays music.", "The stock market fell."]
    # Measured 1.7e-7 (the same float32 model through two code paths).
    assert np.abs(reference.encode(sentences) - ours.encode(sentences)).max() < 5e-7


def test_the_cards_non_default_hyperparameters_are_those_that_differ_from_train_pys_defaults(capsys, tiny_model_dir,
                                                                                              tmp_path):
    """The card's "Non-Default Hyperparameters" once listed lr 5e-05, epochs 1, precision auto and eval_precision
    fp32 on a run that set none of them: every value that was set, not those that differ from the defaults."""
    from minilm import model_card

    parser = train.build_parser()
    assert model_card.NON_DEFAULT == {key: parser.get_default(key) for key in model_card.NON_DEFAULT}
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))
    # It then left out the flags it did not know, such as --weight-decay, --seed and --normalize.
    ok(capsys, "--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 8, "--max-steps", 2,
       "--weight-decay", 0.01, "--seed", 7, "--normalize", "no", "--out", tmp_path / "run")
    card = (tmp_path / "run" / "README.md").read_text()
    listed = card.split("#### Non-Default Hyperparameters", 1)[1].split("####", 1)[0].split()
    assert listed == ["-", "`batch_size`:", "8", "-", "`max_steps`:", "2", "-", "`weight_decay`:", "0.01",
                      "-", "`seed`:", "7", "-", "`normalize`:", "no"], listed
    # --precision auto (the default) picks per machine; the card once showed only "auto", not what ran
    assert "Training computed in fp32 (--precision auto)." in card


def sick_like(path: Path, pairs_per_label=30, seed=0) -> Path:
    """A SICK-format file whose label follows from the pair: the same sentence (entailment), the sentence with a
    negation (contradiction), an unrelated sentence (neutral). Balanced: chance is 1/3."""
    rng = np.random.default_rng(seed)
    words = "red blue cat dog runs sits on the mat park ball green child eats apple".split()
    header = "pair_ID\tsentence_A\tsentence_B\tentailment_label\trelatedness_score\tSemEval_set"
    lines, number = [header], 0
    for split in ("TRAIN", "TEST"):
        for _ in range(pairs_per_label):
            a, other = (" ".join(rng.choice(words, size=6)) for _ in range(2))
            for b, label in ((a, "ENTAILMENT"), (f"nobody {a} not", "CONTRADICTION"), (other, "NEUTRAL")):
                number += 1
                lines.append(f"{number}\t{a}\t{b}\t{label}\t3.0\t{split}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_softmax_classifier_is_saved_and_beats_chance(capsys, tiny_model_dir, tmp_path):
    """SoftmaxLoss trains, saves its classifier, and eval.py --task nli scores it: far above chance (1/3)."""
    import eval as eval_script

    data = sick_like(tmp_path / "SICK_like.tsv")
    out = tmp_path / "nli"
    ok(capsys, "--model", tiny_model_dir, "--loss", "softmax", "--data", data, "--batch-size", 16, "--epochs", 4,
       "--lr", "3e-3", "--save-steps", 0, "--out", out)
    assert eval_script.main(["--model", str(out), "--task", "nli", "--data", str(data), "--split", "test",
                             "--json", str(tmp_path / "nli.json")]) == 0
    accuracy = json.loads((tmp_path / "nli.json").read_text())["metrics"]["accuracy"]
    assert accuracy >= 0.8, accuracy


def test_gradient_clipping_counts_the_model_not_the_loss_classifier(tiny_model_dir):
    """As in sentence-transformers' trainer: the model's gradients are clipped together; SoftmaxLoss's classifier
    neither counts in their norm nor is scaled."""
    import minilm
    from losses.softmax import SoftmaxLoss

    model = minilm.load(str(tiny_model_dir), device="cpu")
    loss_fn = SoftmaxLoss(model, 3)
    generator = torch.Generator().manual_seed(0)
    for parameter in loss_fn.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    loss_fn.classifier.weight.grad *= 1000  # far larger than the model's: it must not shrink them further
    model_grads = [p.grad.clone() for p in model.parameters()]
    classifier_grad = loss_fn.classifier.weight.grad.clone()
    model_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in model_grads]))
    assert model_norm > 1
    assert torch.isclose(optimizer.clip_gradients(model, 1.0), model_norm)
    for before, parameter in zip(model_grads, model.parameters()):
        assert torch.allclose(parameter.grad, before / model_norm, atol=1e-6)
    assert torch.equal(loss_fn.classifier.weight.grad, classifier_grad)


def test_trainer_equivalence_starts_train_py_from_the_given_classifier(tiny_model_dir, tmp_path):
    """benchmarks/trainer_equivalence.py patches the reference's initial classifier into train.py's SoftmaxLoss:
    an all-zero classifier gives logits of 0, so the first step's loss is ln 3 exactly; the patch is undone."""
    import importlib.util
    import math
    import minilm
    from losses.softmax import SoftmaxLoss

    spec = importlib.util.spec_from_file_location("equivalence", REPO / "benchmarks" / "trainer_equivalence.py")
    equivalence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(equivalence)
    dim = minilm.load(str(tiny_model_dir), device="cpu").embedding_dim
    zero = {"weight": torch.zeros(3, 3 * dim), "bias": torch.zeros(3)}
    data = tmp_path / "nli.jsonl"
    data.write_text("".join(json.dumps({"premise": f"a man plays {word}", "hypothesis": "a man plays", "label": i % 3})
                            + "\n" for i, word in enumerate(["chess", "golf", "cards", "the piano"])))
    init = SoftmaxLoss.__init__
    losses = equivalence.minilm_run(tiny_model_dir, "softmax", data, 4, 2, tmp_path / "run", zero, 1.0)
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(3), abs=1e-6) and losses[1] != losses[0]
    assert SoftmaxLoss.__init__ is init


# --- resume, kill, signals -------------------------------------------------------------------------------------

def tiny_run(tiny_model_dir, data, *extra):
    return ["--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 8, "--lr", "1e-3",
            "--log-steps", 2, *extra]


def killing_script(tmp_path: Path, when: str) -> Path:
    """A script that runs train.main and kills its own process with SIGKILL at a chosen moment:
    'after-checkpoint': right after checkpoint step 8 is in place; 'during-checkpoint': after step 8's state.pt
    is written into its .partial folder, before the rename."""
    script = tmp_path / "killed_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch, train
        import minilm.checkpoint
        when = {when!r}
        if when == "after-checkpoint":
            save = minilm.checkpoint.save_checkpoint
            def save_then_die(out, checkpoint, limit, rank):
                final = save(out, checkpoint, limit, rank)
                if checkpoint["state"]["step"] == 8:
                    os.kill(os.getpid(), signal.SIGKILL)
                return final
            minilm.checkpoint.save_checkpoint = save_then_die
        else:
            write = torch.save
            def write_then_die(obj, path, *args, **kwargs):
                write(obj, path, *args, **kwargs)
                if ".partial-0000008" in str(path):
                    os.kill(os.getpid(), signal.SIGKILL)
            torch.save = write_then_die
        sys.exit(train.main(sys.argv[1:]))
    """))
    return script


@pytest.mark.parametrize("when", ["after-checkpoint", "during-checkpoint"])
def test_killed_run_resumes_to_the_uninterrupted_weights(capsys, tiny_model_dir, tmp_path, when):
    data = small_stsb(tmp_path / "stsb")
    common = tiny_run(tiny_model_dir, data, "--max-steps", 12, "--save-steps", 4)
    ok(capsys, *common, "--out", tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    result = subprocess.run([sys.executable, killing_script(tmp_path, when), "--no-progress", *map(str, common),
                             "--out", interrupted], capture_output=True, text=True, timeout=120, env=child_env())
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not (interrupted / "model.safetensors").exists()
    leftover = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    expected = ["step-0000004", "step-0000008"] if when == "after-checkpoint" else \
        [".partial-0000008", "step-0000004"]
    assert leftover == expected

    out = ok(capsys, "--out", interrupted, "--resume")
    resumed_from = "step-0000008" if when == "after-checkpoint" else "step-0000004"
    assert f"resuming from {interrupted / 'checkpoints' / resumed_from}" in out
    weights_equal(tmp_path / "straight", interrupted)
    assert log_steps(interrupted) == log_steps(tmp_path / "straight") == [2, 4, 6, 8, 10, 12]
    assert not (interrupted / "checkpoints" / ".partial-0000008").exists() or when == "after-checkpoint"


def test_sigint_finishes_the_step_writes_a_checkpoint_and_exits_130(capsys, tiny_model_dir, tmp_path):
    data = small_stsb(tmp_path / "stsb", train_rows=400)
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "--no-progress",
               *map(str, tiny_run(tiny_model_dir, data, "--max-steps", 100000, "--save-steps", 0, "--log-steps", 1)),
               "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=child_env())
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
            assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and f"--out {out} --resume" in stderr
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.removeprefix("step-"))
    assert f"after step {step}" in stderr

    # Resume for two more steps (extending --max-steps is allowed): every step logged once, in order.
    ok(capsys, "--out", out, "--resume", "--max-steps", step + 2)
    assert log_steps(out) == list(range(1, step + 3))


def test_a_second_signal_says_whether_a_checkpoint_is_there_to_resume(capsys, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    """Stopped at once before the first checkpoint, a new run keeps nothing: the message says to run the command
    again, not --resume (which would find no run). After a checkpoint, it names it and the --resume command."""
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))
    out = tmp_path / "run"

    def signalled_twice(run, stop):
        raise checkpoint.StoppedAtOnce

    with monkeypatch.context() as patch:
        patch.setattr(train, "train", signalled_twice)
        code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 4), "--out", out)
    assert code == 130 and not out.exists() and "--resume" not in err and "run the same command again" in err, err
    with monkeypatch.context() as patch:  # Ctrl-C once in the first step: checkpoint step 1
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        assert run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 4), "--out", out)[0] == 130
    with monkeypatch.context() as patch:
        patch.setattr(train, "train", signalled_twice)
        code, _, err = run_train(capsys, "--out", out, "--resume")
    assert code == 130 and str(out / "checkpoints" / "step-0000001") in err and f"--out {out} --resume" in err, err


def test_nan_loss_stops_and_keeps_the_last_checkpoint(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_train(capsys, "--model", tiny_model_dir, "--loss", "mnrl", "--data",
                             small_stsb(tmp_path / "stsb", train_rows=200), "--min-score", 0, "--batch-size", 8,
                             "--max-steps", 30, "--lr", "1e12", "--save-steps", 1, "--log-steps", 1, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the loss became nan" in err.lower() or "became inf" in err.lower()
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / checkpoint.CHECKPOINT).is_file()
    assert str(checkpoints[-1]) in err
    assert not (out / "model.safetensors").exists()


def stopped_at_once(self):
    """StopRequest.__enter__ as if Ctrl-C came during the first step: the run checkpoints step 1 and exits 130."""
    self.signal = "SIGINT"
    return self


def test_resume_refuses_changed_flags_and_data_and_accepts_safe_ones(capsys, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    data = tmp_path / "pairs.tsv"
    original = "sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(40))
    data.write_text(original)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 8, "--save-steps", 2),
                                 "--out", out)
    assert code == 130, err
    code, _, err = run_train(capsys, "--out", out, "--resume", "--lr", "0.1")
    assert code == 2 and "--lr 0.1: the run being resumed used 0.001" in err
    data.write_text(original + "c\td\t0.5\n")
    code, _, err = run_train(capsys, "--out", out, "--resume", "--max-steps", 10)
    assert code == 2 and f"{data} changed since the checkpoint" in err and len(err.splitlines()) == 1
    data.write_text(original)
    ok(capsys, "--out", out, "--resume", "--max-steps", 10)  # --max-steps may change
    assert log_steps(out)[-1] == 10
    # A finished run is not resumed: its last checkpoint is older than its model, so it would train again.
    code, _, err = run_train(capsys, "--out", out, "--resume", "--max-steps", 12)
    assert code == 2 and "this run finished" in err and "--overwrite" in err
    assert log_steps(out)[-1] == 10


# --- output folders --------------------------------------------------------------------------------------------

def test_overwrite_replaces_a_previous_run_only_after_success(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))
    out = tmp_path / "run"
    ok(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 2, "--save-steps", 0), "--out", out)
    first = (out / "model.safetensors").read_bytes()

    # A retry that fails (NaN) leaves the previous run as it was.
    code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 6, "--save-steps", 0,
                                               "--log-steps", 1), "--lr", "1e30", "--out", out, "--overwrite")
    assert code == 2 and "became" in err
    assert (out / "model.safetensors").read_bytes() == first

    # A retry that succeeds takes its place; nothing of the old run remains beside it, and no staging folder.
    ok(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 3, "--save-steps", 0), "--out", out, "--overwrite")
    assert (out / "model.safetensors").read_bytes() != first
    assert log_steps(out) == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["pairs.tsv", "run"]


def test_an_interrupted_overwrite_keeps_the_old_run_and_resumes_into_its_place(capsys, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))
    out = tmp_path / "run"
    ok(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 2, "--save-steps", 0), "--out", out)
    first = (out / "model.safetensors").read_bytes()

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 4), "--out", out,
                                 "--overwrite")
    staging = run_folder.staging_folder(out)
    assert code == 130 and f"--out {staging} --resume" in err
    assert (out / "model.safetensors").read_bytes() == first  # the old run is untouched
    assert (staging / "checkpoints" / "step-0000001").is_dir()
    # Resuming the old, finished run instead is refused, and the message points to the unfinished one.
    code, _, err = run_train(capsys, "--out", out, "--resume")
    assert code == 2 and "this run finished" in err and f"--out {staging} --resume" in err

    ok(capsys, "--out", staging, "--resume")
    assert not staging.exists() and (out / "model.safetensors").read_bytes() != first
    assert log_steps(out) == [2, 4]
    assert sorted(os.listdir(tmp_path)) == ["pairs.tsv", "run"]


def test_a_file_the_user_puts_in_a_run_folder_is_never_listed_or_removed(capsys, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    """A note dropped into a stopped run's folder, then --resume to the end: the manifest does not list the
    note as the run's, so --overwrite refuses the folder (naming it) instead of deleting it with the run."""
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 3), "--out", out)
    assert code == 130, err
    (out / "my-notes.txt").write_text("mine")
    ok(capsys, "--out", out, "--resume")
    listed = run_folder.read_manifest(out)["files"]
    assert "my-notes.txt" not in listed and {"model.safetensors", "config.json", "1_Pooling"} <= set(listed)
    code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 2), "--out", out, "--overwrite")
    assert code == 2 and "my-notes.txt" in err and "no minilm run wrote" in err
    assert (out / "my-notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


@pytest.mark.parametrize("folder", ["new", "empty"])
def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_trace(capsys, tiny_model_dir, tmp_path, folder):
    """NaN at the first step: nothing of the failed run stays (a new --out is removed, an empty one emptied), so
    the same command, corrected, runs again without --overwrite or --resume."""
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))
    out = tmp_path / "run"
    if folder == "empty":
        out.mkdir()
    code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 4, "--log-steps", 1),
                             "--lr", "1e30", "--out", out)
    assert code == 2 and "became" in err and "none was written yet" in err
    assert (os.listdir(out) == []) if folder == "empty" else not out.exists()
    ok(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 2), "--out", out)


def test_grad_accum_drops_an_epochs_leftover_batches(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """6 rows, batch 2, --grad-accum 2: each epoch has 3 batches, so 1 step; the third batch is dropped, not
    added into the next epoch's step (which would make that gradient 1.5x as large)."""
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i}\n" for i in range(6)))
    calls = []
    forward = train.LOSSES["cosine"].forward
    monkeypatch.setattr(train.LOSSES["cosine"], "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    ok(capsys, "--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 2, "--grad-accum", 2,
       "--epochs", 3, "--save-steps", 0, "--log-steps", 1, "--out", tmp_path / "run")
    assert log_steps(tmp_path / "run") == [1, 2, 3]
    assert len(calls) == 3 * 2  # steps x micro-batches per step


def test_resume_from_another_folder_finds_the_runs_relative_paths(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """A run started with relative paths resumes from any folder; the same file named another way
    (../work/pairs.tsv) is the same flag, and the log after the resume equals an uninterrupted run's."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    (work / "pairs.tsv").write_text("sentence1\tsentence2\tscore\n"
                                    + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))
    monkeypatch.chdir(work)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, "pairs.tsv", "--max-steps", 4), "--out", "run")
    assert code == 130, err
    monkeypatch.chdir(elsewhere)
    ok(capsys, "--out", work / "run", "--resume", "--data", "../work/pairs.tsv")
    assert log_steps(work / "run") == [2, 4]
    card = (work / "run" / "README.md").read_text()
    assert "**Training Dataset:** pairs.tsv" in card and str(work) not in card  # as given, not the resolved path


def test_the_loss_logged_after_a_resume_equals_the_uninterrupted_runs(capsys, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    """Stopped after step 1 of a run that logs every 3 steps: the loss logged at step 3 after --resume averages
    steps 1-3, as the uninterrupted run's does (the running sum is in the checkpoint)."""
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))
    common = tiny_run(tiny_model_dir, data, "--max-steps", 6, "--log-steps", 3)
    ok(capsys, *common, "--out", tmp_path / "straight")
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        code, _, err = run_train(capsys, *common, "--out", tmp_path / "stopped")
    assert code == 130, err
    ok(capsys, "--out", tmp_path / "stopped", "--resume")

    def losses(out):
        return [(entry["step"], entry["loss"]) for entry in map(json.loads, (out / "log.jsonl").read_text().splitlines())
                if "loss" in entry]
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 2


def test_ctrl_c_while_loading_says_what_happened_and_keeps_nothing(capsys, tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "pairs.tsv"
    data.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(24)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.minilm, "load", interrupted)
    code, _, err = run_train(capsys, *tiny_run(tiny_model_dir, data, "--max-steps", 2), "--out", tmp_path / "run")
    assert code == 130 and "interrupted outside the training steps" in err and "second signal" not in err
    assert not (tmp_path / "run").exists()


def test_weight_decay_spares_biases_and_layernorms_as_the_reference_trainer_does(tiny_model_dir):
    """sentence-transformers' trainer (the Hugging Face Trainer) decays weight matrices and embeddings only."""
    import minilm
    from losses.softmax import SoftmaxLoss

    model = minilm.load(str(tiny_model_dir), device="cpu")
    loss_fn = SoftmaxLoss(model, 3)
    decayed, spared = optimizer.parameter_groups(model, loss_fn, 0.01)
    assert decayed["weight_decay"] == 0.01 and spared["weight_decay"] == 0.0
    names = {id(p): name for name, p in loss_fn.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert "classifier.weight" in decayed_names and "model.encoder.embeddings.word.weight" in decayed_names
    assert "model.encoder.layers.0.ffn_in.weight" in decayed_names
    assert {"classifier.bias", "model.encoder.layers.0.ffn_norm.weight", "model.encoder.embeddings.norm.bias",
            "model.encoder.layers.0.attention.qkv.bias"} <= spared_names
    assert not decayed_names & spared_names
    assert len(decayed_names | spared_names) == len(list(model.parameters())) + 2  # + the classifier's


@pytest.mark.parametrize("multi_dataset, steps", [(None, 22), ("round_robin", 4)])
def test_several_datasets_are_used_whole_by_default(capsys, tiny_model_dir, tmp_path, multi_dataset, steps):
    """40 and 4 rows in batches of 2: proportional (the default, as sentence-transformers') takes all 22 batches
    an epoch; round_robin alternates until the small file runs out (2 + 2)."""
    big, small = tmp_path / "big.tsv", tmp_path / "small.tsv"
    big.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a{i}\tb{i}\t0.{i % 10}\n" for i in range(40)))
    small.write_text("sentence1\tsentence2\tscore\n" + "".join(f"c{i}\td{i}\t0.5\n" for i in range(4)))
    extra = ["--multi-dataset", multi_dataset] if multi_dataset else []
    out = ok(capsys, "--model", tiny_model_dir, "--loss", "cosine", "--data", big, small, "--batch-size", 2,
             "--save-steps", 0, "--log-steps", 1, "--out", tmp_path / "run", *extra)
    assert f"training cosine on 44 rows: {steps} steps" in out
    assert len(log_steps(tmp_path / "run")) == steps


def test_proportional_batches_take_every_batch_once_in_a_seeded_order():
    from minilm import data

    samplers = [data.RandomBatchSampler(list(range(n)), 3, seed=1) for n in (10, 4)]
    batches = data.ProportionalBatches(samplers, seed=1)
    first = list(batches)
    assert len(first) == len(batches) == 4 + 2
    for index, size in ((0, 10), (1, 4)):
        assert sorted(i for owner, batch in first if owner == index for i in batch) == list(range(size))
    assert list(batches) == first  # the same epoch, the same order
    batches.set_epoch(1)
    assert list(batches) != first
