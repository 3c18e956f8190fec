"""Embed a corpus of any size to disk, resumably, over any number of processes:  python -m minilm encode ...

    DIR/embeddings.npy  [count, dim] float32/float16/int8, or [count, ceil(dim / 8)] uint8 packed bits: a plain
                        .npy (np.load(path, mmap_mode="r") opens it without reading it)
    DIR/ids.txt         one id per row (the --id-field/--id-column value, else the record's line number in INPUT)
    DIR/offsets.npy     [count] int64: the byte offset of each row's record in INPUT (search prints the text)
    DIR/manifest.json   model, its fingerprint, settings, storage, calibration, input fingerprint, state
    DIR/done.bin        while encoding: one byte per window, 1 once its rows are on disk
    DIR/minilm.lock     while encoding: held by the process that prepares DIR (see minilm/corpus_folder.py)

The run has two phases. Prepare (rank 0 alone): one cheap pass over INPUT validates every record (so bad input
fails before any encoding, naming its line), hashes the file, writes ids.txt and offsets.npy, encodes the int8
calibration sample (the first `calibration_size` texts), and creates embeddings.npy at its full size: counting
first, rather than growing the file, is what lets every process write its own rows into one file from the start.
Encode: the input is cut into windows of `window` records; the windows not yet done are dealt round-robin to the
processes, and each process reads its windows by offset, encodes them with `model.encode` (which sorts a window
by length into batches), and writes the rows at their place in input order with pwrite. Memory holds one window.

Resume: a window's byte in done.bin is set only after its rows are written and fsynced, and every window is
encoded the same way whoever encodes it, so a run killed anywhere (kill -9 included) continues from the windows
not marked done and ends byte-identical to an uninterrupted run; so does a run over N processes. (Same model,
settings and kind of hardware: float rounding differs between CPU and GPU.) pwrite rather than a shared
memory map: a page holding the rows of two windows is then never written back whole by two machines.

DIR is input too (minilm/corpus_folder.py): its manifest and files are checked against each other before a
resumed run writes there or a search reads them.
"""

import array
import contextlib
import hashlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from minilm import corpus_folder as folder
from minilm import fast_paths
from minilm.corpus_folder import FORMAT, PARTIAL, STORAGES, CorpusError
from minilm.data import DataError, delimited_records, parse_json_line, strip_line_ending
from minilm.errors import InputError
from minilm.files import LOCK
from minilm.similarity_search import calibrate_int8, pack_binary, quantize_int8
from minilm.tokenizer import lone_surrogate

# Settings that change the bytes of embeddings.npy: a resumed run must use the same ones.
SETTINGS = ("model_fingerprint", "storage", "precision", "normalize", "max_seq_length", "batch_size", "window",
            "calibration_size", "input_path", "input_format", "field", "id_field", "truncate_dim", "prompt")
# Test hook: MINILM_CORPUS_CRASH="point:window" ends the process like kill -9 at that point (points: prepare,
# rows = half of the window's rows written, flushed = rows fsynced but the window not marked done, marked).
CRASH = os.environ.get("MINILM_CORPUS_CRASH", "")
# int8 ranges from a smaller sample clip too much of the rest: the share of STS-B test values (all-MiniLM-L6-v2)
# outside ranges calibrated on n random texts is 47% at n = 1, 17% at 10, 6% at 30, 1.9% at 100, 0.1% at 1,000.
MIN_CALIBRATION = 100


def _crash(point: str, window: int = -1) -> None:
    if CRASH and CRASH in (point, f"{point}:{window}"):
        _die()


def _die() -> None:
    os._exit(137)  # no cleanup, no flush: what kill -9 leaves


# --- input ----------------------------------------------------------------------------------------------------
def input_format(path: Path, fmt: str = "auto") -> str:
    """The reader for INPUT: --format, else by extension (.jsonl/.json, .tsv, .csv; anything else: text)."""
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        raise CorpusError(f"{path}: compressed input is not supported (records are read back by byte offset); "
                          "decompress it first")
    return {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".csv": "csv"}.get(suffix, "text")


