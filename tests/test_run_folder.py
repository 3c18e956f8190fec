"""A run folder's manifest is input (crafted names never reach outside the folder), a refused run changes
nothing, and a run killed (SIGKILL) at any file of its final save is finished by --resume and replaced by
--overwrite. The kills are real: train.main runs in a forked child that kills itself at its N-th write."""

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

import train
from minilm import run_folder

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = "sentence1\tsentence2\tscore\n" + "".join(f"first {i}\tsecond {i}\t0.{i % 10}\n" for i in range(24))


def call(capsys, argv) -> tuple:
    try:
        code = train.main([str(a) for a in ("--no-progress", *argv)])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code, err, fragments):
    lines = err.strip("\n").splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])


# --- a refused run changes nothing -------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_a_run_that_loses_the_folder_to_another_removes_nothing(capsys, tiny_model_dir, tmp_path, monkeypatch, flag):
    """Two runs started on one new --out: the second checked it while it was still free, and the first marked it
    and took its lock while the second loaded its model. The second is refused, and the first run's manifest,
    log and lock stay as they were (today the second removes them on its way out)."""
    import minilm

    data = tmp_path / "pairs.tsv"
    data.write_text(PAIRS)
    out = tmp_path / "run"
    first_run = contextlib.ExitStack()
    load = minilm.load

    def load_while_the_first_run_starts(*args, **kwargs):
        if not out.exists():
            run_folder.create_run_folder(out, None)
            first_run.enter_context(run_folder.folder_lock(out, str(out)))
            (out / "log.jsonl").write_text('{"step": 1}\n')
        return load(*args, **kwargs)

    monkeypatch.setattr(minilm, "load", load_while_the_first_run_starts)
    with first_run:
        code, err = call(capsys, ["--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 4,
                                  "--max-steps", 1, "--out", out, *flag])
        assert_one_line_error(code, err, [out, "another train.py", f"pid {os.getpid()}"])
        assert sorted(os.listdir(tmp_path)) == ["pairs.tsv", "run"]
        assert sorted(os.listdir(out)) == sorted([run_folder.MANIFEST, run_folder.LOCK, "log.jsonl"])
        assert run_folder.read_manifest(out) == {"minilm_run": 1, "replaces": None,
                                                 "files": [run_folder.MANIFEST, run_folder.LOCK, "log.jsonl",
                                                           "checkpoints"]}
        assert (out / "log.jsonl").read_text() == '{"step": 1}\n'
        # and the first run's own undo, should it fail now, still finds its files
        run_folder.remove_failed_run(out, created=True)
        # it holds the lock:
        assert sorted(os.listdir(out)) == sorted([run_folder.MANIFEST, run_folder.LOCK, "log.jsonl"])


# --- killing a run at its N-th write ----------------------------------------------------------------------------
def _writes(name: str, args) -> str:
    """The path an audit event writes (a file opened for writing, a folder made, a rename's target, and a removal
    from an old run moved aside to be replaced), else ""."""
    if name == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        return os.fsdecode(args[0]) if args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) else ""
    if name == "os.mkdir":
        return os.fsdecode(args[0])
    if name == "os.rename":  # os.rename and os.replace
        return os.fsdecode(args[1])
    if name in ("os.remove", "os.rmdir", "shutil.rmtree") and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        return path if ".minilm-old" in path else ""
    return ""


def _killing_child(argv, area: str, kill_at: int, record: str) -> None:
    writes = []

    def hook(name, args):
        path = _writes(name, args)
        if path.startswith(area):
            writes.append(path)
            if len(writes) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # before the write: what kill -9 there leaves

    sys.addaudithook(hook)  # for this forked child only; it ends with os._exit, never returning to pytest
    code = train.main([str(a) for a in ("--no-progress", *argv)])
    Path(record).write_text(json.dumps(writes))
    os._exit(code)


def run_killed(argv, area: Path, kill_at: int, record: Path) -> int:
    """train.main(argv) in a forked child that SIGKILLs itself right before its kill_at-th write under `area`
    (0: never; then `record` gets the list of the paths it wrote). -> its exit status (-9: killed)."""
    child = multiprocessing.get_context("fork").Process(target=_killing_child,
                                                         args=(argv, str(area), kill_at, str(record)))
    child.start()
    child.join()
    return child.exitcode


def overwrite_args(out, data, model):
    return argparse.Namespace(out=str(out), overwrite=True, resume=False, data=[str(data)], model=str(model),
                              eval_data=None, teacher=None)


def stopped_after_step_1(capsys, tiny_model_dir, tmp_path) -> tuple:
    """A 2-step run, checkpointed at step 1 and stopped before its final save (its model files removed and its
    manifest as a running run's), and the model bytes its save writes: -> (out, data, model bytes)."""
    data = tmp_path / "pairs.tsv"
    data.write_text(PAIRS)
    out = tmp_path / "run"
    code, err = call(capsys, ["--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 4,
                              "--max-steps", 2, "--save-steps", 1, "--out", out])
    assert code == 0, err
    model = (out / "model.safetensors").read_bytes()
    running = [run_folder.MANIFEST, run_folder.LOCK, "log.jsonl", "checkpoints"]
    for name in set(os.listdir(out)) - set(running):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_folder.write_manifest(out, {"minilm_run": 1, "replaces": None, "files": running})
    return out, data, model


