"""A corpus DIR of `python -m minilm encode`: what encode may write there, its lock, and the checks that every
read of a DIR passes first (encode resuming it, search and minilm.corpus.Corpus opening it).

Everything in DIR is input: a user may have edited, replaced or cut any file. Before use, the manifest's fields
are checked against what encode writes (types, ranges, and each other: shape = [count, columns of the storage],
windows = ceil(count / window), int8 calibration of `dim` values with max > min), then the files against the
manifest (embeddings.npy's dtype, shape and size, offsets.npy's and its offsets increasing inside INPUT,
ids.txt's line count, done.bin's size). A mismatch is one CorpusError naming the file and the field. A symbolic
link in DIR is refused, never followed: encode writes rows into embeddings.npy and done.bin in place.

The stored format is the manifest's `storage` (float32, float16, int8, binary); DIRs written before it was
named so say `dtype`, and are read the same. `settings.truncate_dim` (null: the whole embedding) and
`settings.prompt` (the text put before every text, "" for none) are missing from DIRs written before encode
had them, and read as null and "".
"""

import contextlib
import errno
import json
import math
import os
from pathlib import Path

import numpy as np

from minilm import files
from minilm.files import LOCK
from minilm.model import PRECISIONS

FORMAT = "minilm-corpus/1"
STORAGES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "binary": np.uint8}
INPUT_FORMATS = ("text", "jsonl", "tsv", "csv")
FILES = ("manifest.json", "embeddings.npy", "ids.txt", "offsets.npy", "done.bin")  # besides minilm.lock
PARTIAL = ".partial"  # files being laid out; each is renamed to its name once complete
STATES = ("preparing", "encoding", "finished")


class CorpusError(Exception):
    """Bad input, a DIR that does not match, or a write that failed: one line for the user."""


