"""A training run's folder: what train.py may write, replace and lock, checked before anything is written.

A run writes into a folder of its own, new or empty, and marks it at once with minilm-run.json, the list of the
files the run wrote (completed when it ends, with only what the run itself wrote: a file the user put there
stays unlisted, so it is never removed). Nothing else is ever written there by minilm, and only what such a
list names is ever removed:
- The manifest is read as untrusted input: its names must be plain names inside the folder (no '/', not '..'),
  its fields what a run writes; anything else is refused in one line naming the field, before anything is done.
  A name that is a symbolic link is removed as a link, never followed.
- --overwrite replaces a folder only when it is a minilm run (every entry its own). The new run trains in a
  staging folder beside it (.NAME.minilm-new) and takes the old run's place only once it has succeeded; then
  the old run's own files are removed. Each step of that move leaves a state the next train.py on that --out
  recognizes and completes, so a kill during it loses nothing; an attempt stopped in the staging folder is
  continued there by --resume, or replaced by the next --overwrite.
- A folder is locked (flock on minilm.lock, see minilm/files.py) while a run uses it, from before the run writes
  its first file there; a run that is refused the lock writes and removes nothing.
- The final save is recorded before it starts (the folder's entries at that moment): a run killed anywhere in
  its save owns what appeared since, so --resume finishes it and --overwrite replaces it.
- --out may not be the current folder or one above it, nor a folder that holds the data or the model.
- A finished run is not resumed (its last checkpoint is older than its model): --overwrite starts a new one.
- A new run that fails before its first checkpoint removes what it wrote: a plain re-run can start again.
Problems are RunFolderError: one line naming --out and what is there.
"""

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from minilm import files
from minilm.files import LOCK

MANIFEST = "minilm-run.json"  # marks a folder as a minilm run and lists what the run wrote there


class RunFolderError(ValueError):
    """--out cannot be used as asked; the message names it and what is there."""


# --- the manifest: input like any other file ------------------------------------------------------------------
def _is_plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _check_names(path: Path, field: str, names) -> None:
    if not isinstance(names, list):
        raise RunFolderError(f"{path}: {field!r} is {_shown(names)}; a run's manifest holds a list of file names")
    for index, name in enumerate(names):
        if not _is_plain_name(name):
            raise RunFolderError(f"{path}: {field}[{index}] is {_shown(name)}, not a plain name in the folder (no "
                                 "'/', not '.' or '..'): a run lists only the files it wrote there; nothing was "
                                 "changed")


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 200 else text[:197] + "..."


def read_manifest(folder: Path):
    """The manifest of a minilm run folder, None when the folder has none; RunFolderError (one line, naming the
    field) when it is not a file, not JSON, or holds a field no run writes."""
    path = folder / MANIFEST
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_file():
        raise RunFolderError(f"{path}: is not a file (a symbolic link or a folder); a run's manifest is a file it "
                             "wrote there")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunFolderError(f"{path}: unreadable ({str(error)[:100]}); a run's manifest is the JSON it wrote "
                             "there") from None
    if not isinstance(manifest, dict) or manifest.get("minilm_run") != 1:
        raise RunFolderError(f"{path}: not a minilm run's manifest (it has no \"minilm_run\": 1)")
    _check_names(path, "files", manifest.get("files"))
    replaces = manifest.get("replaces")
    if not (replaces is None or isinstance(replaces, str) and (_replaced_by(folder) or
                                                              replaces == str(folder.absolute()))):
        raise RunFolderError(f"{path}: 'replaces' is {_shown(replaces)}; null, or a path where the folder is the "
                             "staging folder of an --overwrite run (.NAME.minilm-new)")
    if not isinstance(manifest.get("finished", False), bool):
        raise RunFolderError(f"{path}: 'finished' is {_shown(manifest['finished'])}; true or false")
    saving = manifest.get("saving")
    if saving is not None:
        if not isinstance(saving, dict):
            raise RunFolderError(f"{path}: 'saving' is {_shown(saving)}; an object with the list 'before'")
        _check_names(path, "saving.before", saving.get("before"))
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest atomically; call it holding the folder's lock (then no other process is writing it, and
    a temporary file of an earlier write is one that a kill left behind: removed)."""
    files.write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _remove_entries(folder, [name for name in os.listdir(folder) if files.temporary_of(name) == MANIFEST])


def owned_entries(folder: Path, manifest) -> set:
    """The entries of folder that the run of this manifest wrote: those it lists, what its final save added when
    the run was killed during that save (the save recorded the entries it found), and the temporary files of an
    atomic write of either that a kill left behind."""
    if manifest is None:
        return set()
    listed = set(manifest["files"])
    before = set(manifest["saving"]["before"]) if manifest.get("saving") else None
    return {name for name in os.listdir(folder)
            if name in listed or (before is not None and name not in before) or files.temporary_of(name) in listed}


def foreign_entries(folder: Path, manifest) -> list:
    """What is in folder that the run of this manifest did not write."""
    return sorted(set(os.listdir(folder)) - owned_entries(folder, manifest))


def _remove_entries(folder: Path, names) -> None:
    """Remove these entries of folder (plain names; a symbolic link as a link); the manifest last, so that a
    kill meanwhile leaves a folder whose remaining files are still listed."""
    for name in sorted(names, key=lambda name: name == MANIFEST):
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def _listing(names: list) -> str:
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _left_by_a_start(name: str) -> bool:
    """What a run killed while it marked its folder leaves: the lock, and the manifest's temporary file."""
    return name == LOCK or files.temporary_of(name) == MANIFEST