def test_a_run_killed_at_any_file_of_its_final_save_is_resumed_and_replaced(capsys, tiny_model_dir, tmp_path):
    """--resume, killed at its 1st write, again at its 2nd, ... until one finishes: each kill leaves a folder
    that --overwrite would replace (all of it the run's own) and that the next --resume continues; the run that
    finishes lists every entry (2_Normalize included) and saved the same model as an uninterrupted run."""
    out, data, model = stopped_after_step_1(capsys, tiny_model_dir, tmp_path)
    for kill_at in range(1, 100):
        code = run_killed(["--out", out, "--resume"], out, kill_at, tmp_path / "writes.json")
        if code != -signal.SIGKILL:
            break
        manifest = run_folder.read_manifest(out)
        assert run_folder.foreign_entries(out, manifest) == [], kill_at
        assert run_folder.check_output(overwrite_args(out, data, tiny_model_dir)) == run_folder.staging_folder(out)
    assert code == 0
    written = json.loads((tmp_path / "writes.json").read_text())
    assert kill_at == len(written) + 1  # a kill before each write of the run
    names = {part for path in written for part in Path(path).relative_to(out).parts[:1]}
    assert {"model.safetensors", "1_Pooling", "2_Normalize", "README.md", "modules.json"} <= names
    assert (out / "model.safetensors").read_bytes() == model
    manifest = run_folder.read_manifest(out)
    assert manifest["finished"] and sorted(manifest["files"]) == sorted(os.listdir(out))
    assert "2_Normalize" in manifest["files"] and "saving" not in manifest
    code, err = call(capsys, ["--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 4,
                              "--max-steps", 1, "--out", out, "--overwrite"])
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["pairs.tsv", "run", "writes.json"]


def test_an_overwrite_run_killed_while_it_saves_or_takes_the_old_runs_place_is_completed(capsys, tiny_model_dir,
                                                                                         tmp_path):
    """An --overwrite run killed in its save (the staging folder is then replaced by the next --overwrite), or
    at any write from its finished manifest on (the old run moved aside, the new one moved in, the old one's
    files removed, the manifest rewritten): the next train.py on that --out completes the move, and the
    folder then holds the new run alone."""
    data = tmp_path / "pairs.tsv"
    data.write_text(PAIRS)
    area, template = tmp_path / "area", tmp_path / "template"
    code, err = call(capsys, ["--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 4,
                              "--max-steps", 1, "--save-steps", 0, "--out", template / "run"])
    assert code == 0, err
    out = area / "run"
    overwrite = ["--model", tiny_model_dir, "--loss", "cosine", "--data", data, "--batch-size", 4, "--max-steps", 2,
                 "--save-steps", 0, "--out", out, "--overwrite"]

    def restore():
        shutil.rmtree(area, ignore_errors=True)
        shutil.copytree(template, area)

    restore()
    assert run_killed(overwrite, area, 0, tmp_path / "writes.json") == 0
    new_model = (out / "model.safetensors").read_bytes()
    written = json.loads((tmp_path / "writes.json").read_text())
    staging = run_folder.staging_folder(out)
    card = max(i for i, path in enumerate(written) if path == str(staging / "README.md"))
    marked = written.index(str(staging / run_folder.MANIFEST), card)  # the move starts after this write
    assert len(written) - marked >= 8  # the lock, two moves, removals, the manifest again
    # kill_at counts from 1: before 2_Normalize, before the finished manifest, then before each write after it
    unfinished = [written.index(str(staging / "2_Normalize")) + 1, card + 2]
    removals = [i + 1 for i, path in enumerate(written) if path.startswith(f"{out.parent}/.run.minilm-old/")]
    moving = [i for i in range(marked + 2, len(written) + 1) if i not in removals[1:-1]] + removals[1:-1][::4]
    for kill_at in [*unfinished, *moving]:
        restore()
        assert run_killed(overwrite, area, kill_at, tmp_path / "writes.json") == -signal.SIGKILL
        if kill_at in unfinished:
            code, err = call(capsys, overwrite)
            assert code == 0, err
        else:
            assert run_folder.check_output(overwrite_args(out, data, tiny_model_dir)) == staging
        assert sorted(os.listdir(area)) == ["run"], kill_at  # no staging folder, no old run aside
        manifest = run_folder.read_manifest(out)
        assert manifest["finished"] and manifest["replaces"] is None
        assert sorted(manifest["files"]) == sorted(os.listdir(out)), kill_at
        assert (out / "model.safetensors").read_bytes() == new_model, kill_at
