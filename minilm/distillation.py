"""Distillation into fewer layers: a student made of some of the teacher's layers, and the teacher's embeddings of
the training texts, computed once and kept on disk.

    student = student_from_layers(teacher, [0, 2, 4])        # embeddings, those 3 layers, pooling, Normalize
    check_teacher(teacher, student)                           # the same embedding size (no projection)
    targets = teacher_embeddings(teacher, texts, "run/teacher_embeddings.npy")   # [len(texts), dim] float32

The student then learns the teacher's embeddings with losses/mse.py's MSELoss (train.py --loss mse --teacher ...).
A saved student is an ordinary model: config.json says 3 layers, and sentence-transformers and transformers load it.

teacher_embeddings keeps `PATH` (a plain .npy) and `PATH` with .json (its manifest: the teacher's fingerprint and
settings, the texts' SHA-256 and count, the array's shape, dtype and SHA-256). Both are written whole (a temporary
file renamed into place), the manifest first. A later call with the same teacher, settings and texts reads the
array back (a resumed run computes nothing); anything else there is refused, never overwritten, and the files are
read as untrusted input: every field of the manifest, the .npy header and its size and SHA-256 are checked before
the array is used.
"""

import copy
import dataclasses
import hashlib
import json
import numbers
from pathlib import Path

import numpy as np
import torch.nn as nn

from minilm import files
from minilm.corpus import file_sha256, model_fingerprint
from minilm.errors import InputError
from minilm.model import SentenceEncoder

FORMAT = "minilm-teacher-embeddings/1"
DTYPE = np.dtype("<f4")  # float32, as encode returns it


def student_from_layers(model: SentenceEncoder, layers) -> SentenceEncoder:
    """A new SentenceEncoder with the teacher's embeddings, the given transformer layers (in the given order),
    pooling, Normalize, tokenizer and max_seq_length: copies, so training the student leaves the teacher as it is.
    Its config's num_hidden_layers is len(layers), so save() writes a model that loads anywhere.
    layers: distinct layer numbers from 0 to the teacher's last; anything else is an InputError (one line)."""
    count = model.encoder.config.num_hidden_layers
    layers = check_layers(layers, count)
    encoder = copy.deepcopy(model.encoder)  # the live encoder: a module the user swapped in is kept
    encoder.layers = nn.ModuleList(encoder.layers[index] for index in layers)
    encoder.config = dataclasses.replace(encoder.config, num_hidden_layers=len(layers))
    student = SentenceEncoder(encoder, copy.deepcopy(model.tokenizer), model.pooling_modes, model.normalize,
                              source_dir=model.source_dir, prompts=dict(model.prompts),
                              default_prompt_name=model.default_prompt_name, truncate_dim=model.truncate_dim)
    student.backends = model.backends
    return student.train(model.training)


def check_layers(layers, count: int) -> list:
    """-> layers as a list of ints, or an InputError naming the first bad one and what is accepted."""
    expected = f"expected distinct layer numbers from 0 to {count - 1}, e.g. {list(range(0, count, 2))}"
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InputError(f"layers {layers!r}: {expected}")
    layers = list(layers)
    if not layers:
        raise InputError(f"layers []: no layer; {expected}")
    for layer in layers:
        if not isinstance(layer, numbers.Integral) or isinstance(layer, bool):
            raise InputError(f"layers {layers}: {layer!r} is not a layer number; {expected}")
        if not 0 <= layer < count:
            raise InputError(f"layers {layers}: the model has no layer {layer} (it has {count}: 0 to {count - 1}); "
                             f"{expected}")
        if layers.count(layer) > 1:
            raise InputError(f"layers {layers}: layer {layer} is given twice; {expected}")
    return [int(layer) for layer in layers]


def check_teacher(teacher: SentenceEncoder, student: SentenceEncoder) -> None:
    """MSE distillation compares the two embeddings element by element: they must have the same size."""
    if teacher.embedding_dim != student.embedding_dim:
        raise InputError(f"the teacher's embeddings have {teacher.embedding_dim} dimensions and the student's "
                         f"{student.embedding_dim}: distillation by MSE needs the same size, and minilm has no "
                         "projection between them; choose a teacher of the student's size, or build the student "
                         "from the teacher's layers")


