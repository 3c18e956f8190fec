"""Checkpoints are input (minilm/checkpoint.py): what train.py writes loads with torch.load(weights_only=True) after
any evaluation, and a state.pt crafted or damaged in any field ends --resume in ONE line that names the file and
the field (no traceback, no run resumed from it), and changes nothing in the run's folder. In-process
(train.main) on the tiny random BERT."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from minilm import checkpoint
from minilm.checkpoint import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = "sentence1\tsentence2\tscore\n" + "".join(f"first {i}\tsecond {i}\t0.{i % 10}\n" for i in range(24))


def call(argv) -> int:
    try:
        return train.main(["--no-progress", *map(str, argv)])
    except SystemExit as exit:
        return exit.code


def stopped_after_step_1(argv) -> None:
    """train.py as if Ctrl-C came during the first step: it checkpoints step 1 and exits 130."""
    def stopped_at_once(self):
        self.signal = "SIGINT"
        return self
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        assert call(argv) == 130


def plain(value) -> bool:
    """Only what train.py means a checkpoint to hold: Python numbers, strings, None, lists, dicts (tensors aside)."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and plain(item) for key, item in value.items())
    if isinstance(value, list):
        return all(plain(item) for item in value)
    return value is None or type(value) in (int, float, str, bool)


@pytest.mark.parametrize("task", ["binary", "retrieval"])
def test_a_run_stopped_after_an_evaluation_resumes(capsys, tiny_model_dir, tmp_path, task):
    """The binary and retrieval evaluators compute with numpy: their metrics enter the checkpoint as plain floats,
    so the checkpoint loads (weights_only=True) and --resume continues to the end."""
    data = tmp_path / "pairs.tsv"
    data.write_text(PAIRS)
    held_out = tmp_path / f"{task}.tsv"
    held_out.write_text("sentence1\tsentence2\tlabel\n" + "".join(f"first {i}\tsecond {i}\t{i % 2}\n" for i in range(8))
                        if task == "binary" else
                        "anchor\tpositive\n" + "".join(f"first {i}\tsecond {i}\n" for i in range(8)))
    out = tmp_path / "run"
    stopped_after_step_1(["--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 4,
                          "--max-steps", 3, "--log-steps", 1, "--eval-task", task, "--eval-data", held_out,
                          "--eval-steps", 1, "--out", out])
    saved = torch.load(out / "checkpoints" / "step-0000001" / CHECKPOINT, weights_only=True)
    evaluations = [entry for entry in saved["state"]["history"] if any(key.startswith("eval_") for key in entry)]
    assert len(evaluations) == 1 and plain(saved["state"]["history"]) and plain(saved["args"])
    capsys.readouterr()
    assert call(["--out", out, "--resume"]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if any(key.startswith("eval_") for key in entry)] == [1, 2, 3]


