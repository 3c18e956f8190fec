"""Fine-tune a sentence-embedding model: one readable loop, configured by flags and optionally a recipe file.

    python train.py --loss cosine --data cosine.tsv --batch-size 16 --epochs 1 --lr 5e-5 --out runs/cosine
    python train.py --recipe recipes/002_binary_cosine.json --data ../shared/data/stsb --out runs/002
    python train.py --out runs/cosine --resume          # continue exactly where a stopped run left off

--data takes a TSV/CSV (header) or JSONL file with sentence-transformers' column names (anchor, positive
[, negative...] | sentence1, sentence2, score | premise, hypothesis, label), or a local benchmark: the STS-B
directory (../shared/data/stsb) or SICK.tsv. Several --data give round-robin batches, one dataset per batch.
Each loss declares the columns it reads and the scores or labels it accepts (losses/); every row is
checked before training starts. Scores on another scale (STS's 0..5) need --score-scale 5.
A recipe is a JSON file of flag values (recipes/), checked exactly as the flags are; flags on the command line win.

Under torchrun (`torchrun --nproc_per_node=N train.py ...`) each process trains on its share of every global
batch of N x --batch-size rows; gradients are averaged across processes (DDP; nccl on CUDA, gloo on CPU), and
only rank 0 logs, evaluates, checkpoints and saves. Add --loss-params '{"gather_across_devices": true}' so that
in-batch-negative losses score each anchor against the positives of the whole global batch.

The run folder gets the model in sentence-transformers' layout, README.md (model card), log.jsonl (every logged
step and evaluation), loss.png (with matplotlib), checkpoints/step-N (for --resume) and minilm-run.json, the list
of the files the run wrote. A run writes only into a new or empty folder; --overwrite replaces a previous minilm
run (and nothing else) once the new run has succeeded. Ctrl-C (or SIGTERM) finishes the current step, writes a
checkpoint and says how to resume.
"""

import argparse
import contextlib
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import minilm
from minilm import data, evaluation, fast_paths, model_card
from minilm.errors import InputError
from losses import LOSSES
from losses.params import check_params
from minilm.model import resolve_device
from minilm.run_folder import (RunFolderError, check_output, create_run_folder, finish_run_folder, folder_lock,
                               remove_failed_run, save_started)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CHECKPOINT = "state.pt"  # checkpoints/step-N/state.pt: everything to resume (rank r > 0: rng-rank{r}.pt beside)
# Flags that may change on --resume: they say how a run is watched and when it stops, not what a step computes.
SAFE_ON_RESUME = ("max_steps", "epochs", "log_steps", "eval_steps", "save_steps", "save_total_limit",
                  "no_progress", "device")
RECIPE_NOTES = ("description", "seed_card")  # recipe keys that document, not configure


