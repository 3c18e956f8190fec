"""A training run's folder: what train.py may write, replace and lock, checked before anything is written.

A run writes into a folder of its own, new or empty, and marks it at once with minilm-run.json, the list of the
files the run wrote (completed when it ends, with only what the run itself wrote: a file the user put there
stays unlisted, so it is never removed). Nothing else is ever written there by minilm, and only what such a
list names is ever removed:
- --overwrite replaces a folder only when it is a minilm run (every entry listed in its minilm-run.json). The new
  run trains in a staging folder beside it (.NAME.minilm-new) and takes the old run's place only once it has
  succeeded; then the old run's listed files are removed.
- A folder is locked (flock on minilm.lock) while a run uses it; the kernel drops the lock when the process dies,
  so a killed run leaves no stale lock.
- --out may not be the current folder or one above it, nor a folder that holds the data or the model.
- A finished run is not resumed (its last checkpoint is older than its model): --overwrite starts a new one.
- A new run that fails before its first checkpoint removes what it wrote: a plain re-run can start again.
Problems are RunFolderError: one line naming --out and what is there.
"""

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

MANIFEST = "minilm-run.json"  # marks a folder as a minilm run and lists what the run wrote there
LOCK = "minilm.lock"  # flock'ed while a run uses the folder; the kernel releases it when the process dies


class RunFolderError(ValueError):
    """--out cannot be used as asked; the message names it and what is there."""


def read_manifest(folder: Path):
    """The manifest of a minilm run folder, or None when the folder is not one (or its manifest is unreadable)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return None
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, folder / MANIFEST)


def _listing(names: list) -> str:
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def foreign_entries(folder: Path, manifest) -> list:
    """What is in folder that the run of this manifest did not write."""
    owned = set(manifest["files"]) if manifest else set()
    return sorted(name for name in os.listdir(folder) if name not in owned)


def staging_folder(out: Path) -> Path:
    """Where an --overwrite run trains until it succeeds; then it takes the place of --out."""
    return out.parent / f".{out.name}.minilm-new"


def check_output(args) -> Path:
    """Check --out before anything is created or deleted; -> the folder this run will write into."""
    out = Path(args.out)
    resolved = out.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise RunFolderError(f"--out {args.out}: is the current folder or one above it; a run needs a folder of its "
                         "own, e.g. --out runs/NAME")
    inputs = [("--data", location) for location in args.data or []] + [("--model", args.model)]
    inputs += [("--eval-data", args.eval_data)] if args.eval_data else []
    for flag, location in inputs:
        path = Path(location)
        if path.exists() and (path.resolve() == resolved or resolved in path.resolve().parents):
            raise RunFolderError(f"--out {args.out}: holds {flag} {location}; a run writes into a folder of its own, "
                             "away from its inputs")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {args.out}: is a file, not a folder; give a new or empty folder")
    if args.resume:
        manifest = read_manifest(out)
        if manifest is None:
            raise RunFolderError(f"--out {args.out}: --resume: no minilm run here (no {MANIFEST}); start a run with "
                             "--loss and --data")
        check_unfinished(out, args.out)
        return out
    if out.exists() and os.listdir(out):
        manifest = read_manifest(out)
        if not args.overwrite:
            hint = (f"it holds a minilm run: --resume continues it, --overwrite replaces it" if manifest
                    else "choose a new or empty folder")
            raise RunFolderError(f"--out {args.out}: is not empty ({_listing(sorted(os.listdir(out)))}); {hint}")
        foreign = foreign_entries(out, manifest)
        if manifest is None or foreign:
            raise RunFolderError(f"--out {args.out}: --overwrite replaces only a previous minilm run, and this folder "
                             f"holds {_listing(foreign)}, which no minilm run wrote; nothing was changed")
        with folder_lock(out, args.out):
            pass  # refused here, before anything is written, while another run holds the folder
        staging = staging_folder(out)
        if staging.exists():
            raise RunFolderError(f"--out {args.out}: {staging} exists: an earlier --overwrite run of this folder "
                             f"did not finish; continue it with --out {staging} --resume, or remove it")
        return staging
    ancestor = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {args.out}: cannot write in {ancestor} (read-only or no permission)")
    return out


def check_unfinished(out: Path, shown: str) -> None:
    """--resume continues a stopped run only: a finished run's last checkpoint is older than its saved model, so
    resuming it would train the last steps again and replace the model."""
    if (read_manifest(out) or {}).get("finished"):
        staging = staging_folder(out)
        hint = (f"; the --overwrite run that was to replace it did not finish: --out {staging} --resume continues "
                "that one" if staging.is_dir() else "; --overwrite starts a new run there")
        raise RunFolderError(f"--out {shown}: --resume: this run finished (its model is saved); nothing to "
                             f"resume{hint}")


@contextlib.contextmanager
def folder_lock(folder: Path, shown: str):
    """Hold folder/minilm.lock (flock) for the duration; refuse when another process holds it."""
    handle = open(folder / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(f"--out {shown}: another train.py ({owner}) is using this folder; wait for it to end, "
                         "or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def create_run_folder(folder: Path, replaces) -> None:
    """Make the run folder (new or empty) and mark it as a minilm run before anything else is written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(folder, {"minilm_run": 1, "replaces": str(replaces) if replaces else None,
                                "files": [MANIFEST, LOCK, "log.jsonl", "checkpoints"]})
    except OSError as error:
        raise RunFolderError(f"--out {folder}: cannot create it ({error.strerror})") from None


