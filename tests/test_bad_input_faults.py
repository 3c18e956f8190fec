"""Faults and files from elsewhere: a crafted checkpoint runs nothing, a damaged newest checkpoint falls back to
the previous one, a run folder's manifest crafted or damaged in each field is refused (its names never reach
outside the folder), a full disk and a read-only folder end in one line, eval.py's bad input, the model card's
escaping, and the command line itself (no hang, one line)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_script
import train
from conftest import REPO, child_env
from minilm import run_folder
from minilm.checkpoint import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = "sentence1\tsentence2\tscore\n" + "".join(f"first {i}\tsecond {i}\t0.{i % 10}\n" for i in range(24))


def call(capsys, main, argv) -> tuple:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, prog, fragments):
    assert code == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])


@pytest.fixture
def run_with_checkpoints(capsys, tiny_model_dir, tmp_path):
    """A 6-step run with checkpoints at steps 2 and 4, killed before it finished (as a SIGKILL after step 5 would
    leave it; tests/test_train.py kills real processes): what --resume continues."""
    data = tmp_path / "pairs.tsv"
    data.write_text(PAIRS)
    out = tmp_path / "run"
    code, _, err = call(capsys, train.main, ["--no-progress", "--model", tiny_model_dir, "--loss", "cosine",
                                             "--data", data, "--batch-size", 4, "--max-steps", 6, "--save-steps", 2,
                                             "--log-steps", 2, "--out", out])
    assert code == 0, err
    running = [run_folder.MANIFEST, run_folder.LOCK, "log.jsonl", "checkpoints"]  # what a run lists until it ends
    for name in set(run_folder.read_manifest(out)["files"]) - set(running):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # the model was never saved
    run_folder.write_manifest(out, {"minilm_run": 1, "replaces": None, "files": running})
    return out


class Planted:
    """Unpickling this object opens (creates) a file: what a crafted checkpoint would do with any command."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("which", ["only", "newest"])
def test_a_crafted_checkpoint_runs_nothing(capsys, run_with_checkpoints, tmp_path, which):
    out = run_with_checkpoints
    marker = tmp_path / "pwned"
    newest = out / "checkpoints" / "step-0000004"
    if which == "only":
        torch.save({"args": Planted(str(marker))}, newest / CHECKPOINT)
        (out / "checkpoints" / "step-0000002" / CHECKPOINT).unlink()
        code, _, err = call(capsys, train.main, ["--no-progress", "--out", out, "--resume", "--max-steps", 8])
        assert_one_line_error(code, err, "train.py", [str(newest / CHECKPOINT), "no usable checkpoint",
                                                      "not a checkpoint train.py wrote"])
    else:
        torch.save({"args": Planted(str(marker))}, newest / CHECKPOINT)
        code, stdout, err = call(capsys, train.main, ["--no-progress", "--out", out, "--resume", "--max-steps", 8])
        assert code == 0, err
        assert f"resuming from {out / 'checkpoints' / 'step-0000002'} instead" in err
        assert "resuming from" in stdout and "Traceback" not in err
    assert not marker.exists(), "loading the checkpoint ran code"


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_a_crafted_model_pickle_runs_nothing(tiny_model_dir, tmp_path, weights):
    """Models load from safetensors and JSON only: a model folder whose weights are a pickle (PyTorch's
    pytorch_model.bin, or such a pickle saved under the safetensors name) is refused in one line naming the file,
    and nothing in it runs."""
    import minilm

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"embeddings.word_embeddings.weight": Planted(str(marker))}, folder / weights)
    with pytest.raises(minilm.InputError) as error:
        minilm.load(folder, device="cpu")
    message = str(error.value)
    assert "\n" not in message and str(folder) in message, message
    assert not marker.exists(), "loading the model ran code"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(capsys, run_with_checkpoints):
    out = run_with_checkpoints
    state = out / "checkpoints" / "step-0000004" / CHECKPOINT
    state.write_bytes(state.read_bytes()[:1000])  # cut short, as by a crash of the disk rather than the process
    code, stdout, err = call(capsys, train.main, ["--no-progress", "--out", out, "--resume", "--max-steps", 8])
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1 and str(state) in err and "step-0000002 instead" in err
    assert f"resuming from {out / 'checkpoints' / 'step-0000002'} at step 2" in stdout
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # each step once: the log was cut back to the checkpoint


