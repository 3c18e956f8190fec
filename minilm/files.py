"""Files minilm writes for its user: whole or not at all, and readable as any file the user creates.

`replaced_atomically(path)` gives a temporary file beside `path` to write, then renames it onto `path`: a reader,
or an interrupted run, sees the old file or the new one, never half of one. The result has the mode a plain
`open(path, "w")` would give it (0666 less the umask): `tempfile.mkstemp`, and safetensors' `save_file` (which
since 0.8 writes a private temporary file and renames it), would leave 0600, a model other users cannot read.
"""

import contextlib
import itertools
import os
from pathlib import Path

from safetensors.torch import save_file


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