class UsageError(Exception):
    """A problem with the flags, the files or the folders: one line for the user, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# --- flags -----------------------------------------------------------------------------------------------------

def _number(kind, low=None, above=None, below=None, what=""):
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or (low is not None and value < low) \
                or (above is not None and value <= above) or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = _number(int, low=1, what="a whole number >= 1")
non_negative_int = _number(int, low=0, what="a whole number >= 0")
positive_float = _number(float, above=0, what="a number > 0")
non_negative_float = _number(float, low=0, what="a number >= 0")
fraction = _number(float, low=0, below=1, what="a number in 0..1 (1 excluded)")
any_float = _number(float, what="a number")


def json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object like \'{{"scale": 20}}\', got {text!r}')
    return value


def build_parser(explicit_only: bool = False) -> Parser:
    """train.py's flags. explicit_only: no defaults, so that parsing tells which flags were given."""
    parser = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(*names, default=None, **kwargs):
        if default not in (None, False, {}) and "default" not in kwargs.get("help", ""):
            kwargs["help"] = (kwargs.get("help", "") + " (default: %(default)s)").lstrip()  # --help shows it
        parser.add_argument(*names, default=argparse.SUPPRESS if explicit_only else default, **kwargs)

    add("--recipe", help="JSON file of flag values (see recipes/); command-line flags win")
    add("--model", default=DEFAULT_MODEL, help="base model: directory or hub id (default: %(default)s)")
    add("--loss", choices=sorted(LOSSES), help="training objective (required here or in the recipe)")
    add("--loss-params", type=json_object, default={}, help='loss parameters as JSON, e.g. \'{"scale": 20}\'')
    add("--data", nargs="+", help="training data file(s) or benchmark location(s)")
    add("--split", default="train", help="split for benchmark data (default: train)")
    add("--multi-dataset", choices=sorted(data.MULTI_DATASET), default="proportional",
        help="with several --data: proportional = every batch of every dataset each epoch, interleaved at random; "
             "round_robin = one batch of each in turn until the smallest runs out (sentence-transformers' two "
             "samplers)")
    add("--score-scale", type=positive_float, default=1.0,
        help="divide every score of the data by this: 5 for STS-style 0..5 scores (default: 1). The benchmark "
             "loaders (the stsb folder, SICK.tsv) give 0..1 already")
    add("--min-score", type=any_float, default=0.8,
        help="for losses without labels on scored pairs: keep pairs scoring at least this (default 0.8)")
    add("--out", help="output folder: new or empty (or a previous minilm run with --overwrite / --resume)")
    add("--overwrite", action="store_true",
        help="replace a previous minilm run in --out, once this run has succeeded (other files: refused)")
    add("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add("--batch-size", type=positive_int, default=32, help="rows per batch (per process under torchrun)")
    add("--epochs", type=positive_float, default=1, help="passes over the data (ignored when --max-steps is set)")
    add("--max-steps", type=non_negative_int, default=0, help="optimizer steps to run; 0: as many as --epochs gives")
    add("--lr", type=positive_float, default=5e-5, help="peak learning rate (AdamW, linear decay)")
    add("--weight-decay", type=non_negative_float, default=0.0, help="AdamW's decoupled weight decay")
    add("--warmup-ratio", type=fraction, default=0.0, help="fraction of steps with a linear warm-up")
    add("--warmup-steps", type=non_negative_int, default=0, help="warm-up steps (overrides --warmup-ratio)")
    add("--max-grad-norm", type=positive_float, default=1.0, help="clip the model's gradient norm to this")
    add("--grad-accum", type=positive_int, default=1, help="batches per optimizer step")
    add("--seed", type=int, default=42, help="seed of the shuffling, dropout and any new weights")
    add("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="autocast precision; auto: bf16 on CUDA when supported, else fp32")
    add("--max-seq-length", type=positive_int, help="truncate inputs to this many tokens (default: the model's)")
    add("--normalize", choices=["keep", "yes", "no"], default="keep", help="add/remove the Normalize module")
    add("--eval-task", choices=evaluation.TASKS, help="evaluation during and after training")
    add("--eval-data", help="data for --eval-task (default: the first --data)")
    add("--eval-split", default="dev", help="split of the --eval-data (SICK: dev is its trial split)")
    add("--eval-steps", type=non_negative_int, default=0, help="evaluate every N steps (0: only at the end)")
    add("--log-steps", type=positive_int, default=50, help="log the mean loss every N steps")
    add("--save-steps", type=non_negative_int, default=500, help="checkpoint every N steps (0: never)")
    add("--save-total-limit", type=positive_int, default=2, help="checkpoints kept (oldest removed)")
    add("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    add("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def recipe_values(path: str, parser: Parser) -> dict:
    """A recipe's values, each parsed and checked by the flag it stands for (one error names file and key)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as error:
        raise UsageError(f"--recipe {path}: cannot read it ({error.strerror})") from None
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--recipe {path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"--recipe {path}: expected a JSON object of flag values, got {type(recipe).__name__}")
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    values = {}
    for key, value in recipe.items():
        action = actions.get(key)
        if key in RECIPE_NOTES:
            continue
        if action is None or key in ("recipe", "resume", "help"):
            raise UsageError(f"--recipe {path}: unknown key {key!r}; keys are flag names with _ for -: "
                             f"{', '.join(sorted(set(actions) - {'recipe', 'resume', 'help'}))}")
        flag = action.option_strings[0]
        if action.nargs == 0:  # on/off flags
            if not isinstance(value, bool):
                raise UsageError(f"--recipe {path}: {key!r} is {json.dumps(value)}, expected true or false")
            argv = [flag] if value else []
        elif value is None:
            continue
        elif action.nargs == "+":
            items = value if isinstance(value, list) else [value]
            if not items or not all(isinstance(item, str) for item in items):
                raise UsageError(f"--recipe {path}: {key!r} is {json.dumps(value)}, expected a string or a list "
                                 "of strings")
            argv = [flag, *items]
        elif isinstance(value, dict):
            argv = [flag, json.dumps(value)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv = [flag, str(value)]
        else:
            raise UsageError(f"--recipe {path}: {key!r} is {json.dumps(value)}, expected a string or a number")
        try:
            parsed = parser.parse_args(argv)
        except UsageError as error:
            raise UsageError(f"--recipe {path}: {key!r}: {error}") from None
        values[key] = getattr(parsed, key)
    return values


def parse_args(argv=None) -> tuple:
    """-> (args, the names of the flags given on the command line or in the recipe)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(build_parser(explicit_only=True).parse_args(argv))
    if args.recipe:
        if args.resume:
            raise UsageError("--recipe with --resume: a resumed run keeps its own settings; give only --out "
                             "and --resume (and flags that may change, such as --max-steps)")
        given = {**recipe_values(args.recipe, parser), **given}
        args = argparse.Namespace(**{**vars(args), **given})
    given.pop("recipe", None)
    return args, given


def check_args(args, world: int = 1) -> None:
    """Checks across flags (each flag's own values were checked by its type); recipe values come here too."""
    if not args.out:
        raise UsageError("--out is required: the folder the run writes into")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite together: --resume continues the run in --out, --overwrite "
                         "starts a new one there; choose one")
    missing = [flag for flag, value in (("--loss", args.loss), ("--data", args.data)) if not value]
    if missing:
        recipe = getattr(args, "recipe", None)
        raise UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (here or in "
                         + (f"the --recipe {recipe})" if recipe else "a --recipe)"))
    try:
        fast_paths.check_environment()
    except InputError as error:
        raise UsageError(str(error)) from None
    loss_class = LOSSES[args.loss]
    try:  # the loss's own arguments, by name and value, before anything is loaded
        inspect.signature(loss_class).bind(None, **args.loss_params)
    except TypeError:
        names = [name for name in inspect.signature(loss_class).parameters if name != "model"]
        raise UsageError(f"--loss-params {json.dumps(args.loss_params)}: the {args.loss} loss takes "
                         f"{', '.join(names) or 'no parameters'}") from None
    try:
        check_params(args.loss_params)
    except ValueError as error:
        raise UsageError(f"--loss-params {json.dumps(args.loss_params)}: {error}") from None
    if loss_class.in_batch_negatives and args.batch_size * world < 2:
        raise UsageError(f"--batch-size {args.batch_size}: the {args.loss} loss scores each row against the other "
                         "rows of its batch, so a batch needs at least 2 rows")
    if args.device is not None:
        try:
            device = resolve_device(args.device)
        except InputError as error:
            raise UsageError(f"--device {args.device}: {error}") from None
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {args.device}: train.py runs on cpu or cuda")
    if args.precision == "fp16" and (args.device or "cpu").startswith("cpu") and not torch.cuda.is_available():
        raise UsageError("--precision fp16: float16 training needs CUDA; use bf16 or fp32 on the CPU")


# --- data ------------------------------------------------------------------------------------------------------

def load_training_rows(location: str, split: str, num_labels=None) -> tuple:
    """-> (rows, the line of each row or None, the file read)."""
    path = Path(location)
    if path.is_dir():
        if (path / f"{split}.tsv").is_file():
            return data.load_stsb(path, split), None, path / f"{split}.tsv"
        if (path / "corpus.jsonl").is_file():  # BEIR layout: (query, relevant document) pairs of the split's qrels
            return evaluation.beir_pairs(path, split), None, path / "qrels" / f"{split}.tsv"
        raise data.DataError(f"{path}: a folder without {split}.tsv or corpus.jsonl; --data takes a TSV/CSV/JSONL "
                             "file, the STS-B folder or a BEIR folder")
    if data.is_snli(path):
        return data.load_snli(path), None, path
    if path.is_file() and path.name.lower().startswith("sick"):
        return data.load_sick(path, split), None, path
    dataset = data.read_dataset(path, num_labels=num_labels)
    return dataset.rows, dataset.lines, path


def fingerprint(path: Path) -> dict:
    """Size and SHA-256 of a data file: --resume refuses data that changed."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


# What the checks noticed but allow (rows dropped by --min-score, empty texts): said once everything is checked,
# just before training starts, so that an error is still the only line when there is one.
NOTES = []


def columns_for_loss(rows: list, loss_class, min_score: float, source: str):
    """Pick the columns a loss reads, from its declarations (losses/__init__.py). -> (rows, text
    columns, label column or None). A loss without labels takes scored pairs scoring at least min_score."""
    columns = set(rows[0]) if rows else set()
    label_column = {"score": "score", "class": "label", None: None}[loss_class.label]
    if loss_class.label is None and "label" in columns and "score" not in columns:
        # NLI (entailment/neutral/contradiction) or binary (0/1) rows: a loss without labels would take every row,
        # contradictions and non-duplicates too, as a pair to pull together. (Rows that also have a score, such as
        # SICK's, are chosen by --min-score below.)
        labels = sorted({row["label"] for row in rows})
        raise data.DataError(f"{source}: its rows carry a label column (labels {labels[:6]}), and the "
                             f"{loss_class.__name__} loss reads none: it would learn every pair as a match, "
                             "contradictions and non-matches too. Keep only the matching pairs in the file (e.g. "
                             "entailment, or label 1) and drop the label column, or train --loss softmax")
    prefix = loss_class.extra_text_columns
    for layout in loss_class.text_columns:
        if set(layout) <= columns and (label_column is None or label_column in columns):
            extra = sorted(c for c in columns if prefix and c.startswith(prefix) and c not in layout)
            return rows, [*layout, *extra], label_column
    if loss_class.label is None:
        first, second = loss_class.text_columns[0][:2]
        for a, b in (("sentence1", "sentence2"), ("premise", "hypothesis")):
            if {a, b} <= columns:
                scores = [r["score"] for r in rows if "score" in r]
                if scores and max(scores) > 1:  # --min-score is on the 0..1 scale of the loaders and --score-scale
                    raise data.DataError(f"{source}: scores run up to {max(scores):g}, and --min-score {min_score} "
                                         "chooses the pairs to learn from on a 0..1 scale; for data scored 0..5 "
                                         "add --score-scale 5")
                kept = [r for r in rows if "score" not in r or r["score"] >= min_score]
                if scores and len(kept) < len(rows):
                    NOTES.append(f"{source}: {len(kept)} of {len(rows)} pairs score at least --min-score "
                                 f"{min_score}; the {loss_class.__name__} loss learns from those only")
                if rows and not kept:
                    scores = [r["score"] for r in rows]
                    raise data.DataError(f"{source}: no pair scores at least --min-score {min_score} (scores run "
                                         f"{min(scores):g}..{max(scores):g}); lower --min-score")
                return [{first: r[a], second: r[b]} for r in kept], [first, second], None
    wanted = " or ".join(", ".join(layout + ((label_column,) if label_column else ()))
                         for layout in loss_class.text_columns)
    raise data.DataError(f"{source}: columns {sorted(columns)} do not fit the {loss_class.__name__} loss, which "
                         f"reads {wanted}")


def check_labels(rows, lines, loss_class, loss_name: str, source) -> None:
    """Scores inside the loss's range (after --score-scale), with the line of the first one outside."""
    if loss_class.label != "score" or loss_class.score_range is None:
        return
    low, high = loss_class.score_range
    for index, row in enumerate(rows):
        if not low <= row["score"] <= high:
            where = f"{source}:{lines[index]}" if lines else f"{source}, row {index + 1}"
            raise data.DataError(f"{where}: score {row['score']:g} is outside {low:g}..{high:g}, the range of the "
                                 f"{loss_name} loss; scores on a 0..5 scale need --score-scale 5")


def prepare_data(args, loss_class) -> tuple:
    """Read and check every dataset. -> ([(location, rows, text columns, label column)], [fingerprint])."""
    num_labels = loss_class.num_classes(args.loss_params) if loss_class.label == "class" else None
    datasets, fingerprints = [], []
    for location in args.data:
        rows, lines, file = load_training_rows(location, args.split, num_labels)
        if not rows:
            raise data.DataError(f"{location}: no training rows in split {args.split!r}")
        if args.score_scale != 1:
            for row in rows:
                if "score" in row:
                    row["score"] /= args.score_scale
        rows, text_columns, label_column = columns_for_loss(rows, loss_class, args.min_score, location)
        check_labels(rows, lines, loss_class, args.loss, file)
        if loss_class.label == "class":  # files are checked as they are read; the benchmark loaders here
            largest = max(row[label_column] for row in rows)
            if largest >= num_labels:
                raise data.DataError(f"{location}: label {largest} is outside 0..{num_labels - 1}, the labels of "
                                     f"the {args.loss} loss (set num_labels in --loss-params)")
        empty = sum(1 for row in rows if any(not row[column].strip() for column in text_columns))
        if empty:  # trained on as they are, as the reference does
            NOTES.append(f"{location}: {empty} of {len(rows)} rows have an empty or blank text; they train as the "
                         "empty text")
        datasets.append((location, rows, text_columns, label_column))
        fingerprints.append(fingerprint(Path(file)))
    return datasets, fingerprints


def make_batches(datasets, loss_class, loss_params: dict, batch_size: int, seed: int,
                 drop_last: bool, multi_dataset: str = "proportional") -> data.RoundRobinBatches:
    """One sampler per dataset, as the loss declares: for in-batch negatives, batches of 2 rows or more, without
    repeated texts where the loss does not mask duplicates itself; plain shuffled batches otherwise; always
    (dataset index, row indices). Several datasets are interleaved as --multi-dataset says (data.MULTI_DATASET)."""
    samplers = []
    for _, rows, columns, _ in datasets:
        if loss_class.in_batch_negatives and loss_class.needs_unique_texts(loss_params):
            samplers.append(data.NoDuplicatesBatchSampler(rows, batch_size, seed=seed, drop_last=drop_last,
                                                          columns=columns, min_size=2))
        else:
            min_size = 2 if loss_class.in_batch_negatives else 1
            samplers.append(data.RandomBatchSampler(rows, batch_size, seed=seed, drop_last=drop_last,
                                                    min_size=min_size))
    if multi_dataset == "round_robin":
        return data.RoundRobinBatches(samplers)
    return data.ProportionalBatches(samplers, seed)


# --- checkpoints -----------------------------------------------------------------------------------------------

def random_state() -> dict:
    """The random states as tensors and lists, so that a checkpoint loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_random_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, position, has_gauss, cached = saved["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def own_state(loss_fn) -> dict:
    """The loss's own weights (SoftmaxLoss's classifier), without the model it wraps."""
    return {key: value for key, value in loss_fn.state_dict().items() if not key.startswith("model.")}


def save_checkpoint(out: Path, checkpoint: dict, limit: int, rank: int) -> Path:
    """Write checkpoints/step-N atomically (written as .partial-N, renamed into place) and prune old ones.
    On failure (a full disk) the partial checkpoint is removed and the earlier ones stay."""
    checkpoints = out / "checkpoints"
    step = checkpoint["state"]["step"]
    final, partial = checkpoints / f"step-{step:07d}", checkpoints / f".partial-{step:07d}"
    try:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        if rank > 0:
            torch.save(random_state(), partial / f"rng-rank{rank}.pt")
        barrier()
        if rank == 0:
            torch.save({**checkpoint, "rng": random_state()}, partial / CHECKPOINT)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in sorted(checkpoints.glob("step-*"))[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(checkpoints).free if checkpoints.exists() else 0
        previous = latest_checkpoint(out)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"writing checkpoint {final} failed ({reason[:120]}; {free / 2**20:.0f} MiB free on that "
                         f"disk): removed the partial checkpoint; "
                         + (f"{previous} is intact: free space, then --resume" if previous
                            else "no earlier checkpoint exists")) from None
    barrier()
    return final


def latest_checkpoint(out: Path):
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


CHECKPOINT_KEYS = {"args", "model", "loss", "optimizer", "scheduler", "scaler", "state", "data", "world", "rng"}


def load_checkpoint(out: Path, rank: int) -> tuple:
    """The newest checkpoint that loads (weights_only: nothing in it can run code); a damaged one is reported
    and the previous one used. -> (folder, checkpoint dict, this rank's random state)."""
    found = sorted((out / "checkpoints").glob("step-*"), reverse=True)
    if not found:
        raise UsageError(f"--out {out}: --resume: no checkpoint in {out / 'checkpoints'} (is --save-steps 0?)")
    problems = []
    for folder in found:
        try:
            checkpoint = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
            if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= set(checkpoint):
                raise ValueError("entries are missing")
            rng = checkpoint["rng"] if rank == 0 else torch.load(folder / f"rng-rank{rank}.pt", weights_only=True)
        except Exception as error:  # any way a file can be damaged or crafted: try the one before
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            if reason.startswith("Weights only load failed"):  # torch's advice about weights_only misleads here
                reason = "not a checkpoint train.py wrote (damaged, or holds objects other than tensors)"
            problems.append(f"{folder / CHECKPOINT}: {reason}")
            continue
        if problems and rank == 0:
            print(f"train.py: {'; '.join(problems)}: cannot be used; resuming from {folder} instead",
                  file=sys.stderr)
        return folder, checkpoint, rng
    raise UsageError(f"--resume: no usable checkpoint in {out / 'checkpoints'}: {'; '.join(problems)}")


PATH_FLAGS = ("data", "model", "eval_data")  # read relative to the folder train.py was started in


def absolute_paths(value, folder: str):
    """A path flag's value (a string, a list of them, or None) with each path that exists relative to `folder`
    made absolute, so that --resume finds the run's files from any folder and takes ../x/data.tsv for
    /y/x/data.tsv; anything else (a hub id) is kept as it is."""
    if isinstance(value, list):
        return [absolute_paths(item, folder) for item in value]
    if value is None or not (Path(folder) / value).exists():
        return value
    return os.path.realpath(Path(folder) / value)


def resume_args(checkpoint: dict, given: dict):
    """The run's own flags, with the flags given now where they may change; others must equal the run's.
    Paths are compared and used as absolute paths: the run's against the folder it was started in."""
    started_in = checkpoint.get("cwd", os.getcwd())  # checkpoints of earlier versions lack it
    saved = {key: absolute_paths(value, started_in) if key in PATH_FLAGS else value
             for key, value in checkpoint["args"].items()}
    for key, value in given.items():
        if key in ("out", "resume") or key in SAFE_ON_RESUME:
            continue
        if key in PATH_FLAGS:
            value = absolute_paths(value, os.getcwd())
        if saved.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {value}: the run being resumed used {saved.get(key)}; --resume continues it "
                             f"unchanged, and only {', '.join('--' + k.replace('_', '-') for k in SAFE_ON_RESUME)} "
                             "may change")
    safe = {key: value for key, value in given.items() if key in SAFE_ON_RESUME}
    return argparse.Namespace(**{**saved, **safe, "resume": True, "overwrite": False, "out": given["out"]})


def check_same_data(saved: list, now: list) -> None:
    for before, after in zip(saved, now):
        if (before["bytes"], before["sha256"]) != (after["bytes"], after["sha256"]):
            raise UsageError(f"--resume: {after['file']} changed since the checkpoint (was {before['bytes']} bytes, "
                             f"sha256 {before['sha256'][:12]}; now {after['bytes']} bytes, sha256 "
                             f"{after['sha256'][:12]}); restore it, or start a new run")


# --- torch.distributed ------------------------------------------------------------------------------------------

def setup_distributed():
    """Join the process group when torchrun started us (WORLD_SIZE > 1). -> (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (itself outside torch.distributed)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on one (a signal may reach the ranks at different steps)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value)
    return bool(value.item())


def parameter_groups(model, loss_fn, weight_decay: float) -> list:
    """AdamW's parameters: the model's and any weights the loss has (SoftmaxLoss's classifier), in two groups as
    the Hugging Face trainer under sentence-transformers makes them: weight decay on weight matrices and
    embeddings, none on biases and LayerNorm weights."""
    loss_weights = [p for name, p in loss_fn.named_parameters() if not name.startswith("model.")]
    no_decay = {id(p) for module in loss_fn.modules() if isinstance(module, torch.nn.LayerNorm)
                for p in module.parameters()}
    no_decay |= {id(p) for name, p in loss_fn.named_parameters() if name.endswith("bias")}
    parameters = list(model.parameters()) + loss_weights
    return [{"params": [p for p in parameters if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in parameters if id(p) in no_decay], "weight_decay": 0.0}]


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Scale the model's gradients so that their total norm is at most max_norm; returns the norm before.

    The model's own weights only, as in sentence-transformers' trainer (transformers' Trainer clips
    `model.parameters()`): a loss's own weights, SoftmaxLoss's new classifier, neither count in the norm nor are
    scaled, so that a run clips exactly when the reference's does."""
    return torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during training: stop without finishing the step."""


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads after each optimizer step; a second signal stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal is not None:
            raise StoppedAtOnce
        self.signal = signal.Signals(number).name
        print(f"\ntrain.py: {self.signal}: finishing this step, then writing a checkpoint (again to stop now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


# --- the run ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    """Run train.py; -> exit status (0, 2 for a problem with the input, 130 when stopped by a signal)."""
    rank = 0
    try:
        args, given = parse_args(argv)
        rank, world = setup_distributed()
        return run(args, given, rank, world)
    except (UsageError, RunFolderError, data.DataError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a disk that fills or a folder that goes away while the run writes
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except StoppedAtOnce:
        print("train.py: stopped at once (a second signal); --resume continues from the newest checkpoint, if "
              "one was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # while loading, before the loop (a new run then keeps nothing: see _run), or after it
        print("train.py: interrupted outside the training steps (a signal there stops at once); run the command "
              "again, or with --out ... --resume where a checkpoint was written", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, given: dict, rank: int, world: int) -> int:
    with contextlib.ExitStack() as held:  # the folder's lock, from the moment this run owns the folder
        return _run(args, given, rank, world, held)


def _run(args, given: dict, rank: int, world: int, held: contextlib.ExitStack) -> int:
    NOTES.clear()
    checkpoint = None
    if args.resume:
        if not args.out:
            raise UsageError("--out is required: the folder of the run to resume")
        if args.overwrite:
            raise UsageError("--resume and --overwrite together: --resume continues the run in --out, "
                             "--overwrite starts a new one there; choose one")
        folder = check_output(args)
        if rank == 0:
            held.enter_context(folder_lock(folder, args.out))
        checkpoint_dir, checkpoint, rng = load_checkpoint(folder, rank)
        args = resume_args(checkpoint, given)
        if checkpoint["world"] != world:
            raise UsageError(f"--resume: the run used {checkpoint['world']} process(es), this is {world}; resume "
                             "with the same torchrun --nproc_per_node")
    check_args(args, world)
    if not args.resume:
        folder = check_output(args)
    barrier()  # every rank has looked at --out before rank 0 creates anything there
    loss_class = LOSSES[args.loss]
    datasets, fingerprints = prepare_data(args, loss_class)
    if checkpoint:
        check_same_data(checkpoint["data"], fingerprints)

    set_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        model = minilm.load(args.model, device=device)
    except Exception as error:  # the loader's messages name the file and field
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--model {args.model}: {reason}") from None
    if args.max_seq_length:
        try:
            model.max_seq_length = args.max_seq_length
        except ValueError as error:
            raise UsageError(f"--max-seq-length {args.max_seq_length}: {error}") from None
    if args.normalize != "keep":
        model.normalize = args.normalize == "yes"
    try:
        loss_fn = loss_class(model, **args.loss_params).to(device)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--loss-params {json.dumps(args.loss_params)}: {error}") from None
    evaluator = None
    if args.eval_task:
        try:
            evaluator = evaluation.for_task(args.eval_task, args.eval_data or args.data[0], args.eval_split,
                                            getattr(loss_fn, "classifier", None))
        except (OSError, ValueError) as error:
            raise UsageError(f"--eval-task {args.eval_task}: {error}") from None
        location = Path(args.eval_data or args.data[0])
        split_of_it = location.is_dir() or (args.eval_task in ("sick", "nli") and not data.is_snli(location))
        if not args.eval_data and not split_of_it:
            NOTES.append(f"--eval-task {args.eval_task} without --eval-data scores the training file {location} "
                         "itself, not held-out data; pass --eval-data for a held-out score")

    # Samplers draw global batches (world x batch size; only full ones under torchrun), each rank takes its slice.
    batches = make_batches(datasets, loss_class, args.loss_params, args.batch_size * world, args.seed,
                           drop_last=world > 1, multi_dataset=getattr(args, "multi_dataset", "round_robin"))
    # (checkpoints of earlier versions have no --multi-dataset: they ran round robin)
    batches_per_epoch = len(batches)
    for location, rows, columns, _ in datasets if loss_class.in_batch_negatives else []:
        if len({tuple(row[column] for column in columns) for row in rows}) < 2:  # masked: nothing to contrast
            raise UsageError(f"--data {location}: gives no batch of 2 different rows for the {args.loss} loss "
                             + ("(it has one row)" if len(rows) == 1 else
                                f"(all {len(rows)} rows are the same texts)"))
    if batches_per_epoch == 0:
        need = f"{args.batch_size * world} rows" if world > 1 else "2 rows with no text twice"
        raise UsageError(f"--data {' '.join(args.data)}: gives no batch of {need} for the {args.loss} loss "
                         f"({sum(len(d[1]) for d in datasets)} rows)")
    if batches_per_epoch < args.grad_accum:
        raise UsageError(f"--grad-accum {args.grad_accum}: an epoch has only {batches_per_epoch} batch(es) of "
                         f"{args.batch_size}; lower --grad-accum or --batch-size")
    steps_per_epoch = batches_per_epoch // args.grad_accum
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    if checkpoint and total_steps < checkpoint["state"]["step"]:
        raise UsageError(f"--max-steps {total_steps}: the run is at step {checkpoint['state']['step']} already")
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)  # rounded up, as the HF trainer does

    if world > 1:
        # The loss calls the wrapped model, so DDP averages the gradients of every backward pass.
        loss_fn.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # AdamW over the model and any weights the loss has (see parameter_groups). The fused kernel updates each
    # tensor in one pass.
    optimizer = torch.optim.AdamW(parameter_groups(model, loss_fn, args.weight_decay), lr=args.lr,
                                  fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step / max(1, warmup) if step < warmup
        else max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # Everything is checked: only now is anything written.
    if rank == 0 and not args.resume:
        staging = folder != Path(args.out)
        created = not folder.exists()
        create_run_folder(folder, Path(args.out) if staging else None)
        # A new run that fails before its first checkpoint leaves no trace: a plain re-run can start again, and an
        # --overwrite retry leaves the old run as it was. (Pushed before the lock: undone after it is released.)
        held.push(lambda failed, *_: failed and latest_checkpoint(folder) is None
                  and remove_failed_run(folder, created or staging))
        held.enter_context(folder_lock(folder, args.out))
    barrier()
    with StopRequest() as stop:
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "train_seconds": 0.0}
        if args.resume:
            try:
                model.load_state_dict(checkpoint["model"])
                loss_fn.load_state_dict({**loss_fn.state_dict(), **checkpoint["loss"]})
                optimizer.load_state_dict(checkpoint["optimizer"])
                scheduler.load_state_dict(checkpoint["scheduler"])
                scaler.load_state_dict(checkpoint["scaler"])
            except (RuntimeError, KeyError, ValueError) as error:
                raise UsageError(f"{checkpoint_dir / CHECKPOINT}: does not fit this model and loss "
                                 f"({str(error).splitlines()[0][:160]})") from None
            restore_random_state(rng)
            state = checkpoint["state"]
            if rank == 0:
                print(f"resuming from {checkpoint_dir} at step {state['step']}")
        # As the run was started: path flags as given, read relative to started_in (see resume_args).
        settings = {**vars(args), **({key: checkpoint["args"][key] for key in PATH_FLAGS} if checkpoint else {})}
        started_in = checkpoint.get("cwd", os.getcwd()) if checkpoint else os.getcwd()
        log_file = None
        if rank == 0:
            # The log holds exactly the entries up to the checkpoint: steps after it are trained again.
            (folder / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in state["history"]))
            log_file = (folder / "log.jsonl").open("a")

        def log(entry: dict) -> None:
            state["history"].append(entry)
            if log_file:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()

        def run_evaluation() -> dict:
            metrics = evaluator(model)
            model.train()
            log({"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4),
                 **{f"eval_{key}": value for key, value in metrics.items()}})
            return metrics

        def checkpoint_now() -> Path:
            state["train_seconds"] = time.perf_counter() - started
            return save_checkpoint(folder, {
                "args": settings, "cwd": started_in, "model": model.state_dict(), "loss": own_state(loss_fn),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "state": state, "data": fingerprints, "world": world},
                args.save_total_limit, rank)

        def stop_on_bad_loss(loss_sum: torch.Tensor, grad_norm) -> None:
            """One host sync: at log steps and before a checkpoint, never per micro-batch."""
            bad_loss = not bool(torch.isfinite(loss_sum))
            bad_grad = grad_norm is not None and not bool(torch.isfinite(grad_norm))
            if any_rank(bad_loss or bad_grad):
                last = latest_checkpoint(folder)
                what = f"loss became {float(loss_sum)}" if bad_loss else f"gradient norm became {float(grad_norm)}"
                raise UsageError(f"the {what} by step {state['step']} (epoch {state['epoch']}); stopping. The last "
                                 f"good checkpoint is {last or 'none (none was written yet)'}. Try a lower --lr, "
                                 "--precision fp32, or check the data.")

        if rank == 0:
            for note in dict.fromkeys(NOTES):
                print(f"train.py: note: {note}", file=sys.stderr)
            print(f"training {args.loss} on {sum(len(d[1]) for d in datasets)} rows: {total_steps} steps of "
                  f"{args.batch_size} x {args.grad_accum} x {world} process(es), {precision}, device {device}")
        progress = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
        model.train()
        # The loss stays on the device between log steps: no host sync per micro-batch.
        # Restored on --resume: the loss logged at the next log step then equals an uninterrupted run's.
        running_loss = torch.tensor(float(state.get("running_loss", 0.0)), device=device)
        running_count = state.get("running_count", 0)
        grad_norm = None
        started = time.perf_counter() - state["train_seconds"]
        finished = state["step"] >= total_steps
        while not finished:
            batches.set_epoch(state["epoch"])
            # An epoch's last batches short of a whole --grad-accum are dropped, not carried into the next step.
            for index, (dataset_index, batch_indices) in enumerate(
                    itertools.islice(batches, steps_per_epoch * args.grad_accum)):
                if index < state["batch_in_epoch"]:
                    continue  # resumed mid-epoch: these batches were trained on already
                batch_indices = batch_indices[rank * args.batch_size:(rank + 1) * args.batch_size]  # this rank's
                _, rows, text_columns, label_column = datasets[dataset_index]
                features, labels = data.collate([rows[i] for i in batch_indices], text_columns, label_column,
                                                model.tokenize)
                features = [minilm.batch_to(f, device) for f in features]
                labels = labels.to(device) if labels is not None else None
                state["batch_in_epoch"] = index + 1
                accumulating = state["batch_in_epoch"] % args.grad_accum != 0
                # Between optimizer steps, DDP need not average gradients: the last micro-batch does it for all.
                no_sync = loss_fn.model.no_sync() if world > 1 and accumulating else contextlib.nullcontext()
                with no_sync:
                    with autocast:
                        loss = loss_fn(features, labels)
                    scaler.scale(loss / args.grad_accum).backward()
                running_loss += loss.detach().float()
                running_count += 1
                if accumulating:
                    continue
                scaler.unscale_(optimizer)
                grad_norm = clip_gradients(model, args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                step = state["step"]
                if progress is not None:
                    progress.update(1)
                if step % args.log_steps == 0 or step == total_steps:
                    mean_loss = global_mean(running_loss / running_count)
                    stop_on_bad_loss(mean_loss, grad_norm)
                    log({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": float(mean_loss),
                         "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                         "seconds": round(time.perf_counter() - started, 2)})
                    if progress is not None:
                        progress.set_postfix(loss=f"{float(mean_loss):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    running_loss, running_count = torch.zeros((), device=device), 0
                if rank == 0 and evaluator and args.eval_steps and step % args.eval_steps == 0 \
                        and step < total_steps:
                    run_evaluation()
                stopping = any_rank(stop.signal is not None) if world > 1 else stop.signal is not None
                if (args.save_steps and step % args.save_steps == 0 and step < total_steps) or \
                        (stopping and step < total_steps):
                    stop_on_bad_loss(running_loss, grad_norm)
                    # every rank's sum so far, averaged: what the next log step averages over the ranks anyway
                    state["running_loss"], state["running_count"] = float(global_mean(running_loss)), running_count
                    saved = checkpoint_now()
                    if stopping:
                        if progress is not None:
                            progress.close()
                        if rank == 0:
                            print(f"train.py: stopped by {stop.signal or 'a signal'} after step {step}; checkpoint "
                                  f"{saved}. Continue with: python train.py --out {folder} --resume",
                                  file=sys.stderr)
                        return 130
                if step >= total_steps:
                    finished = True
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
        if progress is not None:
            progress.close()
        state["train_seconds"] = time.perf_counter() - started
        if rank != 0:
            return 0

        final_metrics = run_evaluation() if evaluator else {}
        try:
            since = save_started(folder)
            model.save(folder)
            if hasattr(loss_fn, "save"):
                loss_fn.save(folder)  # SoftmaxLoss's classifier, for eval.py --task nli
            shown = [(name, *dataset[1:]) for name, dataset in zip(settings["data"], datasets)]  # as given
            model_card.write(folder, settings=settings, model=model, loss_fn=loss_fn, datasets=shown,
                             history=state["history"], metrics=final_metrics,
                             eval_name=evaluator.name if evaluator else None, train_seconds=state["train_seconds"])
            log_file.close()
        except OSError as error:
            raise UsageError(f"saving the model to {folder} failed ({error.strerror or error}); the checkpoints "
                             "stay: free space, then --resume") from None
    final = finish_run_folder(folder, since)
    print(f"saved to {final} after {state['step']} steps in {state['train_seconds']:.0f} s"
          + "".join(f"\n  {key}: {value:.4f}" for key, value in final_metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