class Reader:
    r"""Records of INPUT, read by minilm.data's rules (lines end at \n or \r\n only; TSV and CSV quoting). text:
    every line is a text (an empty line is the empty text, kept so that row i is line i + 1); jsonl: one object per
    line, blank lines skipped; tsv/csv: a header line, then one row per line (a CSV quoted field may go on over
    several lines, RFC 4180), blank lines skipped. A record's offset is the byte where its first line starts."""

    def __init__(self, path, fmt: str = "auto", field=None, id_field=None):
        self.path = Path(path)
        if self.path.is_dir():
            raise CorpusError(f"{self.path} is a folder: INPUT is one file (.txt, .jsonl, .tsv or .csv)")
        if not self.path.is_file():
            raise CorpusError(f"{self.path}: no such file")
        self.format = input_format(self.path, fmt)
        self.field, self.id_field = field, id_field
        self.body_start, self.body_line = 0, 1  # byte offset and line number of the first record
        if self.format == "text":
            if field or id_field:
                raise CorpusError(f"{self.path} is read as plain text (one text per line): --field/--id-field are "
                                  "for .jsonl/.tsv/.csv input (or pass --format)")
        elif self.format == "jsonl":
            self.field = field or "text"
        else:
            self.delimiter = "\t" if self.format == "tsv" else ","
            columns = self._header()
            self.field = field or "text"
            for flag, name in (("--column", self.field), ("--id-column", id_field)):
                if name is not None and name not in columns:
                    raise CorpusError(f"{self.path} line 1: no column {name!r} (columns: {', '.join(columns)}); "
                                      f"pass {flag}")
                if columns.count(name) > 1:  # which one is meant cannot be told: neither is guessed
                    raise CorpusError(f"{self.path} line 1: the header names {name!r} twice ({flag}); keep one")
            self.text_index = columns.index(self.field)
            self.id_index = columns.index(id_field) if id_field else None
            self.num_columns = len(columns)

    def _header(self) -> list:
        """The TSV/CSV header's column names; sets body_start and body_line to the line after it."""
        with open(self.path, "rb") as file:
            for _, columns in self._records(self._lines(file, 0, 1)):
                self.body_start = file.tell()  # the reader stopped at the header's last line
                file.seek(0)
                self.body_line = file.read(self.body_start).count(b"\n") + 1
                return [name.strip() for name in columns]
        raise CorpusError(f"{self.path} holds no records (not even a header line)")

    def _lines(self, file, offset: int, line_number):
        r"""((byte offset, line number or None), line with its ending) from `offset`; a line ends at b"\n"."""
        for raw in file:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(f"{self.path} {self._where(offset, line_number)}: not UTF-8 ({error.reason} at "
                                  f"byte {error.start} of the line); minilm reads UTF-8 text") from None
            yield (offset, line_number), line.removeprefix("\ufeff") if offset == 0 else line
            offset, line_number = offset + len(raw), None if line_number is None else line_number + 1

    def _records(self, lines):
        """(key of the record's first line, fields) of TSV/CSV lines, by minilm.data's reader."""
        try:
            yield from delimited_records(lines, self.delimiter, lambda key: f"{self.path} {self._where(*key)}")
        except DataError as error:
            raise CorpusError(str(error)) from None

    @staticmethod
    def _where(offset: int, line_number) -> str:
        return f"line {line_number}" if line_number is not None else f"byte {offset}"

    def records(self, offset=None, line_number=None):
        """Yield (byte offset, line number or None, text, id or None) from `offset` (default: the first record)."""
        if offset is None:
            offset, line_number = self.body_start, self.body_line
        with open(self.path, "rb") as file:
            file.seek(offset)
            lines = self._lines(file, offset, line_number)
            if self.format in ("tsv", "csv"):
                for (start, number), fields in self._records(lines):
                    if len(fields) != self.num_columns:
                        raise CorpusError(f"{self.path} {self._where(start, number)}: {len(fields)} fields, the "
                                          f"header has {self.num_columns}")
                    yield start, number, fields[self.text_index], \
                        fields[self.id_index] if self.id_index is not None else None
                return
            for (start, number), line in lines:
                record = self._parse(strip_line_ending(line), self._where(start, number))
                if record is not None:
                    yield (start, number, *record)

    def _parse(self, line: str, where):
        """(text, id or None) of a text or JSONL line; None for a blank JSONL line."""
        if self.format == "text":
            return line, None
        if not line.strip():
            return None
        try:
            value = parse_json_line(line)
        except json.JSONDecodeError as error:
            raise CorpusError(f"{self.path} {where}: not JSON ({error.msg} at column {error.colno}); "
                              "JSONL holds one object per line") from None
        if not isinstance(value, dict):
            raise CorpusError(f"{self.path} {where}: a JSON {type(value).__name__}, not an object")
        keys = ", ".join(map(repr, list(value)[:10]))
        for flag, name in (("--field", self.field), ("--id-field", self.id_field)):
            if name is not None and name not in value:
                raise CorpusError(f"{self.path} {where}: no field {name!r} (fields: {keys}); pass {flag}")
        text, record_id = value[self.field], value.get(self.id_field) if self.id_field else None
        if not isinstance(text, str):
            raise CorpusError(f"{self.path} {where}: field {self.field!r} is {type(text).__name__}, not a "
                              "string")
        if (problem := lone_surrogate(text)) is not None:
            raise CorpusError(f"{self.path} {where}: field {self.field!r} holds {problem}; fix the escape in "
                              "the file")
        if record_id is not None and not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
            raise CorpusError(f"{self.path} {where}: field {self.id_field!r} is {type(record_id).__name__}; "
                              "ids are strings or whole numbers")
        return text, None if record_id is None else str(record_id)

    def read(self, offset: int, count: int) -> list:
        """The texts of `count` records from the one at byte `offset` (a window)."""
        texts = []
        for _, _, text, _ in self.records(offset):
            texts.append(text)
            if len(texts) == count:
                return texts
        raise CorpusError(f"{self.path} ends {len(texts)} records after byte {offset}, {count} were expected: "
                          "the input changed during the run")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def manifest_model_name(name) -> str:
    """The model as the manifest names it: a local folder by its absolute path (search reads the manifest from any
    folder, and `runs/model` means nothing outside the one it was typed in), a hub id as it is."""
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)  # as minilm.load: a local folder comes first