# --- before the run: --out ------------------------------------------------------------------------------------
def staging_folder(out: Path) -> Path:
    """Where an --overwrite run trains until it succeeds; then it takes the place of --out."""
    return out.parent / f".{out.name}.minilm-new"


def _replaced_by(folder: Path):
    """The --out whose staging folder this is, else None."""
    name = folder.name
    if not (name.startswith(".") and name.endswith(".minilm-new")):
        return None
    out = name[1:-len(".minilm-new")]
    return folder.parent / out if _is_plain_name(out) else None


def _aside_folder(out: Path) -> Path:
    """Where the old run waits while an --overwrite run takes its place, until its files are removed."""
    return out.parent / f".{out.name}.minilm-old"


def check_output(args) -> Path:
    """Check --out before anything is created or deleted; -> the folder this run will write into."""
    out = Path(args.out)
    resolved = out.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise RunFolderError(f"--out {args.out}: is the current folder or one above it; a run needs a folder of its "
                             "own, e.g. --out runs/NAME")
    inputs = [("--data", location) for location in args.data or []] + [("--model", args.model)]
    inputs += [(flag, location) for flag, location in (("--eval-data", args.eval_data), ("--teacher", args.teacher))
               if location]
    for flag, location in inputs:
        path = Path(location)
        if path.exists() and (path.resolve() == resolved or resolved in path.resolve().parents):
            raise RunFolderError(f"--out {args.out}: holds {flag} {location}; a run writes into a folder of its own, "
                                 "away from its inputs")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {args.out}: is a file, not a folder; give a new or empty folder")
    complete_replacement(out)
    if args.resume:
        if read_manifest(out) is None:
            raise RunFolderError(f"--out {args.out}: --resume: no minilm run here (no {MANIFEST}); start a run with "
                                 "--loss and --data")
        check_unfinished(out, args.out)
        return out
    entries = sorted(name for name in os.listdir(out) if not _left_by_a_start(name)) if out.exists() else []
    if entries:
        manifest = read_manifest(out)
        if not args.overwrite:
            hint = (f"it holds a minilm run: --resume continues it, --overwrite replaces it" if manifest
                    else "choose a new or empty folder")
            raise RunFolderError(f"--out {args.out}: is not empty ({_listing(entries)}); {hint}")
        foreign = foreign_entries(out, manifest) if manifest else entries
        if foreign:
            raise RunFolderError(f"--out {args.out}: --overwrite replaces only a previous minilm run, and this folder "
                                 f"holds {_listing(foreign)}, which no minilm run wrote; nothing was changed")
        with folder_lock(out, args.out):
            pass  # refused here, before anything is written, while another run holds the folder
        return _check_staging(out, args.out)
    ancestor = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {args.out}: cannot write in {ancestor} (read-only or no permission)")
    return out


