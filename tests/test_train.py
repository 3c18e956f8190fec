"""train.py end to end: the five seed recipes, kill-and-resume, NaN stop, output-directory safety."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import REPO, shared_data

RECIPES = sorted((REPO / "recipes").glob("*.json"))


def train(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "train.py", "--no-progress", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, **kwargs)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def data_for(recipe: Path) -> Path:
    loss = json.loads(recipe.read_text())["loss"]
    return shared_data("sick", "SICK.tsv") if loss == "softmax" else shared_data("stsb")


def test_five_recipes_cover_the_seed_cards():
    assert len(RECIPES) == 5
    cards = {json.loads(r.read_text())["seed_card"] for r in RECIPES}
    assert {Path(c).name for c in cards} == {p.name for p in (REPO.parent / "shared" / "seeds").glob("*.txt")} \
        or not (REPO.parent / "shared" / "seeds").exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_and_saves_a_loadable_model(recipe, tmp_path):
    out = tmp_path / "run"
    train("--recipe", recipe, "--data", data_for(recipe), "--max-steps", 20, "--out", out, "--log-steps", 5)
    settings = json.loads(recipe.read_text())
    card = (out / "README.md").read_text()
    for section in ("## Model Details", "### Full Model Architecture", "#### Non-Default Hyperparameters",
                    "### Training Logs", "## Evaluation", "### Framework Versions", "min:", "mean:", "max:"):
        assert section in card, section
    assert f"Maximum Sequence Length:** {settings['max_seq_length']} tokens" in card
    assert ("Normalize()" in card) == (settings["normalize"] != "no")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry] == [5, 10, 15, 20]
    assert any(key.startswith("eval_") for key in log[-1])

    st = pytest.importorskip("sentence_transformers")
    import minilm

    ours = minilm.load(str(out), device="cpu")
    reference = st.SentenceTransformer(str(out), device="cpu")
    assert reference.max_seq_length == settings["max_seq_length"]
    sentences = ["A man is playing a guitar.", "Someone plays music.", "The stock market fell."]
    assert np.abs(reference.encode(sentences) - ours.encode(sentences)).max() < 1e-5
    if settings["loss"] == "softmax":
        result = subprocess.run([sys.executable, "eval.py", "--model", out, "--task", "nli", "--split", "test",
                                 "--data", data_for(recipe), "--json", tmp_path / "nli.json"],
                                cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        accuracy = json.loads((tmp_path / "nli.json").read_text())["metrics"]["accuracy"]
        assert 0.3 < accuracy <= 1.0


def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    stsb = shared_data("stsb")
    common = ["--loss", "cosine", "--data", stsb, "--batch-size", 8, "--max-steps", 12, "--save-steps", 4,
              "--log-steps", 2, "--lr", "1e-4"]
    train(*common, "--out", tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "train.py", "--no-progress", *map(str, common), "--out",
                                interrupted], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (interrupted / "checkpoints" / "step-0000004").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model.safetensors").exists(), "the run finished before it could be killed"

    result = train("--out", interrupted, "--resume")
    assert re.search(r"resuming from .*step-00000(04|08)", result.stdout), result.stdout
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert (straight[key] - resumed[key]).abs().max() <= 1e-6, key


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train("--loss", "mnrl", "--data", shared_data("stsb"), "--batch-size", 8, "--max-steps", 30,
                   "--lr", "1e12", "--save-steps", 1, "--out", out, check=False)
    assert result.returncode != 0
    assert "the loss became nan" in result.stderr.lower() or "the loss became inf" in result.stderr.lower()
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "training_state.pt").is_file()
    assert str(checkpoints[-1]) in result.stderr
    assert not (out / "model.safetensors").exists()


def test_refuses_to_overwrite_and_checks_data_first(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = train("--loss", "cosine", "--data", shared_data("stsb"), "--out", out, check=False)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"

    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence1\tsentence2\tscore\na\tb\t0.5\nc\td\tgood\n")
    result = train("--loss", "cosine", "--data", bad, "--out", tmp_path / "other", check=False)
    assert result.returncode != 0 and f"{bad}:3" in result.stderr
    assert not (tmp_path / "other" / "checkpoints").exists()

    result = train("--loss", "softmax", "--data", shared_data("stsb"), "--out", tmp_path / "third", check=False)
    assert result.returncode != 0 and "do not fit the softmax loss" in result.stderr