def remove_failed_run(folder: Path, created: bool) -> None:
    """Undo a new run that failed before its first checkpoint: remove what its manifest lists (never anything
    else), and the folder when the run created it and nothing else is left there."""
    manifest = read_manifest(folder)
    for name in manifest["files"] if manifest else []:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists() or target.is_symlink():
            target.unlink()
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def save_started(folder: Path) -> float:
    """Call right before the final save: -> the time (on the file system's clock) from which what the folder
    holds was written by this run (see finish_run_folder)."""
    marker = folder / f".{MANIFEST}.tmp"
    marker.write_text("")
    started = marker.stat().st_mtime
    marker.unlink()
    return started


def _newest_change(path: Path) -> float:
    """The latest modification time of path and, for a folder, of everything inside it."""
    if path.is_dir() and not path.is_symlink():
        return max([path.lstat().st_mtime] + [child.lstat().st_mtime for child in path.rglob("*")])
    return path.lstat().st_mtime


def finish_run_folder(folder: Path, since: float) -> Path:
    """List in the manifest what the run wrote: its own files, and what was written in the folder from `since`
    (save_started's time, right before the final save) on. A file the user put in the folder earlier, during
    the run or between a stop and --resume, stays unlisted, so no later --overwrite removes it. An --overwrite
    run then takes the place of the old run, whose listed files (and only those) are removed. -> the final
    folder."""
    manifest = read_manifest(folder)
    manifest["files"] = sorted(name for name in os.listdir(folder)
                               if name != f".{MANIFEST}.tmp" and (name in manifest["files"]
                                                                  or _newest_change(folder / name) >= since))
    manifest["finished"] = True
    replaces = manifest.pop("replaces", None)
    if not replaces:
        write_manifest(folder, manifest)
        return folder
    old = Path(replaces)
    old_manifest = read_manifest(old) if old.is_dir() else None
    if old.exists() and (old_manifest is None or foreign_entries(old, old_manifest)):
        raise RunFolderError(f"--out {old}: changed during the run and now holds files no minilm run wrote; the new run "
                         f"stays in {folder}")
    write_manifest(folder, {**manifest, "replaces": None})
    if old.exists():
        with folder_lock(old, str(old)):
            aside = old.parent / f".{old.name}.minilm-old"
            os.replace(old, aside)
        os.replace(folder, old)
        for name in old_manifest["files"]:
            target = aside / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        with contextlib.suppress(OSError):
            aside.rmdir()
    else:
        os.replace(folder, old)
    return old