# --- a run folder's manifest is input ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 1-step run: copied by each test that crafts its manifest."""
    folder = tmp_path_factory.mktemp("finished")
    (folder / "pairs.tsv").write_text(PAIRS)
    code = train.main(["--no-progress", "--model", str(tiny_model_dir), "--loss", "cosine", "--data",
                       str(folder / "pairs.tsv"), "--batch-size", "4", "--max-steps", "1", "--out",
                       str(folder / "run")])
    assert code == 0
    return folder / "run"


def snapshot(*folders) -> dict:
    return {path: (path.readlink() if path.is_symlink() else path.read_bytes() if path.is_file() else None)
            for folder in folders for path in [folder, *folder.rglob("*")]}


MANIFEST_CASES = [  # (name, change to a finished run's manifest (victim: a folder outside it), message fragments)
    ("absolute-name", lambda m, victim: m["files"].append(str(victim)), ["files[", "victim",
                                                                        "not a plain name in the folder"]),
    ("dot-dot-name", lambda m, victim: m["files"].append(f"../{victim.name}"), ["../victim", "not a plain name"]),
    ("nested-name", lambda m, victim: m["files"].append(f"sub/../../{victim.name}"), ["sub/../../victim"]),
    ("parent-name", lambda m, victim: m["files"].append(".."), ["files[", '".."', "not a plain name"]),
    ("empty-name", lambda m, victim: m["files"].append(""), ["files[", '""', "not a plain name"]),
    ("number-name", lambda m, victim: m["files"].append(7), ["files[", "is 7", "not a plain name"]),
    ("files-not-a-list", lambda m, victim: m.update(files=str(victim)), ["'files'", "a list of file names"]),
    ("files-missing", lambda m, victim: m.pop("files"), ["'files' is null", "a list of file names"]),
    ("replaces-elsewhere", lambda m, victim: m.update(replaces=str(victim)), ["'replaces'", "staging folder"]),
    ("replaces-a-number", lambda m, victim: m.update(replaces=3), ["'replaces' is 3"]),
    ("finished-a-word", lambda m, victim: m.update(finished="yes"), ["'finished' is \"yes\"", "true or false"]),
    ("saving-a-list", lambda m, victim: m.update(saving=[]), ["'saving' is []"]),
    ("saving-outside", lambda m, victim: m.update(saving={"before": ["/"]}), ["saving.before[0]", "not a plain"]),
    ("not-a-run", lambda m, victim: m.update(minilm_run=2), ["not a minilm run's manifest", "minilm_run"]),
    ("a-list", lambda m, victim: m.clear() or m.update(x=[str(victim)]), ["not a minilm run's manifest"]),
]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[case[0] for case in MANIFEST_CASES])
def test_a_crafted_run_manifest_is_refused_and_touches_nothing(case, capsys, finished_run, tiny_model_dir, tmp_path):
    """--overwrite, --resume and a plain run on the folder: one line naming the manifest and its field; nothing
    inside or outside the folder changes (today a "files" entry naming another folder is deleted with the run)."""
    _, change, fragments = case
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("keep")
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    manifest = json.loads((out / run_folder.MANIFEST).read_text())
    change(manifest, victim)
    (out / run_folder.MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "pairs.tsv").write_text(PAIRS)
    before = snapshot(tmp_path)
    new_run = ["--no-progress", "--model", tiny_model_dir, "--loss", "cosine", "--data", tmp_path / "pairs.tsv",
               "--max-steps", 1, "--out", out]
    for argv in (new_run + ["--overwrite"], ["--no-progress", "--out", out, "--resume"]):
        code, _, err = call(capsys, train.main, argv)
        assert_one_line_error(code, err, "train.py", [out / run_folder.MANIFEST, *fragments])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["not-json", "a-folder", "a-link"])