def _check_staging(out: Path, shown: str) -> Path:
    """-> the staging folder of an --overwrite run of `out`; one that an earlier --overwrite run left (killed, or
    stopped) is replaced like any other run of its own (create_run_folder clears it), unless a run still uses it."""
    staging = staging_folder(out)
    if os.path.lexists(staging):
        manifest = read_manifest(staging) if staging.is_dir() and not staging.is_symlink() else None
        if manifest is None or foreign_entries(staging, manifest):
            raise RunFolderError(f"--out {shown}: {staging} exists and holds files no minilm run wrote; remove it")
        with folder_lock(staging, str(staging)):
            pass  # refused while the earlier --overwrite run still trains there
    return staging


def check_unfinished(out: Path, shown: str) -> None:
    """--resume continues a stopped run only: a finished run's last checkpoint is older than its saved model, so
    resuming it would train the last steps again and replace the model."""
    manifest = read_manifest(out) or {}
    if manifest.get("finished"):
        staging = staging_folder(out)
        hint = (f"; the --overwrite run that was to replace it did not finish: --out {staging} --resume continues "
                "that one" if staging.is_dir() else "; --overwrite starts a new run there")
        if manifest.get("replaces"):
            hint = (f"; it was stopped while it took the place of {manifest['replaces']}: any train.py with that "
                    "--out completes the move")
        raise RunFolderError(f"--out {shown}: --resume: this run finished (its model is saved); nothing to "
                             f"resume{hint}")


@contextlib.contextmanager
def folder_lock(folder: Path, shown: str):
    """Hold folder/minilm.lock for the duration; refuse (RunFolderError) when another process holds it."""
    try:
        with files.folder_lock(folder):
            yield
    except files.FolderInUse as owner:
        raise RunFolderError(f"--out {shown}: another train.py ({owner}) is using this folder; wait for it to end, "
                             "or choose another --out") from None
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise RunFolderError(f"--out {shown}: {LOCK} is a symbolic link; the lock is a file minilm makes in the "
                             "folder itself: remove the link") from None


# --- the run: create, fail, save, finish ----------------------------------------------------------------------
def create_run_folder(folder: Path, replaces) -> None:
    """Make the run folder (new or empty) and mark it as a minilm run before anything else is written there:
    under its lock, so that of two runs started on one folder the second is refused, having changed nothing."""
    try:
        folder.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as error:
        raise RunFolderError(f"--out {folder}: cannot create it ({error.strerror})") from None
    had_lock = os.path.lexists(folder / LOCK)
    with folder_lock(folder, str(folder)):
        # The staging folder of an --overwrite run may hold an earlier, stopped attempt: replaced, if all its own.
        earlier = read_manifest(folder) if replaces else None
        stale = owned_entries(folder, earlier) if earlier and not foreign_entries(folder, earlier) else set()
        taken = sorted(name for name in os.listdir(folder) if not (_left_by_a_start(name) or name in stale))
        if taken:  # another run marked it between the check of --out and now
            if not had_lock:
                (folder / LOCK).unlink()
            raise RunFolderError(f"--out {folder}: another run started in this folder meanwhile (it holds "
                                 f"{_listing(taken)}); nothing was changed")
        _remove_entries(folder, [name for name in os.listdir(folder) if name != LOCK])  # as listed above
        try:
            write_manifest(folder, {"minilm_run": 1, "replaces": str(replaces.absolute()) if replaces else None,
                                    "files": [MANIFEST, LOCK, "log.jsonl", "checkpoints"]})
        except OSError as error:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise RunFolderError(f"--out {folder}: cannot write in it ({error.strerror})") from None


def remove_failed_run(folder: Path, created: bool) -> None:
    """Undo a new run that failed before its first checkpoint: remove what its manifest lists (never anything
    else), and the folder when the run created it and nothing else is left there. Only under the folder's lock:
    while another process holds it, nothing is removed."""
    if not (folder / LOCK).is_file():
        return  # the run never marked the folder: nothing here is its own
    try:
        with folder_lock(folder, str(folder)):
            manifest = read_manifest(folder)
            if manifest is None or manifest.get("finished"):
                return
            _remove_entries(folder, owned_entries(folder, manifest))
    except RunFolderError:
        return  # another process holds the folder, or the manifest is no longer this run's
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def save_started(folder: Path) -> float:
    """Call right before the final save: records in the manifest the entries the folder holds now, so that
    what the save adds is the run's even if it is killed halfway (--resume then keeps the first record: what
    the killed save wrote stays the run's). -> the time (on the file system's clock) from which what the folder
    holds was written by this run (see finish_run_folder)."""
    manifest = read_manifest(folder)
    manifest.setdefault("saving", {"before": sorted(os.listdir(folder))})
    write_manifest(folder, manifest)
    return (folder / MANIFEST).stat().st_mtime


