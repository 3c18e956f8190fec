"""./run.sh --help (or -h) prints what run.sh does and train.py's flags, and runs nothing: no set-up, no demo."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env


def checkout(folder: Path, with_venv: bool) -> Path:
    """run.sh in a folder of its own, where every step it could run leaves a mark: scripts/setup.sh (the first thing
    a real run does) writes setup-ran; .venv/bin/python (when there) records its arguments and runs this Python on
    the real train.py, so --help shows the real flags."""
    folder.mkdir()
    shutil.copy(REPO / "run.sh", folder / "run.sh")
    (folder / "train.py").symlink_to(REPO / "train.py")
    (folder / "scripts").mkdir()
    (folder / "scripts" / "setup.sh").write_text('touch setup-ran\n')
    if with_venv:
        python = folder / ".venv" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(f'#!/bin/sh\necho "$@" >> python-ran\nPYTHONPATH={REPO} exec {sys.executable} "$@"\n')
        python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_header_and_train_flags_and_runs_nothing(tmp_path, flag):
    folder = checkout(tmp_path / "repo", with_venv=True)
    result = subprocess.run(["bash", "run.sh", "--max-steps", "5", flag], cwd=folder, capture_output=True, text=True,
                            timeout=120, env=child_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The main job: set up .venv (first run only), encode a few sentences")
    assert "Arguments are passed to train.py" in result.stdout and "set -euo" not in result.stdout
    assert "usage: train.py" in result.stdout and "--max-steps" in result.stdout and "--loss" in result.stdout
    assert not (folder / "setup-ran").exists()  # nothing installed
    assert (folder / "python-ran").read_text() == "train.py --help\n"  # and no demo, no eval, no training
    assert not (folder / "runs").exists()


def test_help_before_set_up_installs_nothing_and_says_how_to_see_train_flags(tmp_path):
    folder = checkout(tmp_path / "repo", with_venv=False)
    result = subprocess.run(["bash", "run.sh", "--help"], cwd=folder, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The main job:") and "bash scripts/setup.sh" in result.stdout
    assert not (folder / "setup-ran").exists() and not (folder / ".venv").exists()