@pytest.fixture(scope="module")
def stopped_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run stopped after step 1 of 4: one checkpoint, from which --resume would continue."""
    folder = tmp_path_factory.mktemp("stopped")
    (folder / "pairs.tsv").write_text(PAIRS)
    stopped_after_step_1(["--model", tiny_model_dir, "--loss", "cosine", "--data", folder / "pairs.tsv",
                          "--batch-size", 4, "--max-steps", 4, "--log-steps", 1, "--out", folder / "run"])
    return folder / "run"


def first_weight(saved) -> str:
    return next(iter(saved["model"]))


# (id, how the checkpoint is crafted or damaged (in place, or returning a replacement), what the line must name)
CASES = [
    # the flags: each through the check of the flag it stands for
    ("flag-of-the-wrong-type", lambda c: c["args"].update(batch_size="4"), ["'batch_size'", "'4'"]),
    ("flag-a-tensor", lambda c: c["args"].update(seed=torch.tensor(42)), ["'seed'", "Tensor"]),
    ("flag-out-of-range", lambda c: c["args"].update(lr=-1.0), ["'lr'", "> 0"]),
    ("flag-null", lambda c: c["args"].update(batch_size=None), ["'batch_size'", "null"]),
    ("flag-missing", lambda c: c["args"].pop("lr"), ["args", "lr"]),
    ("flag-unknown", lambda c: c["args"].update(learning_rate=1e-3), ["'learning_rate'"]),
    ("flag-unknown-loss", lambda c: c["args"].update(loss="triplet"), ["'loss'", "'triplet'"]),
    ("flag-data-a-number", lambda c: c["args"].update(data=5), ["'data'", "list of strings"]),
    ("flags-not-a-dict", lambda c: c.update(args=["--lr", "1"]), ["field args", "dict"]),
    ("loss-params-of-another-loss", lambda c: c["args"].update(loss_params={"scale": 20.0}),
     ["--loss-params", "cosine loss takes no parameters"]),
    # the loop's position and history
    ("step-negative", lambda c: c["state"].update(step=-1), ["state['step']", "-1", ">= 0"]),
    ("step-text", lambda c: c["state"].update(step="1"), ["state['step']", "'1'"]),
    ("step-beyond-its-batch", lambda c: c["state"].update(step=3), ["field state", "step 3", "step 1 would"]),
    ("epoch-fraction", lambda c: c["state"].update(epoch=0.5), ["state['epoch']", "0.5"]),
    ("batch-missing", lambda c: c["state"].pop("batch_in_epoch"), ["state['batch_in_epoch']", "None"]),
    ("seconds-nan", lambda c: c["state"].update(train_seconds=float("nan")), ["state['train_seconds']", "nan"]),
    ("running-count-negative", lambda c: c["state"].update(running_count=-5), ["state['running_count']"]),
    ("history-not-a-list", lambda c: c["state"].update(history={"step": 1}), ["state['history']"]),
    ("history-entry-text", lambda c: c["state"]["history"][0].update(loss="low"), ["state['history'][0]['loss']"]),
    ("history-entry-without-epoch", lambda c: c["state"]["history"][0].pop("epoch"),
     ["state['history'][0]['epoch']"]),
    # the other fields
    ("world-zero", lambda c: c.update(world=0), ["field world", ">= 1"]),
    ("cwd-a-number", lambda c: c.update(cwd=5), ["field cwd"]),
    ("fingerprint-size-text", lambda c: c["data"][0].update(bytes="many"), ["data[0]['bytes']", "'many'"]),
    ("fingerprints-missing", lambda c: c.update(data=[]), ["field data", "0 fingerprint(s) for 1 --data"]),
    ("weight-not-a-tensor", lambda c: c["model"].update({first_weight(c): [1.0]}), ["field model[", "list"]),
    ("optimizer-moment-wrong-shape", lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
     ["optimizer['state'][0]['exp_avg']", "[3]"]),
    ("optimizer-lr-text", lambda c: c["optimizer"]["param_groups"][0].update(lr="fast"),
     ["optimizer['param_groups'][0]['lr']", "'fast'"]),
    ("scheduler-step-text", lambda c: c["scheduler"].update(last_epoch="1"), ["scheduler['last_epoch']", "'1'"]),
    ("scheduler-behind-the-step", lambda c: c["scheduler"].update(last_epoch=0),
     ["scheduler['last_epoch']", "step is 1"]),
    ("scaler-not-a-dict", lambda c: c.update(scaler=[]), ["field scaler", "dict"]),
    ("random-state-damaged", lambda c: c["rng"]["numpy"].__setitem__(0, torch.zeros(3, dtype=torch.int64)),
     ["field rng", "does not restore"]),
    ("random-state-missing", lambda c: c["rng"].pop("torch"), ["field rng", "does not restore"]),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_a_crafted_or_damaged_checkpoint_is_one_line_naming_the_field(case, stopped_run, tmp_path, capsys):
    _, craft, fragments = case
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    state = out / "checkpoints" / "step-0000001" / CHECKPOINT
    saved = torch.load(state, weights_only=True)
    craft(saved)
    torch.save(saved, state)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != "minilm.lock"}
    capsys.readouterr()
    code = call(["--out", out, "--resume"])
    err = capsys.readouterr().err
    lines = err.strip("\n").splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    for fragment in [str(state), *fragments]:
        assert fragment in lines[0], (fragment, lines[0])
    after = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != "minilm.lock"}
    assert after == before, "a refused --resume changed the run's folder"