# --- what encode writes ---------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value) -> None:
    """Atomically (minilm/files.py) and durably: on disk, with its folder entry, before this returns. Called
    holding DIR's lock: another temporary file of it is one a killed write left behind, and is removed."""
    with files.replaced_atomically(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(json.dumps(value, indent=1) + "\n")
            file.flush()
            os.fsync(file.fileno())
    fsync_dir(path.parent)
    for name in os.listdir(path.parent):
        if files.temporary_of(name) == path.name:
            (path.parent / name).unlink()


def _is_ours(name: str) -> bool:
    return name in FILES or name == LOCK or name.removesuffix(PARTIAL) in FILES or files.temporary_of(name) in FILES


def remove_ours(out: Path) -> None:
    """Remove encode's files from DIR (a symbolic link as a link), all but the lock: it is held meanwhile."""
    for name in os.listdir(out):
        if name != LOCK and _is_ours(name):
            (out / name).unlink()


@contextlib.contextmanager
def lock(out: Path):
    """Hold DIR's lock (minilm.lock, as train.py does its run folder) while encode writes there; CorpusError
    at once when another process holds it."""
    try:
        with files.folder_lock(out):
            yield
    except files.FolderInUse as owner:
        raise CorpusError(f"--out {out}: another process ({owner}) is encoding into it; wait for it to end, or "
                          "choose another --out") from None
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise CorpusError(f"{out / LOCK} is a symbolic link; the lock is a file encode makes in DIR itself: "
                          "remove the link") from None


# --- the manifest ---------------------------------------------------------------------------------------------
def read_manifest(out: Path, writing: bool = True):
    """DIR's manifest, None for a new or empty DIR; refuses a DIR holding files minilm did not write (when
    `writing`: encode's; a read, search or Corpus, passes them by), a symbolic link, or a manifest with a field
    encode does not write (checked as far as its state goes)."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file, not a directory")
    names = sorted(os.listdir(out)) if out.is_dir() else []
    if not writing:  # a README or .ipynb_checkpoints a user put beside a finished DIR cannot hurt a read of it
        names = [name for name in names if _is_ours(name)]
    first = (LOCK, "manifest.json")  # what encode writes first: with no manifest, nothing else is known its own
    foreign = [name for name in names if not _is_ours(name)
               or "manifest.json" not in names and name not in first and files.temporary_of(name) not in first]
    if foreign:
        raise CorpusError(f"--out {out} holds files minilm did not write ({', '.join(foreign[:5])}); "
                          "choose an empty or new --out (minilm never deletes files it did not write)")
    for name in names:
        if (out / name).is_symlink() or not (out / name).is_file():
            raise CorpusError(f"{out / name} is a symbolic link or a folder; encode reads and writes only files of "
                              "its own in DIR: remove it, or choose another --out")
    if "manifest.json" not in names:
        return None
    path = out / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorpusError(f"{path}: unreadable ({str(error)[:100]}); not touching {out}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{path} is not a minilm corpus manifest ({FORMAT}); choose an empty or new --out")
    for fields in (manifest, manifest.get("settings")):
        if isinstance(fields, dict) and "dtype" in fields and "storage" not in fields:
            fields["storage"] = fields.pop("dtype")  # written before the stored format was called storage
    if isinstance(manifest.get("settings"), dict):  # written before encode could cut embeddings or add a prompt
        manifest["settings"].setdefault("truncate_dim", None)
        manifest["settings"].setdefault("prompt", "")
    _check(path, "state", manifest.get("state"), lambda v: v in STATES, " or ".join(STATES))
    if manifest["state"] != "preparing":  # preparing: nothing was encoded; the next run lays DIR out again
        _check_fields(path, manifest)
    return manifest


def _check(path: Path, field: str, value, accepted, expected: str) -> None:
    if not accepted(value):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise CorpusError(f"{path}: field {field!r} is {shown}; expected {expected} (damaged or edited: "
                          "--overwrite encodes DIR again)")


def _whole(low: int):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def _text(value) -> bool:
    return isinstance(value, str)


def _text_or_none(value) -> bool:
    return value is None or isinstance(value, str)


def _check_fields(path: Path, manifest: dict) -> None:
    """Every field that encode, search or Corpus reads, as encode writes it."""
    _check(path, "settings", manifest.get("settings"), lambda v: isinstance(v, dict), "an object")
    _check(path, "input", manifest.get("input"), lambda v: isinstance(v, dict), "an object")
    settings, source = manifest["settings"], manifest["input"]
    for field, accepted, expected in (
            ("model_fingerprint", _text, "a string"), ("storage", lambda v: v in STORAGES, " | ".join(STORAGES)),
            ("precision", lambda v: v in PRECISIONS, " | ".join(PRECISIONS)),
            ("normalize", lambda v: isinstance(v, bool), "true or false"),
            ("max_seq_length", _whole(1), "a whole number >= 1"), ("batch_size", _whole(1), "a whole number >= 1"),
            ("window", _whole(1), "a whole number >= 1"),
            ("calibration_size", lambda v: v is None or _whole(1)(v), "null or a whole number >= 1"),
            ("input_path", _text, "a string"), ("input_format", lambda v: v in INPUT_FORMATS, "an input format"),
            ("field", _text_or_none, "null or a string"), ("id_field", _text_or_none, "null or a string"),
            ("truncate_dim", lambda v: v is None or _whole(1)(v), "null or a whole number >= 1"),
            ("prompt", _text, "a string (\"\" for none)")):
        _check(path, f"settings.{field}", settings.get(field), accepted, expected)
    for field, accepted, expected in (
            ("path", _text, "a string"), ("format", lambda v: v in INPUT_FORMATS, " | ".join(INPUT_FORMATS)),
            ("size", _whole(1), "a whole number >= 1"), ("mtime_ns", _whole(0), "a whole number"),
            ("sha256", lambda v: _text(v) and len(v) == 64, "a sha256 (64 hex digits)")):
        _check(path, f"input.{field}", source.get(field), accepted, expected)
    _check(path, "model", manifest.get("model"), _text, "a string")
    _check(path, "count", manifest.get("count"), _whole(1), "a whole number >= 1")
    _check(path, "dim", manifest.get("dim"), _whole(1), "a whole number >= 1")
    if settings["truncate_dim"] is not None:
        _check(path, "dim", manifest["dim"], lambda v: v == settings["truncate_dim"],
               f"settings.truncate_dim ({settings['truncate_dim']})")
    _check(path, "storage", manifest.get("storage"), lambda v: v == settings["storage"],
           f"settings.storage ({settings['storage']})")
    count, dim, storage = manifest["count"], manifest["dim"], manifest["storage"]
    shape = [count, (dim + 7) // 8 if storage == "binary" else dim]
    _check(path, "shape", manifest.get("shape"), lambda v: v == shape, f"{shape} ([count, columns of {storage}])")
    _check(path, "windows", manifest.get("windows"), lambda v: v == math.ceil(count / settings["window"]),
           f"ceil(count / settings.window) = {math.ceil(count / settings['window'])}")
    _check(path, "normalize", manifest.get("normalize"), lambda v: v == settings["normalize"], "settings.normalize")
    _check(path, "precision", manifest.get("precision"), lambda v: v == settings["precision"], "settings.precision")
    _check(path, "empty_texts", manifest.get("empty_texts"), lambda v: _whole(0)(v) and v <= count,
           f"a whole number from 0 to count ({count})")
    if storage == "int8":
        _check_calibration(path, manifest.get("calibration"), dim)
    else:
        _check(path, "calibration", manifest.get("calibration"), lambda v: v is None, f"null for {storage}")


def _check_calibration(path: Path, calibration, dim: int) -> None:
    """int8: per-dimension ranges as search decodes them (float32, finite, max > min)."""
    _check(path, "calibration", calibration, lambda v: isinstance(v, dict), "an object with min, max and size")
    _check(path, "calibration.size", calibration.get("size"), _whole(1), "a whole number >= 1")
    ranges = {}
    for field in ("min", "max"):
        value = calibration.get(field)
        _check(path, f"calibration.{field}", value, lambda v: isinstance(v, list) and len(v) == dim and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v), f"a list of {dim} numbers")
        with np.errstate(over="ignore"):
            ranges[field] = np.asarray(value, dtype=np.float32)
    for at in np.flatnonzero(~(np.isfinite(ranges["min"]) & np.isfinite(ranges["max"])
                               & (ranges["max"] > ranges["min"])))[:1]:
        _check(path, f"calibration.max[{at}]", calibration["max"][at], lambda v: False,
               f"a finite float32 above calibration.min[{at}] ({calibration['min'][at]})")


# --- the files ------------------------------------------------------------------------------------------------
def check_files(out: Path, manifest: dict) -> tuple:
    """DIR's files against its (checked) manifest, before any is used: -> (embeddings, offsets) memory-mapped."""
    count = manifest["count"]
    needed = ("embeddings.npy", "offsets.npy", "ids.txt") + (("done.bin",) if manifest["state"] == "encoding" else ())
    for name in needed:
        if not (out / name).is_file():
            raise CorpusError(f"{out / name}: missing (the manifest says {manifest['state']}); --overwrite encodes "
                              "DIR again")
    embeddings = _mapped(out / "embeddings.npy", STORAGES[manifest["storage"]], tuple(manifest["shape"]))
    offsets = _mapped(out / "offsets.npy", np.int64, (count,))
    size = manifest["input"]["size"]
    for start in range(0, count, 1 << 20):  # in chunks: an offsets.npy may be larger than memory would like
        chunk = np.asarray(offsets[max(start - 1, 0):start + (1 << 20)])
        if (chunk < 0).any() or (chunk >= size).any() or (np.diff(chunk) <= 0).any():
            raise CorpusError(f"{out / 'offsets.npy'}: rows {start}..{start + len(chunk) - 1} are not increasing byte "
                              f"offsets inside INPUT (input.size {size}); damaged: --overwrite encodes DIR again")
    lines = 0
    with open(out / "ids.txt", "rb") as file:
        while block := file.read(1 << 20):
            lines += block.count(b"\n")
    if lines != count:
        raise CorpusError(f"{out / 'ids.txt'}: {lines} lines, the manifest's count is {count} (one id per row); "
                          "damaged: --overwrite encodes DIR again")
    if manifest["state"] == "encoding":
        done = np.fromfile(out / "done.bin", dtype=np.uint8)
        if len(done) != manifest["windows"] or (done > 1).any():
            raise CorpusError(f"{out / 'done.bin'}: {len(done)} bytes of values {sorted(set(done.tolist()))[:4]}, the "
                              f"manifest's windows is {manifest['windows']} (one byte per window, 0 or 1); damaged: "
                              "--overwrite encodes DIR again")
    return embeddings, offsets


def _mapped(path: Path, dtype, shape: tuple):
    """path memory-mapped, checked to hold exactly a C-ordered array of this dtype and shape."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise CorpusError(f"{path}: not a .npy file that can be mapped ({str(error)[:100]}); damaged: --overwrite "
                          "encodes DIR again") from None
    expected = np.dtype(dtype).newbyteorder("<")
    if array.dtype != expected or array.shape != shape or not array.flags.c_contiguous:
        raise CorpusError(f"{path}: {array.dtype} {list(array.shape)}, the manifest says {expected} {list(shape)}; "
                          "damaged or replaced: --overwrite encodes DIR again")
    if path.stat().st_size != array.offset + array.nbytes:
        raise CorpusError(f"{path}: {path.stat().st_size} bytes, its header says {array.offset + array.nbytes}; "
                          "damaged: --overwrite encodes DIR again")
    return array