def model_fingerprint(model) -> str:
    """sha256 of what decides a model's embeddings: weights, tokenizer, pooling, normalization."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.encoder.state_dict().items()):
        if name.startswith("pooler."):
            continue  # never used by sentence embeddings
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest.update(model.tokenizer.tokenizer.to_str().encode())
    digest.update(json.dumps([model.pooling_modes, bool(model.normalize), model.tokenizer.do_lower_case]).encode())
    return digest.hexdigest()


# --- files ----------------------------------------------------------------------------------------------------
def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _differences(old: dict, settings: dict, sha) -> str:
    """What differs between DIR's run and this one, as "key old -> new, ..." ("" if nothing)."""
    pairs = [(key, old["settings"].get(key), settings.get(key)) for key in SETTINGS
             if old["settings"].get(key) != settings.get(key)]
    if sha is not None and old.get("input", {}).get("sha256") not in (None, sha):
        pairs.append(("input sha256", old["input"]["sha256"], sha))
    text = ", ".join(f"{key} {_short(before)} -> {_short(after)}" for key, before, after in pairs)
    if old["settings"].get("model_fingerprint") != settings.get("model_fingerprint"):
        text += f"; DIR's model was {old.get('model')}"
    if [key for key, *_ in pairs] == ["precision"]:
        # --precision auto picks per machine: a DIR begun on another CPU is continued by naming what it ran
        text += f"; --precision {old['settings']['precision']} continues it"
    return text


def _short(value) -> str:
    text = json.dumps(value)
    return text[:17] + "...\"" if isinstance(value, str) and len(value) > 20 else text