def test_a_damaged_run_manifest_is_one_line(damage, capsys, finished_run, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    manifest = out / run_folder.MANIFEST
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(manifest.read_text())
    manifest.unlink()
    if damage == "not-json":
        manifest.write_text('{"minilm_run": 1, "files": [')
    elif damage == "a-folder":
        manifest.mkdir()
    else:
        manifest.symlink_to(elsewhere)  # a manifest from elsewhere would name files there
    before = snapshot(tmp_path)
    code, _, err = call(capsys, train.main, ["--no-progress", "--out", out, "--resume"])
    fragment = "unreadable" if damage == "not-json" else "is not a file"
    assert_one_line_error(code, err, "train.py", [manifest, fragment])
    assert snapshot(tmp_path) == before


def test_a_listed_symlink_is_removed_as_a_link_and_a_symlinked_lock_is_refused(capsys, finished_run, tiny_model_dir,
                                                                               tmp_path):
    """A run's listed name that is a symbolic link to a folder elsewhere: --overwrite removes the link, never what
    it points to. A minilm.lock that is a link: refused in one line (the pid is never written through it)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("keep")
    (tmp_path / "pairs.tsv").write_text(PAIRS)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    shutil.rmtree(out / "1_Pooling")
    (out / "1_Pooling").symlink_to(victim)  # listed by the run, now a link out of the folder
    (out / run_folder.LOCK).unlink()
    (out / run_folder.LOCK).symlink_to(victim / "thesis.txt")
    argv = ["--no-progress", "--model", tiny_model_dir, "--loss", "cosine", "--data", tmp_path / "pairs.tsv",
            "--batch-size", 4, "--max-steps", 1, "--out", out, "--overwrite"]
    before = snapshot(tmp_path)
    code, _, err = call(capsys, train.main, argv)
    assert_one_line_error(code, err, "train.py", [out, "minilm.lock is a symbolic link"])
    assert snapshot(tmp_path) == before
    (out / run_folder.LOCK).unlink()
    code, _, err = call(capsys, train.main, argv)
    assert code == 0, err
    assert (victim / "thesis.txt").read_text() == "keep" and (out / "1_Pooling").is_dir()
    assert not (out / "1_Pooling").is_symlink()


def mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not permitted'}): the test needs a "
                    "small filesystem of its own")


def test_disk_full_removes_the_partial_checkpoint_and_keeps_the_previous(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text(PAIRS)
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=36m")  # one checkpoint of the tiny model (~24 MB) fits, not two
    try:
        out = disk / "run"
        code, _, err = call(capsys, train.main, ["--no-progress", "--model", tiny_model_dir, "--loss", "cosine",
                                                 "--data", data, "--batch-size", 4, "--max-steps", 6,
                                                 "--save-steps", 2, "--save-total-limit", 2, "--out", out])
        assert_one_line_error(code, err, "train.py", ["writing checkpoint", "step-0000004", "removed the partial",
                                                      "step-0000002 is intact", "--resume"])
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
        checkpoint = torch.load(out / "checkpoints" / "step-0000002" / CHECKPOINT, weights_only=True)
        assert checkpoint["state"]["step"] == 2
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_read_only_out_is_one_line(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text(PAIRS)
    locked = tmp_path / "locked"
    if os.geteuid() == 0:
        mount_tmpfs(locked, "ro,size=1m")  # root ignores permissions, not a read-only filesystem
    else:
        locked.mkdir()
        locked.chmod(0o555)
    try:
        code, _, err = call(capsys, train.main, ["--model", tiny_model_dir, "--loss", "cosine", "--data", data,
                                                 "--out", locked / "run"])
        assert_one_line_error(code, err, "train.py", ["--out", str(locked), "cannot write"])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(locked)], capture_output=True)
        else:
            locked.chmod(0o755)


def test_the_command_line_refuses_instead_of_hanging(tmp_path):
    """The reported hang (every pair filtered out by --min-score) through the real command line: one line,
    exit 2, within the timeout."""
    data = tmp_path / "pairs.tsv"
    data.write_text(PAIRS)
    result = subprocess.run([sys.executable, "train.py", "--loss", "mnrl", "--min-score", "2", "--data", str(data),
                             "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=child_env())
    assert_one_line_error(result.returncode, result.stderr, "train.py", [str(data), "--min-score 2"])
    assert not (tmp_path / "run").exists()


# --- eval.py ---------------------------------------------------------------------------------------------------

def stsb_like(folder: Path, line: str) -> Path:
    folder.mkdir()
    (folder / "test.tsv").write_text(line + "\n")
    return folder


EVAL_CASES = [
    ("stsb-on-sick-file", lambda t, m: ["--model", m, "--task", "stsb", "--data", t / "SICK.tsv"],
     ["--task stsb", "SICK.tsv", "STS-B folder"]),
    ("stsb-wrong-columns", lambda t, m: ["--model", m, "--task", "stsb", "--data", stsb_like(t / "s", "a\tb\t0.5")],
     ["test.tsv:1", "3 fields", "at least 7"]),
    ("stsb-score-text", lambda t, m: ["--model", m, "--task", "stsb", "--data",
                                      stsb_like(t / "s", "g\tf\ty\t1\thigh\ta\tb")], ["test.tsv:1", "'high'"]),
    ("sick-wrong-columns", lambda t, m: ["--model", m, "--task", "sick", "--data", t / "pairs.tsv"],
     ["pairs.tsv:1", "missing column(s)", "sentence_A"]),
    ("pairs-bad-row", lambda t, m: ["--model", m, "--task", "pairs", "--data", t / "bad.tsv"], ["bad.tsv:3", "'x'"]),
    ("pairs-wrong-columns", lambda t, m: ["--model", m, "--task", "pairs", "--data", t / "anchors.tsv"],
     ["--task pairs", "anchors.tsv: columns ['anchor', 'positive']", "the pairs task reads sentence1, sentence2, score"]),
    ("binary-wrong-columns", lambda t, m: ["--model", m, "--task", "binary", "--data", t / "pairs.tsv"],
     ["pairs.tsv: columns ['score', 'sentence1', 'sentence2']", "the binary task reads sentence1, sentence2, label"]),
    ("json-into-missing-folder", lambda t, m: ["--model", t / "no-model", "--task", "stsb", "--data", t,
                                               "--json", t / "missing" / "m.json"], ["--json", "missing", "not exist"]),
    ("json-is-a-folder", lambda t, m: ["--model", m, "--task", "stsb", "--data", t, "--json", t],
     ["--json", "is a folder"]),
    ("batch-size-0", lambda t, m: ["--model", m, "--task", "stsb", "--data", t, "--batch-size", 0],
     ["--batch-size", ">= 1"]),
    ("device-cuda", lambda t, m: ["--model", m, "--task", "stsb", "--data", t, "--device", "cuda"],
     ["--device cuda", "no CUDA"]),
    ("model-missing", lambda t, m: ["--model", t / "no-model", "--task", "pairs", "--data", t / "pairs.tsv"],
     ["--model", "cannot find model", "no folder", "no-model"]),  # the whole message: one line
    ("model-is-a-file", lambda t, m: ["--model", t / "pairs.tsv", "--task", "pairs", "--data", t / "pairs.tsv"],
     ["cannot find model", "pairs.tsv is a file, not a model folder"]),
    ("nli-without-classifier", lambda t, m: ["--model", m, "--task", "nli", "--data", t / "SICK.tsv"],
     ["--task nli", "softmax_classifier"]),
    ("bad-split", lambda t, m: ["--model", m, "--task", "stsb", "--data", t, "--split", "validation"],
     ["--split", "'validation'"]),
    ("data-missing", lambda t, m: ["--model", m, "--task", "pairs", "--data", t / "nope.tsv"],
     ["--data", "nope.tsv", "no such file"]),
    ("unknown-task", lambda t, m: ["--model", m, "--task", "glue", "--data", t], ["--task", "'glue'"]),
    ("split-of-a-single-file", lambda t, m: ["--model", m, "--task", "pairs", "--data", t / "pairs.tsv", "--split",
                                             "dev"], ["--split dev", "pairs.tsv", "single file"]),
    ("json-over-the-data", lambda t, m: ["--model", m, "--task", "pairs", "--data", t / "pairs.tsv", "--json",
                                         t / "pairs.tsv"], ["--json", "pairs.tsv", "--data", "not over them"]),
    ("json-into-the-model", lambda t, m: ["--model", m, "--task", "pairs", "--data", t / "pairs.tsv", "--json",
                                          Path(m) / "config.json"], ["--json", "a file of --model", "not over them"]),
    ("json-over-a-users-file", lambda t, m: ["--model", m, "--task", "pairs", "--data", t / "pairs.tsv", "--json",
                                             t / "notes.json"], ["--json", "notes.json", "not an earlier eval.py"]),
    ("binary-label-word", lambda t, m: ["--model", m, "--task", "binary", "--data", t / "bin.tsv"],
     ["bin.tsv:3", "label 'true'", "0..1"]),
    ("unknown-precision", lambda t, m: ["--model", m, "--task", "pairs", "--data", t / "pairs.tsv", "--precision",
                                        "int4"], ["--precision", "'int4'", "bf16"]),
]


@pytest.mark.parametrize("case", EVAL_CASES, ids=[case[0] for case in EVAL_CASES])
def test_eval_bad_input_is_one_line(case, capsys, tiny_model_dir, tmp_path):
    _, make_argv, fragments = case
    (tmp_path / "pairs.tsv").write_text(PAIRS)
    (tmp_path / "bad.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t0.5\nc\td\tx\n")
    (tmp_path / "notes.json").write_text('{"mine": true}')
    (tmp_path / "bin.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\t1.0\nc\td\ttrue\n")
    (tmp_path / "anchors.tsv").write_text("anchor\tpositive\nA man eats food.\tSomeone is eating.\n")
    (tmp_path / "SICK.tsv").write_text("pair_ID\tsentence_A\tsentence_B\tentailment_label\trelatedness_score\t"
                                       "SemEval_set\n1\ta\tb\tNEUTRAL\t3.0\tTEST\n")
    argv = make_argv(tmp_path, tiny_model_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    contents = {path: path.read_bytes() for path in [*tmp_path.iterdir(), *Path(tiny_model_dir).iterdir()]
                if path.is_file()}
    code, _, err = call(capsys, eval_script.main, argv)
    assert_one_line_error(code, err, "eval.py", fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert all(path.read_bytes() == content for path, content in contents.items())


def test_eval_json_replaces_only_its_own_earlier_result(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "pairs.tsv").write_text(PAIRS)
    argv = ["--model", str(tiny_model_dir), "--task", "pairs", "--data", str(tmp_path / "pairs.tsv"), "--json",
            str(tmp_path / "m.json")]
    for _ in range(2):  # the second run replaces the first run's result
        code, _, err = call(capsys, eval_script.main, argv)
        assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["task"] == "pairs"


# --- the model card --------------------------------------------------------------------------------------------

def test_the_model_card_escapes_training_text(capsys, tiny_model_dir, tmp_path):
    hostile = ['<script>alert(1)</script>', 'a | b ``` c', '[click](javascript:alert(1)) <img src=x onerror=y>']
    data = tmp_path / "hostile.jsonl"
    data.write_text("".join(json.dumps({"sentence1": hostile[i % 3], "sentence2": hostile[(i + 1) % 3],
                                        "score": 0.5}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    code, _, err = call(capsys, train.main, ["--no-progress", "--model", tiny_model_dir, "--loss", "cosine",
                                             "--data", data, "--batch-size", 4, "--max-steps", 1, "--out", out])
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "<script" not in card and "<img" not in card  # nowhere: front matter, code or text
    # Markdown outside code fences: no link can form either. Fences: each closes with the fence that opened it.
    outside, fence = [], None
    front_matter_end = card.index("\n---\n", 4)  # the YAML block at the top holds data, not Markdown
    assert "javascript" not in card[front_matter_end:].replace("&#91;click&#93;&#40;javascript", "")
    for line in card[front_matter_end:].splitlines():
        if fence is None and line.startswith("```"):
            fence = line[:len(line) - len(line.lstrip("`"))]
        elif fence is not None and line == fence:
            fence = None
        elif fence is None:
            outside.append(line)
    assert fence is None
    assert "](javascript:" not in "\n".join(outside)
    assert "&lt;script&gt;alert&#40;1&#41;&lt;/script&gt;" in card  # the text is kept, inert