def texts_sha256(texts: list) -> str:
    """SHA-256 of the texts in order, each as its UTF-8 length (8 bytes, little-endian) then its bytes: two lists
    hash alike only when they hold the same texts in the same order."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def teacher_embeddings(teacher: SentenceEncoder, texts: list, path, teacher_name=None, batch_size: int = 64,
                       precision: str = "fp32", show_progress: bool = False) -> np.ndarray:
    """The teacher's embeddings of texts, [len(texts), teacher.embedding_dim] float32, computed once with
    encode's fast path (length-sorted batches, `precision`) and kept at `path` (.npy) with its manifest
    (`path` with .json); a later call with the same teacher, settings and texts reads them back.

    teacher_name: how the manifest names the teacher (default: its folder); the fingerprint of its weights,
    tokenizer, pooling and Normalize is what must match. A file at `path` that does not match (another teacher,
    setting or texts; a damaged or edited file; a .npy without its manifest) is an InputError (one line) naming
    it: it is never overwritten. Under torchrun, let one process compute (the others wait, then call it to read).
    """
    path = Path(path)
    manifest_path = path.with_suffix(".json")
    expected = {"format": FORMAT, "teacher": str(teacher_name or teacher.source_dir),
                "teacher_fingerprint": model_fingerprint(teacher), "precision": precision,
                "max_seq_length": teacher.max_seq_length, "count": len(texts), "texts_sha256": texts_sha256(texts),
                "shape": [len(texts), teacher.embedding_dim], "dtype": DTYPE.str}
    if path.exists() and not manifest_path.exists():
        raise InputError(f"{path} exists without its manifest {manifest_path.name}: minilm did not write it whole; "
                         "remove it (or choose another path) to compute the teacher's embeddings")
    if path.exists():
        return read_teacher_embeddings(path, expected)
    if manifest_path.exists():
        read_manifest(manifest_path)  # a manifest without its array: ours (written first) if it reads as ours
    # The whole embedding, which the student learns with its whole embedding, also from a teacher saved with a
    # truncate_dim (a Matryoshka model): that is only encode's default size.
    embeddings = teacher.encode(texts, batch_size=batch_size, precision=precision, show_progress=show_progress,
                                truncate_dim=teacher.embedding_dim)
    embeddings = np.ascontiguousarray(embeddings, dtype=DTYPE).reshape(len(texts), teacher.embedding_dim)
    with files.replaced_atomically(path) as temporary:
        with open(temporary, "wb") as file:
            np.save(file, embeddings, allow_pickle=False)
        manifest = {**expected, "sha256": file_sha256(temporary)}
        files.write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")  # first: it vouches for the array
    return embeddings


def read_manifest(path: Path) -> dict:
    """A teacher-embeddings manifest, checked to be one (a JSON object of this FORMAT), else an InputError."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}; not touching it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not a minilm teacher-embeddings manifest ({FORMAT}); not touching it: remove it "
                         "or choose another path")
    return manifest


def read_teacher_embeddings(path: Path, expected: dict) -> np.ndarray:
    """The array at path, after its manifest matches `expected` field by field and the file matches the manifest
    (header: dtype, order, shape; size; SHA-256) and holds finite numbers only; else an InputError naming what."""
    manifest_path = path.with_suffix(".json")
    manifest = read_manifest(manifest_path)
    for key, value in expected.items():
        if key != "teacher" and manifest.get(key) != value:
            what = {"teacher_fingerprint": f"were computed by another teacher ({manifest.get('teacher')!r})",
                    "texts_sha256": "are of other texts (another SHA-256)"}.get(
                        key, f"have {key} {json.dumps(manifest.get(key))}, not {json.dumps(value)}")
            raise InputError(f"{manifest_path}: the embeddings there {what}; remove {path.name} and "
                             f"{manifest_path.name} (or choose another path) to compute them again")
    rows, dim = expected["shape"]
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(file)
            offset = file.tell()
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable .npy file ({error})") from None
    if header != ((rows, dim), False, DTYPE):
        raise InputError(f"{path}: holds a {header[2]} array of shape {header[0]}; its manifest says "
                         f"float32 [{rows}, {dim}] (C order)")
    if path.stat().st_size != offset + rows * dim * DTYPE.itemsize:
        raise InputError(f"{path}: {path.stat().st_size} bytes, not the {offset + rows * dim * DTYPE.itemsize} of a "
                         f"float32 [{rows}, {dim}] array: the file is truncated or was changed")
    if file_sha256(path) != manifest.get("sha256"):
        raise InputError(f"{path}: its SHA-256 is not the one its manifest {manifest_path.name} records: the file "
                         "is damaged or was changed; remove both to compute the embeddings again")
    embeddings = np.fromfile(path, dtype=DTYPE, offset=offset).reshape(rows, dim)
    if not np.isfinite(embeddings).all():
        raise InputError(f"{path}: holds NaN or infinite values; refusing to train toward them")
    return embeddings