# --- the run --------------------------------------------------------------------------------------------------
def _distributed():
    """(rank, world size) under torchrun, initializing the process group (gloo on CPU, nccl on GPU); (0, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Long timeout: the other ranks wait while rank 0 reads, validates and hashes all of INPUT.
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    return dist.get_rank(), dist.get_world_size()


def _broadcast(value, rank: int, world: int):
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cuda", torch.cuda.current_device())
                               if dist.get_backend() == "nccl" else None)
    return box[0]


def check_options(storage: str, batch_size: int, window: int, calibration_size: int) -> None:
    """CorpusError for settings no run should start with (the CLI checks them before loading the model)."""
    if storage not in STORAGES:
        raise CorpusError(f"--storage must be one of {', '.join(STORAGES)}, not {storage!r}")
    if window < 1 or batch_size < 1 or calibration_size < 1:
        raise CorpusError("--window, --batch-size and --calibration-size must be at least 1")
    if storage == "int8" and calibration_size < MIN_CALIBRATION:
        raise CorpusError(f"--calibration-size {calibration_size} is too few texts for int8: ranges calibrated on a "
                          "small sample clip the values of the other texts (on STS-B, 47% of values are clipped from "
                          f"1 text, 17% from 10, 6% from 30, 2% from 100); use at least {MIN_CALIBRATION} (an INPUT "
                          "with fewer texts is calibrated on all of them)")


def encode_corpus(model, input_path, out, model_name: str, fmt: str = "auto", field=None, id_field=None,
                  storage: str = "float32", precision: str = "fp32", normalize=None, batch_size: int = 32,
                  window: int = 10000, calibration_size: int = 1000, overwrite: bool = False,
                  progress: bool = True, log=print, truncate_dim=None, prompt=None, prompt_name=None) -> dict:
    """Encode INPUT into DIR (see the module docstring); under torchrun each process does its share.

    storage: how embeddings.npy holds the rows (float32, float16, int8, binary); precision: how encode computes
    them (see SentenceEncoder.encode; "auto" is decided here and the manifest records what runs). truncate_dim:
    keep each embedding's first truncate_dim dimensions (None: the model's truncate_dim, by default all);
    normalized embeddings are unit length after the cut. prompt or prompt_name: put before every text (None for
    both: the model's document prompt, as encode_document). The manifest records both (settings.truncate_dim,
    settings.prompt: the text). Returns the manifest. Raises CorpusError with one line for bad input or a DIR
    that does not match."""
    check_options(storage, batch_size, window, calibration_size)
    asked = precision
    try:  # "auto" -> the precision that runs: a manifest says what was done, and a resume must do the same
        precision = fast_paths.resolve_precision(model.device, precision)
        fast_paths.check_environment(model.device, precision)  # $MINILM_LINEAR can run it: before DIR is touched
    except InputError as error:
        raise CorpusError(f"--precision {asked}: {error}") from None
    truncate_dim, prompt = _cut_and_prompt(model, truncate_dim, prompt, prompt_name)
    rank, world = _distributed()
    out, input_path = Path(out), Path(input_path).resolve()
    model_name = manifest_model_name(model_name)
    normalize = bool(model.normalize if normalize is None else normalize)
    settings = {"model_fingerprint": model_fingerprint(model), "storage": storage, "precision": precision,
                "normalize": normalize, "max_seq_length": model.max_seq_length, "batch_size": batch_size,
                "window": window, "calibration_size": calibration_size if storage == "int8" else None,
                "input_path": str(input_path), "input_format": None, "field": field, "id_field": id_field,
                "truncate_dim": truncate_dim, "prompt": prompt}
    encode = dict(batch_size=batch_size, normalize=normalize, precision=precision,
                  truncate_dim=truncate_dim or model.embedding_dim, prompt=prompt)
    with contextlib.ExitStack() as held:  # rank 0 holds DIR's lock from before it writes there to the end
        return _run(model, model_name, input_path, out, fmt, settings, encode, overwrite, progress, log, rank, world,
                    held)


def _cut_and_prompt(model, truncate_dim, prompt, prompt_name) -> tuple:
    """(truncate_dim or None for the whole embedding, the prompt's text) of this run, or a CorpusError naming the
    flag: encode's settings, decided once, so that the manifest says what was done."""
    from minilm.model import check_truncate_dim

    truncate_dim = model.truncate_dim if truncate_dim is None else truncate_dim
    try:
        truncate_dim = None if truncate_dim is None else check_truncate_dim(truncate_dim, model.embedding_dim)
    except ValueError as error:
        raise CorpusError(f"--truncate-dim {truncate_dim}: {error}") from None
    try:
        return truncate_dim, model.resolve_prompt(prompt, prompt_name, "document")
    except ValueError as error:
        named = f"--prompt-name {prompt_name!r}: " if prompt_name is not None else ""
        raise CorpusError(f"{named}{error}") from None


def _run(model, model_name, input_path, out, fmt, settings, encode, overwrite, progress, log, rank, world,
         held) -> dict:
    result = None
    if rank == 0:
        try:
            result = _prepare(model, model_name, input_path, out, fmt, settings, encode, overwrite, log, held)
        except CorpusError as error:
            result = error
        except OSError as error:
            result = CorpusError(f"{error.filename or out}: {error.strerror or error} (preparing {out}; nothing "
                                 "was encoded yet)")
    result = _broadcast(result, rank, world)
    if isinstance(result, CorpusError):
        raise result
    manifest = result
    if manifest["state"] == "finished":
        return manifest
    if rank != 0 and manifest["settings"]["model_fingerprint"] != settings["model_fingerprint"]:
        raise CorpusError(f"rank {rank}: its --model is not the one rank 0 loaded (fingerprints differ)")
    encode = {**encode, "precision": manifest["precision"]}  # rank 0's: an "auto" probed per process may differ
    _encode_windows(model, manifest, out, rank, world, encode, progress and rank == 0)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        done = np.fromfile(out / "done.bin", dtype=np.uint8)
        if not done.all():  # only if a rank skipped a window: a bug, never silently a hole
            raise CorpusError(f"{out}: windows {np.flatnonzero(done == 0)[:5].tolist()} were not written; rerun")
        manifest["state"] = "finished"
        folder.write_json(out / "manifest.json", manifest)
        (out / "done.bin").unlink()
        (out / LOCK).unlink()  # held until the end of _run: a process that locks it after that sees it is gone
    if world > 1:
        dist.barrier()
    return manifest


def _prepare(model, model_name, input_path, out, fmt, settings, encode, overwrite, log, held) -> dict:
    """Rank 0: check DIR against this run (refusing, or finding it finished, changes nothing); then, holding DIR's
    lock, resume it or, for a new run, validate INPUT and lay out all files."""
    manifest = folder.read_manifest(out)
    reader = Reader(input_path, fmt, settings["field"], settings["id_field"])
    settings["input_format"] = reader.format
    resume = manifest is not None and not overwrite and manifest["state"] != "preparing"  # preparing: nothing encoded
    if resume:
        sha = file_sha256(input_path)
        differences = _differences(manifest, settings, sha)
        if differences:
            raise CorpusError(f"--out {out} was encoded with other settings or input ({differences}); use another "
                              "--out, or --overwrite to start again")
        folder.check_files(out, manifest)
        if manifest["state"] == "finished":
            log(f"{out} is finished ({manifest['count']} texts, {manifest['storage']}): nothing to do "
                "(--overwrite encodes it again)")
            return manifest
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    had_lock = (out / LOCK).exists()
    held.enter_context(folder.lock(out))
    if folder.read_manifest(out) != manifest:
        raise CorpusError(f"--out {out} changed while this command started (another encode into it?); run it "
                          "again")
    if resume:
        return manifest
    folder.remove_ours(out)
    try:
        return _lay_out(model, model_name, input_path, out, reader, settings, encode, log)
    except (Exception, KeyboardInterrupt):
        # Nothing was encoded yet and every file here is this run's: leave DIR as it was found (bad input, a
        # full disk or Ctrl-C while preparing), so that it never blocks another command.
        folder.remove_ours(out)
        if not had_lock:
            (out / LOCK).unlink()
        if created:
            out.rmdir()
        raise


def _lay_out(model, model_name, input_path, out, reader, settings, encode, log) -> dict:
    """A new run: validate INPUT in one pass, write ids.txt, offsets.npy, an empty embeddings.npy, done.bin."""
    manifest = {"format": FORMAT, "state": "preparing", "model": model_name, "settings": settings}
    folder.write_json(out / "manifest.json", manifest)  # first: from now on DIR's files are known to be minilm's

    # One pass over INPUT: validate every record (bad input fails here, before any encoding), write the ids and
    # the record offsets, keep the calibration sample. Offsets go raw to a scratch file: the count is unknown.
    count, empty, sample, id_hashes = 0, 0, [], array.array("Q")
    want_sample = settings["calibration_size"] if settings["storage"] == "int8" else 0
    scratch = out / ("done.bin" + PARTIAL)
    with open(out / ("ids.txt" + PARTIAL), "w", encoding="utf-8", newline="\n") as ids, open(scratch, "wb") as raw:
        block = []
        for offset, line_number, text, record_id in reader.records():
            if record_id is not None:  # 8 bytes a record, to find repeated ids after the pass (_repeated_ids)
                id_hashes.append(int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "little"))
            record_id = str(line_number) if record_id is None else record_id
            if not record_id or "\n" in record_id or "\r" in record_id:  # U+2028 & co. are text in a line
                raise CorpusError(f"{input_path} line {line_number}: id {record_id!r} is empty or holds a line "
                                  "break; ids.txt holds one id per line")
            ids.write(record_id + "\n")
            block.append(offset)
            if len(block) == 65536:
                raw.write(np.asarray(block, dtype="<i8").tobytes())
                block = []
            count += 1
            empty += not text.strip()
            if len(sample) < want_sample:
                sample.append(text)
        raw.write(np.asarray(block, dtype="<i8").tobytes())
    if count == 0:
        raise CorpusError(f"{input_path} holds no records")
    with open(out / ("offsets.npy" + PARTIAL), "wb") as target, open(scratch, "rb") as source:
        np.lib.format.write_array_header_1_0(target, {"descr": "<i8", "fortran_order": False, "shape": (count,)})
        while chunk := source.read(1 << 20):
            target.write(chunk)
    sha = file_sha256(input_path)
    _crash("prepare")

    calibration = None
    if settings["storage"] == "int8":
        calibration = calibrate_int8(model.encode(sample, **encode))
    dim = settings["truncate_dim"] or model.embedding_dim
    columns = (dim + 7) // 8 if settings["storage"] == "binary" else dim
    embeddings = np.lib.format.open_memmap(out / ("embeddings.npy" + PARTIAL), mode="w+",
                                           dtype=STORAGES[settings["storage"]], shape=(count, columns))
    del embeddings  # a sparse file of the full size: each window's rows are written into it
    windows = (count + settings["window"] - 1) // settings["window"]
    scratch.write_bytes(bytes(windows))
    for name in ("ids.txt", "offsets.npy", "embeddings.npy", "done.bin"):
        path = out / (name + PARTIAL)
        with open(path, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(path, out / name)
    stat = input_path.stat()
    manifest.update(state="encoding", count=count, dim=dim, storage=settings["storage"], shape=[count, columns],
                    normalize=settings["normalize"], precision=settings["precision"], calibration=calibration,
                    empty_texts=empty, windows=windows,
                    input={"path": str(input_path), "format": reader.format, "size": stat.st_size,
                           "mtime_ns": stat.st_mtime_ns, "sha256": sha})
    folder.write_json(out / "manifest.json", manifest)  # last: the DIR is laid out
    if empty:
        log(f"note: {empty} of {count} texts in {input_path} are empty or blank; they are kept (embedded as "
            "the empty text) so that rows stay aligned with the input")
    repeated = _repeated_ids(reader, id_hashes)
    if repeated:
        (first, lines), more = repeated[0], len(repeated) - 1
        log(f"note: id {first!r} is on lines {', '.join(map(str, lines[:5]))} of {input_path}"
            + (f", and {more} more id(s) repeat" if more else "") + "; all rows are kept, but a search hit names "
            "its row by id, so rows that share an id cannot be told apart by it (chunks of one document may "
            "mean to)")
    return manifest


def _repeated_ids(reader, id_hashes: array.array) -> list:
    """[(id, [line numbers])] of the ids that occur more than once, in the order of their first line. The pass
    kept 8-byte hashes only (a set of the ids themselves could outgrow memory on a large corpus); a second pass
    reads the candidates' real ids, so a hash collision reports nothing."""
    hashes = np.frombuffer(id_hashes, dtype=np.uint64) if len(id_hashes) else np.zeros(0, dtype=np.uint64)
    ordered = np.sort(hashes)
    candidates = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not candidates:
        return []
    lines = {}
    for (_, line_number, _, record_id), hashed in zip(reader.records(), hashes.tolist()):
        if hashed in candidates:
            lines.setdefault(record_id, []).append(line_number)
    return [(record_id, found) for record_id, found in lines.items() if len(found) > 1]

def _encode_windows(model, manifest, out, rank, world, encode, progress) -> None:
    """Encode this process's share of the windows not yet done; each is marked done once its rows are on disk."""
    window, count, storage = manifest["settings"]["window"], manifest["count"], manifest["storage"]
    done = np.fromfile(out / "done.bin", dtype=np.uint8)
    remaining = np.flatnonzero(done == 0)
    mine = remaining[rank::world]  # every rank read the same done.bin: they agree on the split
    offsets = np.load(out / "offsets.npy", mmap_mode="r")
    header = np.load(out / "embeddings.npy", mmap_mode="r").offset
    row_bytes = manifest["shape"][1] * np.dtype(STORAGES[storage]).itemsize
    reader = Reader(manifest["input"]["path"], manifest["input"]["format"], manifest["settings"]["field"],
                    manifest["settings"]["id_field"])
    bar = None
    if progress:
        from tqdm import tqdm

        sizes = np.minimum(window, count - np.arange(len(done)) * window)  # texts per window
        finished = lambda marks: int(sizes[marks.astype(bool)].sum())  # noqa: E731
        bar = tqdm(total=count, initial=finished(done), unit="text", unit_scale=True, dynamic_ncols=True,
                   desc=f"encode {out.name}" + (f" ({world} processes)" if world > 1 else ""), smoothing=0.1)
    start, tokens = time.perf_counter(), 0
    # Written in place, never through a symbolic link into a file elsewhere (corpus_folder refuses links too).
    embeddings_fd = os.open(out / "embeddings.npy", os.O_WRONLY | os.O_NOFOLLOW)
    done_fd = os.open(out / "done.bin", os.O_WRONLY | os.O_NOFOLLOW)
    try:
        for w in map(int, mine):
            first = w * window
            texts = reader.read(int(offsets[first]), min(window, count - first))
            rows = model.encode(texts, **encode)  # [n, dim] float32, in the window's order
            if storage == "int8":
                rows = quantize_int8(rows, manifest["calibration"])
            elif storage == "binary":
                rows = pack_binary(rows)
            data = np.ascontiguousarray(rows.astype(STORAGES[storage], copy=False)).tobytes()
            if CRASH.startswith("rows"):
                _pwrite(embeddings_fd, data[:len(data) // 2], header + first * row_bytes)
                _crash("rows", w)
            _pwrite(embeddings_fd, data, header + first * row_bytes)
            os.fsync(embeddings_fd)  # the rows are on disk before the window is marked done
            _crash("flushed", w)
            _pwrite(done_fd, b"\x01", w)
            os.fsync(done_fd)
            _crash("marked", w)
            if bar is not None:
                # Estimated from every 50th text: tokenizing the whole window again would cost ~4% of encoding.
                sample = texts[::50]
                tokens += sum(map(len, model.tokenizer.encode_ids(sample))) * len(texts) / len(sample)
                before = bar.n
                bar.update(finished(np.fromfile(out / "done.bin", dtype=np.uint8)) - before)
                # tokens/s over all processes, from this one's tokens per text
                rate = tokens / max(time.perf_counter() - start, 1e-9) * world
                bar.set_postfix_str(f"~{rate:,.0f} tokens/s", refresh=False)
    except OSError as error:
        raise CorpusError(f"cannot write {out}: {error.strerror or error}; nothing is lost: rerun the same "
                          "command to continue from the windows not yet written") from None
    finally:
        os.close(embeddings_fd)
        os.close(done_fd)
        if bar is not None:
            bar.close()


# --- reading a corpus back ------------------------------------------------------------------------------------
class Corpus:
    """A finished DIR: embeddings (memory-mapped), ids, texts read back from INPUT by offset, and search. DIR's
    manifest and files are checked against each other when it is opened (CorpusError naming file and field)."""

    def __init__(self, out):
        self.dir = Path(out)
        if not self.dir.is_dir():
            found = "is a file, not the folder" if self.dir.exists() else "no such folder"  # INPUT given for DIR
            raise CorpusError(f"{self.dir}: {found} (a DIR written by python -m minilm encode --out DIR)")
        if not (self.dir / "manifest.json").is_file():
            raise CorpusError(f"{self.dir}: no manifest.json; not a corpus made by python -m minilm encode")
        self.manifest = folder.read_manifest(self.dir, writing=False)
        if self.manifest["state"] != "finished":
            raise CorpusError(f"{self.dir} is not finished ({self.manifest['state']}): rerun its encode command "
                              "to continue")
        self.embeddings, self.offsets = folder.check_files(self.dir, self.manifest)
        self._same_bytes = None  # (INPUT's mtime_ns, whether its sha256 matched) once INPUT was hashed

    def _rows(self, rows) -> list:
        """rows as ints, each checked to be a row of DIR: IndexError naming the first that is not (a -1 read the
        last text but no id, a float row was cut to an int)."""
        count, rows = self.manifest["count"], np.asarray(rows).tolist()  # numbers of numpy or torch: Python's
        bad = [row for row in rows if type(row) is not int or not 0 <= row < count]
        if bad:
            raise IndexError(f"row {bad[0]!r}: {self.dir} holds rows 0 to {count - 1} (a list of whole numbers)")
        return rows

    def ids(self, rows) -> list:
        """ids of `rows` (whole numbers from 0 to count - 1, e.g. a row of search's indices; IndexError else)."""
        rows = self._rows(rows)
        wanted, found = set(rows), {}
        with open(self.dir / "ids.txt", "rb") as file:  # one pass, for a handful of rows (as many lines as rows)
            for row, line in enumerate(file):
                if row in wanted:
                    try:
                        found[row] = line.decode("utf-8").rstrip("\n")
                    except UnicodeDecodeError as error:
                        raise CorpusError(f"{self.dir / 'ids.txt'} line {row + 1}: not UTF-8 ({error.reason}); "
                                          "damaged: --overwrite encodes DIR again") from None
                    if len(found) == len(wanted):
                        break
        return [found[row] for row in rows]

    def texts(self, rows) -> list:
        """Texts of `rows` (as for ids), read from INPUT at the recorded offsets; None if INPUT changed since
        encoding."""
        info, rows = self.manifest["input"], self._rows(rows)
        path = Path(info["path"])
        if not self.input_unchanged():
            return [None] * len(rows)
        reader = Reader(path, info["format"], self.manifest["settings"]["field"], self.manifest["settings"]["id_field"])
        texts = []
        for row in rows:
            record = next(reader.records(int(self.offsets[int(row)])), None)
            if record is None:
                raise CorpusError(f"{self.dir / 'offsets.npy'} row {int(row)}: no record of {path} at byte "
                                  f"{int(self.offsets[int(row)])}; damaged: --overwrite encodes DIR again")
            texts.append(record[2])
        return texts

    def input_unchanged(self) -> bool:
        """Whether INPUT still holds the bytes that were encoded. Size and mtime decide when they agree; a new mtime
        alone (touch, a copy that drops timestamps) is checked against the stored sha256, once per Corpus."""
        info = self.manifest["input"]
        path = Path(info["path"])
        if not path.is_file():
            return False
        stat = path.stat()
        if stat.st_size != info["size"]:
            return False
        if stat.st_mtime_ns == info["mtime_ns"]:
            return True
        if self._same_bytes is None or self._same_bytes[0] != stat.st_mtime_ns:
            self._same_bytes = (stat.st_mtime_ns, file_sha256(path) == info["sha256"])
        return self._same_bytes[1]

    def search(self, query_embeddings, top_k: int = 10, rescore=None):
        """minilm.search over this corpus: query_embeddings [num_queries, dim] or one query [dim], of the
        corpus's size (manifest dim: the model's, or settings.truncate_dim), else a CorpusError saying so."""
        from minilm.similarity_search import search

        size = np.shape(query_embeddings)[-1] if np.ndim(query_embeddings) else None
        if size != self.manifest["dim"]:
            cut = self.manifest["settings"]["truncate_dim"]
            raise CorpusError(f"queries of {size} dimensions; {self.dir} holds {self.manifest['dim']}-d embeddings"
                              + (f" (encoded with truncate_dim {cut}: encode the queries with it too)" if cut else ""))
        return search(query_embeddings, self.embeddings, top_k=top_k, calibration=self.manifest["calibration"],
                      rescore=rescore)
