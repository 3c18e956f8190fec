"""Model files: the one writer and the one JSON reader.

Writing: whole or not at all, and readable as any file the user creates. `replaced_atomically(path)` gives a
temporary file beside `path` to write, then renames it onto `path`: a reader, or an interrupted run, sees the old
file or the new one, never half of one. The result has the mode a plain `open(path, "w")` would give it (0666 less
the umask): `tempfile.mkstemp`, and safetensors' `save_file` (which since 0.8 writes a private temporary file and
renames it), would leave 0600, a model other users cannot read. `write_text`, `write_json`, `copy_file` and
`save_tensors` write through it.

Reading: `read_json(path, what)` is a model folder's JSON file, or one line naming the file and what is wrong with it.
"""

import contextlib
import itertools
import json
import os
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
