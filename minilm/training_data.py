"""train.py's data: every --data read and checked against the loss before training starts, the batches drawn
from it, the evaluator of --eval-task; and the model the data trains (--layers, --prompts) and, for distillation,
the teacher and its embeddings of the texts.

Each loss declares the columns it reads and the scores or labels it accepts (losses/__init__.py); the loss class
is passed in, so this module needs no loss of its own. Problems are data.DataError: one line naming the file (and
line, where there is one) and what the loss accepts. What the checks notice but allow (pairs left out by
--min-score, empty texts, an evaluation on the training file) comes back as notes (TrainingData.notes), for
train.py to say once everything is checked.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import minilm
from minilm import data, distillation, evaluation, fast_paths
from minilm.distributed import barrier
from minilm.errors import InputError, UsageError, blamed_on


def check_flags(args, loss_class) -> None:
    """The flags that depend on the loss (train.py's; a recipe's and a resumed run's come here too), before
    anything is read: --teacher exactly with a loss that learns a teacher's embeddings (mse), --matryoshka-dims
    with a loss MatryoshkaLoss can wrap (its sizes are checked against the model once it is loaded),
    --matryoshka-weights with --matryoshka-dims, --prompts' columns, --keep-self-matches with --eval-task
    retrieval. A UsageError names the flag."""
    if args.teacher is not None and not args.teacher.strip():  # else taken as no teacher, as if not given
        raise UsageError("--teacher '': expected the teacher model's folder or hub id")
    if loss_class.label == "embedding" and not args.teacher:
        raise UsageError(f"--loss {args.loss} learns a teacher's embeddings: give --teacher MODEL (and --layers to "
                         "build the student from some of --model's layers)")
    if args.teacher and loss_class.label != "embedding":
        raise UsageError(f"--teacher {args.teacher}: the {args.loss} loss learns no teacher's embeddings; "
                         "distillation is --loss mse")
    if args.matryoshka_dims and not loss_class.matryoshka:
        raise UsageError(f"--matryoshka-dims: the {args.loss} loss reads embeddings of one width (its classifier), "
                         "so it cannot be trained at several sizes; choose another --loss")
    if args.matryoshka_weights and not args.matryoshka_dims:
        raise UsageError("--matryoshka-weights needs --matryoshka-dims: one weight per dimension")
    if args.matryoshka_weights and len(args.matryoshka_weights) != len(args.matryoshka_dims):
        raise UsageError(f"--matryoshka-weights {','.join(f'{w:g}' for w in args.matryoshka_weights)}: "
                         f"{len(args.matryoshka_weights)} weight(s) for the {len(args.matryoshka_dims)} sizes of "
                         f"--matryoshka-dims {','.join(map(str, args.matryoshka_dims))}; give one per size")
    if args.keep_self_matches and args.eval_task != "retrieval":
        raise UsageError("--keep-self-matches is for --eval-task retrieval on a BEIR folder")
    with blamed_on("", InputError):  # the message names --prompts
        data.parse_prompts(args.prompts, loss_class)


def load_training_rows(location: str, split: str, num_labels=None, plain_text=False) -> tuple:
    """-> (rows, the line of each row or None, the file read). plain_text: a .txt file is one text per line
    (rows {"text": line}, for a loss that reads one text column), not a TSV."""
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
    if plain_text and path.suffix.lower() == ".txt":
        dataset = data.read_texts(path)
    else:
        dataset = data.read_dataset(path, num_labels=num_labels)
    return dataset.rows, dataset.lines, path


def fingerprint(path: Path) -> dict:
    """Size and SHA-256 of a data file: --resume refuses data that changed."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def columns_for_loss(rows: list, loss_class, min_score: float, source: str):
    """Pick the columns a loss reads, from its declarations (losses/__init__.py). -> (rows, text
    columns, label column or None). A loss without labels takes scored pairs scoring at least min_score."""
    columns = set(rows[0]) if rows else set()
    # "embedding": the teacher's embedding of the row's text, added by add_teacher_embeddings, never from the file
    label_column = {"score": "score", "class": "label", "embedding": "embedding", None: None}[loss_class.label]
    from_file = label_column if loss_class.label in ("score", "class") else None
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
        if set(layout) <= columns and (from_file is None or from_file in columns):
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
                if rows and not kept:
                    raise data.DataError(f"{source}: no pair scores at least --min-score {min_score} (scores run "
                                         f"{min(scores):g}..{max(scores):g}); lower --min-score")
                return [{first: r[a], second: r[b]} for r in kept], [first, second], None
    if loss_class.label == "embedding":  # distillation learns from any texts: each distinct text of the file once
        texts = dict.fromkeys(row[column] for row in rows for column in row if data.is_text_column(column))
        if texts:
            first = loss_class.text_columns[0][0]
            return [{first: text} for text in texts], [first], label_column
    wanted = " or ".join(", ".join(layout + ((from_file,) if from_file else ()))
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


@dataclass
class TrainingData:
    datasets: list  # (location as given, rows, text columns, label column or None) for each --data
    fingerprints: list  # fingerprint() of each file read
    notes: list  # what the checks noticed but allow, one line each
    prompts: object = None  # --prompts: None, one prompt for every text column, or {column: prompt}


def prepare_data(args, loss_class) -> TrainingData:
    """Read and check every --data for the loss (args: train.py's flags)."""
    num_labels = loss_class.num_classes(args.loss_params) if loss_class.label == "class" else None
    prepared = TrainingData([], [], [], data.parse_prompts(args.prompts, loss_class))  # checked by check_flags
    plain_text = all(len(layout) == 1 for layout in loss_class.text_columns)
    for location in args.data:
        rows, lines, file = load_training_rows(location, args.split, num_labels, plain_text)
        if not rows:
            raise data.DataError(f"{location}: no training rows in split {args.split!r}")
        if args.score_scale != 1:
            for row in rows:
                if "score" in row:
                    row["score"] /= args.score_scale
        selected, text_columns, label_column = columns_for_loss(rows, loss_class, args.min_score, location)
        if len(selected) < len(rows) and loss_class.label is None:
            prepared.notes.append(f"{location}: {len(selected)} of {len(rows)} pairs score at least --min-score "
                                  f"{args.min_score}; the {loss_class.__name__} loss learns from those only")
        check_labels(selected, lines, loss_class, args.loss, file)
        if loss_class.label == "class":  # files are checked as they are read; the benchmark loaders here
            largest = max(row[label_column] for row in selected)
            if largest >= num_labels:
                raise data.DataError(f"{location}: label {largest} is outside 0..{num_labels - 1}, the labels of "
                                     f"the {args.loss} loss (set num_labels in --loss-params)")
        empty = sum(1 for row in selected if any(not row[column].strip() for column in text_columns))
        if empty:  # trained on as they are, as the reference does
            prepared.notes.append(f"{location}: {empty} of {len(selected)} rows have an empty or blank text; they "
                                  "train as the empty text")
        prepared.datasets.append((location, selected, text_columns, label_column))
        prepared.fingerprints.append(fingerprint(Path(file)))
    check_prompt_columns(prepared.prompts, prepared.datasets)
    return prepared


def check_prompt_columns(prompts, datasets: list) -> None:
    """--prompts' columns (a dict; checked against the loss by data.parse_prompts) against the text columns the
    loss reads from the data: a prompt of a column no --data has (negative, in pairs without hard negatives) would
    never be used, which is a DataError."""
    if not isinstance(prompts, dict):
        return
    unused = [column for column in prompts if not any(column in columns for _, _, columns, _ in datasets)]
    if unused:
        read = "; ".join(f"{location}: {', '.join(columns)}" for location, _, columns, _ in datasets)
        raise data.DataError(f"--prompts: column {unused[0]!r} is in no --data (the text columns the loss reads "
                             f"there: {read}), so its prompt would never be used")


def evaluator_for(args, prepared: TrainingData, classifier=None, device="cpu"):
    """The evaluator of --eval-task on --eval-data (default: the first --data), or None; with --matryoshka-dims
    it scores every trained size. It encodes in --eval-precision (auto: resolved here, once, for `device`, the
    choice logged). When it scores the training file itself, a note says so (into prepared.notes). A problem
    with the data is a DataError."""
    if not args.eval_task:
        return None
    location = Path(args.eval_data or args.data[0])
    try:
        evaluator = evaluation.for_task(args.eval_task, location, args.eval_split, classifier,
                                        keep_self_matches=args.keep_self_matches)
    except (OSError, ValueError) as error:
        given = "" if args.eval_data else " (without --eval-data it evaluates on the first --data; pass --eval-data)"
        raise data.DataError(f"--eval-task {args.eval_task}: {error}{given}") from None
    evaluator.truncate_dims = args.matryoshka_dims  # every trained size: metrics "<name>_dim<d>"
    evaluator.precision = fast_paths.resolve_precision(device, args.eval_precision)  # warns if slower than fp32
    with blamed_on(f"--eval-precision {args.eval_precision}", InputError):  # before training, not at its first eval
        fast_paths.check_environment(device, evaluator.precision)
    split_of_it = location.is_dir() or (args.eval_task in ("sick", "nli") and not data.is_snli(location))
    if not args.eval_data and not split_of_it:
        prepared.notes.append(f"--eval-task {args.eval_task} without --eval-data scores the training file "
                              f"{location} itself, not held-out data; pass --eval-data for a held-out score")
    return evaluator


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


def plan_batches(args, datasets, loss_class, world: int) -> tuple:
    """The batches of a run (args: train.py's flags), each a global batch of world x --batch-size rows (only full
    ones under torchrun: each rank takes its slice), and the optimizer steps an epoch makes of them; an epoch too
    small for one step is a DataError. -> (batches, steps per epoch)."""
    batches = make_batches(datasets, loss_class, args.loss_params, args.batch_size * world, args.seed,
                           drop_last=world > 1, multi_dataset=args.multi_dataset)
    for location, rows, columns, _ in datasets if loss_class.in_batch_negatives else []:
        if len({tuple(row[column] for column in columns) for row in rows}) < 2:  # masked: nothing to contrast
            raise data.DataError(f"--data {location}: gives no batch of 2 different rows for the {args.loss} loss "
                                 + ("(it has one row)" if len(rows) == 1 else
                                    f"(all {len(rows)} rows are the same texts)"))
    if len(batches) == 0:
        need = f"{args.batch_size * world} rows" if world > 1 else "2 rows with no text twice"
        raise data.DataError(f"--data {' '.join(args.data)}: gives no batch of {need} for the {args.loss} loss "
                             f"({sum(len(d[1]) for d in datasets)} rows)")
    if len(batches) < args.grad_accum:
        raise data.DataError(f"--grad-accum {args.grad_accum}: an epoch has only {len(batches)} batch(es) of "
                             f"{args.batch_size}; lower --grad-accum or --batch-size")
    return batches, len(batches) // args.grad_accum


# --- the model, and for distillation the teacher --------------------------------------------------------------

def load_model(args, prepared: TrainingData, device):
    """The model the run trains: --model (a student of its --layers only, with --layers), with --max-seq-length,
    --normalize, and the --prompts it keeps (so that it encodes, and is evaluated, as it was trained: see
    data.model_prompts). A problem is a UsageError naming the flag."""
    with blamed_on(f"--model {args.model}", Exception):  # the loader's messages name the file and field
        model = minilm.load(args.model, device=device)
    if args.layers:
        with blamed_on("--layers", InputError):
            model = distillation.student_from_layers(model, args.layers)
    if args.max_seq_length:
        with blamed_on(f"--max-seq-length {args.max_seq_length}", ValueError):
            model.max_seq_length = args.max_seq_length
    if args.normalize != "keep":
        model.normalize = args.normalize == "yes"
    if prepared.prompts:
        model.prompts, model.default_prompt_name = data.model_prompts(prepared.prompts, prepared.datasets[0][2])
    return model


def load_teacher(args, model, device):
    """--teacher on the training device, reading as many tokens as the student `model`, checked to embed at the
    student's size; None without --teacher. A problem is a UsageError naming --teacher."""
    if not args.teacher:
        return None
    with blamed_on(f"--teacher {args.teacher}", Exception):  # the loader's messages name the file and field
        teacher = minilm.load(args.teacher, device=device)
        teacher.max_seq_length = model.max_seq_length
        distillation.check_teacher(teacher, model)
    return teacher


def add_teacher_embeddings(teacher, prepared: TrainingData, folder: Path, rank: int, args) -> None:
    """Each row's label "embedding": the teacher's embedding of its text, [dim] float32, computed once with
    encode's fast path and kept beside the checkpoints (RUN/checkpoints/teacher-embeddings-N.npy and .json, one
    per --data; distillation.teacher_embeddings), so a resumed run reads them back, and they go with the run's
    other files. Rank 0 computes; under torchrun the other ranks wait, then read. Nothing without a teacher."""
    if teacher is None:
        return
    if rank > 0:
        barrier()
    (folder / "checkpoints").mkdir(exist_ok=True)
    for index, (_, rows, text_columns, _) in enumerate(prepared.datasets):
        path = folder / "checkpoints" / f"teacher-embeddings-{index}.npy"
        with blamed_on(f"--teacher {args.teacher}", InputError):  # a file there that is not these embeddings
            embeddings = distillation.teacher_embeddings(teacher, [row[text_columns[0]] for row in rows], path,
                                                         teacher_name=args.teacher,
                                                         show_progress=rank == 0 and not args.no_progress)
        for row, embedding in zip(rows, embeddings):
            row["embedding"] = embedding
    if rank == 0:
        barrier()