def _newest_change(path: Path) -> float:
    """The latest modification time of path and, for a folder, of everything inside it."""
    if path.is_dir() and not path.is_symlink():
        return max([path.lstat().st_mtime] + [child.lstat().st_mtime for child in path.rglob("*")])
    return path.lstat().st_mtime


def finish_run_folder(folder: Path, since: float) -> Path:
    """List in the manifest what the run wrote: its own files, what its final save added (see save_started), and
    what it rewrote from `since` (save_started's time) on. A file the user put in the folder before the save,
    during the run or between a stop and --resume, stays unlisted, so no later --overwrite removes it. An
    --overwrite run then takes the place of the old run, whose own files (and only those) are removed.
    Call it holding the folder's lock. -> the final folder."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise RunFolderError(f"--out {folder}: its {MANIFEST} is gone; the model is saved there, unlisted")
    out = _replaced_by(folder) if manifest.get("replaces") else None
    if out is not None:
        manifest["replaces"] = str(out.absolute())  # where the staging folder is now
    owned = owned_entries(folder, manifest)
    _remove_entries(folder, [name for name in owned if files.temporary_of(name)])  # left by a killed save
    manifest.pop("saving", None)
    manifest["files"] = sorted(name for name in os.listdir(folder)
                               if name in owned or _newest_change(folder / name) >= since)
    manifest["finished"] = True
    write_manifest(folder, manifest)  # a finished run; with "replaces", one still to take its old run's place
    if out is None:
        return folder
    complete_replacement(out, held=True)
    return out


def _replacement_pending(folder: Path, out: Path) -> bool:
    """Whether folder holds a finished --overwrite run still to take the place of `out` (in the staging folder, or
    moved there already with the old run's files not yet removed)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    manifest = read_manifest(folder)
    if not (manifest and manifest.get("finished") and manifest.get("replaces")):
        return False
    return folder == staging_folder(out) or Path(manifest["replaces"]) == out.absolute()


def complete_replacement(out: Path, held: bool = False) -> None:
    """Put a finished --overwrite run in the place of the old run at `out`, and remove the old run's own files;
    also completes a replacement that a kill interrupted at any step (each step leaves a state this recognizes:
    the new run finished in the staging folder, the old one moved aside, the new one in place). Under the new
    run's lock (held: the caller holds it already, as the finishing run does); paths are derived from `out`,
    never read from a manifest."""
    staging, aside = staging_folder(out), _aside_folder(out)
    new = staging if _replacement_pending(staging, out) else out
    if not _replacement_pending(new, out):
        return
    with contextlib.nullcontext() if held else folder_lock(new, str(new)):
        if not _replacement_pending(new, out):
            return  # another process completed it meanwhile
        if new == staging:
            if os.path.lexists(out):
                old_manifest = read_manifest(out) if out.is_dir() else None
                if old_manifest is None or foreign_entries(out, old_manifest):
                    raise RunFolderError(f"--out {out}: changed during the run and now holds files no minilm run "
                                         f"wrote; the new run stays in {staging}")
                _clear_aside(aside)
                with folder_lock(out, str(out)):
                    os.replace(out, aside)
            os.replace(staging, out)  # the lock held on the new run's folder moves with it
        _clear_aside(aside)
        write_manifest(out, {**read_manifest(out), "replaces": None})


def _clear_aside(aside: Path) -> None:
    """Remove the old run moved aside: its own files (by its manifest, which goes last), then the folder."""
    if not aside.is_dir() or aside.is_symlink():
        return
    manifest = read_manifest(aside)
    _remove_entries(aside, owned_entries(aside, manifest))
    with contextlib.suppress(OSError):
        aside.rmdir()  # only if empty: anything left is not the old run's
