"""Files: the one writer, the one JSON reader for model files, and the lock of a folder minilm writes into.

Writing: whole or not at all, and readable as any file the user creates. `replaced_atomically(path)` gives a
temporary file beside `path` to write, then renames it onto `path`: a reader, or an interrupted run, sees the old
file or the new one, never half of one. The result has the mode a plain `open(path, "w")` would give it (0666 less
the umask): `tempfile.mkstemp`, and safetensors' `save_file` (which since 0.8 writes a private temporary file and
renames it), would leave 0600, a model other users cannot read. `write_text`, `write_json`, `copy_file` and
`save_tensors` write through it.

Reading: `read_json(path, what)` is a model folder's JSON file, or one line naming the file and what is wrong with it.

`folder_lock(folder)` holds FOLDER/minilm.lock while a process writes into a folder minilm made (a training run,
a corpus): one writer at a time, the second refused at once, before it touches anything.
"""

import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

from minilm.errors import InputError, MissingFileError

# Python's type of a JSON value -> its JSON name, for messages
JSON_NAMES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "true/false",
              type(None): "null"}


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a temporary path beside `path` (created, empty); when the block ends without an error, give it the
    mode of a newly created file and rename it onto `path`; on any error (Ctrl-C included) remove it."""
    path = Path(path)
    for attempt in itertools.count():
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{attempt}.partial")
        try:
            # Created as open(path, "w") would create it, so the kernel applies the umask (and default ACLs):
            # its mode is the one the finished file must have, whatever the writer does to the file meanwhile.
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another process (or a killed run of this one) holds this name
            continue
        break
    mode = os.fstat(handle).st_mode & 0o7777
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    """`path.write_text(text)` (UTF-8), atomically and with a new file's mode."""
    with replaced_atomically(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def save_tensors(tensors: dict, path, metadata=None) -> None:
    """safetensors' `save_file`, atomically and with a new file's mode (not save_file's 0600)."""
    with replaced_atomically(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def write_json(path, value) -> None:
    """`value` as indented JSON (ending in a newline), written as `write_text` writes."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def copy_file(source, path) -> None:
    """`shutil.copyfile(source, path)`, atomically and with a new file's mode."""
    with replaced_atomically(path) as temporary:
        shutil.copyfile(source, temporary)


def read_json(path, what: str, kind=dict):
    """The JSON value in `path`, which must be a `kind` (dict: an object; list). what: what the file holds, for
    the messages ("the BERT settings"). A missing file is a MissingFileError; one that cannot be read, is not
    JSON or holds another type is an InputError; each message is one line that names the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file; expected {what} there") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {what} from {path}: {error}") from None
    if not isinstance(value, kind):
        raise InputError(f"{path}: expected {what} as a JSON {JSON_NAMES[kind]}, got a "
                         f"{JSON_NAMES.get(type(value), type(value).__name__)}")
    return value


def temporary_of(name: str):
    """The name of the file that `name` was to replace, when `name` is a temporary file of replaced_atomically
    (one left behind by a process killed while it wrote); else None."""
    match = re.fullmatch(r"\.(.+)\.\d+-\d+\.partial", name)
    return match.group(1) if match else None


LOCK = "minilm.lock"  # flock'ed while a process writes in the folder; the kernel drops it when the process dies


class FolderInUse(Exception):
    """Another process holds the folder's lock; str(error) is what it wrote in the lock file ("pid N")."""


@contextlib.contextmanager
def folder_lock(folder):
    """Hold folder/minilm.lock (flock, exclusive) for the block; FolderInUse at once when another process holds it.

    The lock file is created if missing and never followed when it is a symbolic link (OSError, errno ELOOP): the
    pid written into it must not land in a file elsewhere. The lock is the kernel's, so a killed process leaves
    none behind. A lock file may be removed by the process that holds it: one locked after that, through a handle
    opened before, no longer is the folder's lock file and counts as held by another process."""
    path = Path(folder) / LOCK
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.samestat(os.fstat(handle.fileno()), os.stat(path, follow_symlinks=False)):
            raise FileNotFoundError(errno.ENOENT, "replaced", str(path))
    except (BlockingIOError, FileNotFoundError):
        owner = handle.read(200).strip() or "another process"
        handle.close()
        raise FolderInUse(owner) from None
    except BaseException:
        handle.close()
        raise
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()
