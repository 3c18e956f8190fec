"""Training and evaluation data: file readers, the two local benchmarks, batch samplers, and collation.

Rows are plain dicts keyed by sentence-transformers' column names:
  anchor, positive[, negative, negative_2, ...]   in-batch-negative losses (MultipleNegativesRankingLoss)
  sentence1, sentence2, score (float)              scored pairs (CosineSimilarityLoss, CoSENTLoss)
  premise, hypothesis, label (int)                 classification (SoftmaxLoss)
Every reader checks its input as it reads, before any training starts; a problem is a DataError naming the
file, the line and what is wrong. Texts must be strings; a UTF-8 byte-order mark is dropped; a TSV field wholly
in double quotes is unquoted. Which range of scores a loss accepts is the loss's to say (losses/).
"""

import csv
import json
import math
from pathlib import Path

import torch

from minilm.tokenizer import lone_surrogate

# Column names in the wild -> the names the losses use (the seed cards' trainer names columns sentence_0, ...).
ALIASES = {"sentence_0": "sentence1", "sentence_1": "sentence2", "sentence_2": "sentence3",
           "sentence_A": "sentence1", "sentence_B": "sentence2", "query": "anchor", "answer": "positive"}
TEXT_COLUMNS = ("anchor", "positive", "sentence1", "sentence2", "premise", "hypothesis")
NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


class DataError(ValueError):
    """Malformed training or evaluation data; the message names the file, the line and the problem."""


class Dataset:
    """Rows (dicts) read from one file, with their column names in file order and the line of each row."""

    def __init__(self, rows: list, column_names: list, source: str, lines=None):
        self.rows, self.column_names, self.source, self.lines = rows, column_names, source, lines

    def __len__(self) -> int:
        return len(self.rows)


def _open_text(path: Path):
    """The file's lines; a UTF-8 byte-order mark (as Excel writes) is dropped, not kept in the first column name."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a data file (TSV, CSV or JSONL)") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 ({error.reason})") from None


def _convert(row: dict, path, line: int, num_labels=None, label_names=None) -> dict:
    """Typed values: scores to float, labels to int (names mapped through label_names), texts kept as str."""
    converted = {}
    for column, value in row.items():
        column = ALIASES.get(column, column)
        if column == "score":
            if isinstance(value, bool):
                raise DataError(f"{path}:{line}: score {value!r} is not a number")
            try:
                converted[column] = float(value)
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: score {value!r} is not a number") from None
            if not math.isfinite(converted[column]):
                raise DataError(f"{path}:{line}: score {value!r} is not a finite number")
        elif column == "label":
            converted[column] = _label(value, path, line, num_labels, label_names)
        elif is_text_column(column):
            if not isinstance(value, str):  # JSON null, numbers, lists...: never trained on as their Python text
                kind = "null" if value is None else type(value).__name__
                raise DataError(f"{path}:{line}: field {column!r} is {kind} {json.dumps(value)[:40]}, "
                                "expected a string")
            if (problem := lone_surrogate(value)) is not None:
                raise DataError(f"{path}:{line}: field {column!r} holds {problem}; fix the escape in the file")
            converted[column] = value
        else:
            converted[column] = value  # another field (an id, a source...): kept as it is, never read as text
    return converted


def is_text_column(column: str) -> bool:
    """A column that holds text some loss or task reads: anchor, positive, negative..., sentence1..., premise..."""
    return (column in TEXT_COLUMNS or column.startswith("negative")
            or (column.startswith("sentence") and column[len("sentence"):].isdigit()))


def _label(value, path, line, num_labels, label_names) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise DataError(f"{path}:{line}: label {value!r} is not an integer")
    named = False
    if isinstance(value, str) and not _is_number(value):
        if label_names is None:
            raise DataError(f"{path}:{line}: label {value!r} is not an integer")
        name = value.strip()
        name = name.lower() if name.lower() in NLI_LABELS else name  # "Entailment", "CONTRADICTION"
        label, named = label_names.setdefault(name, len(label_names)), True
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}:{line}: label {value!r} is not an integer") from None
        if not number.is_integer():  # "1.5" as text, as the number 1.5 above
            raise DataError(f"{path}:{line}: label {value!r} is not an integer")
        label = int(number)  # 1, 1.0 and "1.0" are class 1
    if label < 0 or (num_labels is not None and label >= num_labels):
        how = (f" (a name that is not one of {list(NLI_LABELS)} is numbered after them, in order of first "
               f"appearance: {value!r} would be class {label})") if named else ""
        raise DataError(f"{path}:{line}: label {value!r} is outside 0..{(num_labels or 1) - 1}{how}")
    return label


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def read_dataset(path, num_labels=None) -> Dataset:
    """Read a TSV/CSV file with a header line, or JSONL (one object per line).

    Columns are renamed by ALIASES; `score` becomes a float, `label` an int (string labels are numbered in
    order of first appearance, NLI names as entailment 0, neutral 1, contradiction 2).
    """
    path = Path(path)
    lines = _open_text(path)
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: the file is empty")
    label_names = dict(NLI_LABELS)
    rows, row_lines = [], []
    if path.suffix.lower() in (".jsonl", ".json"):
        columns = None
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            if columns is None:
                columns = list(record)
                _check_unique_columns(columns, path, number)
            missing = [c for c in columns if c not in record]
            if missing:
                raise DataError(f"{path}:{number}: missing column(s) {missing}")
            added = [ALIASES.get(c, c) for c in record if c not in columns and is_text_column(ALIASES.get(c, c))]
            if added:  # the columns are the first record's: a text field only some records have would be dropped
                raise DataError(f"{path}:{number}: field(s) {added} that the first record ({columns}) does not "
                                "have; every record needs the same text fields")
            rows.append(_convert(record, path, number, num_labels, label_names))
            row_lines.append(number)
    else:
        tsv = path.suffix.lower() in (".tsv", ".tab", ".txt")
        if tsv:
            records = ((number, _tsv_fields(text, path, number)) for number, text in enumerate(lines, 1))
        else:
            reader = csv.reader(lines, delimiter=",", strict=True)
            records = ((reader.line_num, fields) for fields in _csv_rows(reader, path))
        header = None
        for number, fields in records:
            if not fields or fields == [""]:
                continue
            if header is None:
                header = columns = [name.strip() for name in fields]
                if not tsv and len(columns) == 1 and "\t" in columns[0]:
                    raise DataError(f"{path}:{number}: the header is one column holding tabs: the file is read as "
                                    "CSV (by its name: only .tsv, .tab and .txt are read as tab-separated); name a "
                                    "tab-separated file .tsv")
                _check_unique_columns(columns, path, number)
                continue
            if len(fields) != len(columns):
                raise DataError(f"{path}:{number}: {len(fields)} fields, the header has {len(columns)} "
                                f"({', '.join(columns)})")
            rows.append(_convert(dict(zip(columns, fields)), path, number, num_labels, label_names))
            row_lines.append(number)
    if not rows:
        raise DataError(f"{path}: a header but no rows")
    return Dataset(rows, [ALIASES.get(c, c) for c in columns], str(path), row_lines)


def _check_unique_columns(columns: list, path, number: int) -> None:
    """Two columns that name the same thing (twice "anchor", or "query" beside "anchor", its alias): which one
    is meant cannot be told, so neither is guessed."""
    seen = {}
    for column in columns:
        name = ALIASES.get(column, column)
        if name in seen:
            same = f"{seen[name]!r} twice" if seen[name] == column else f"{seen[name]!r} and {column!r} (both {name!r})"
            raise DataError(f"{path}:{number}: the columns name {same}; keep one")
        seen[name] = column


def _tsv_fields(text: str, path, number: int) -> list:
    """One TSV line's fields. A field wholly in double quotes is a quoted field (the quotes go, "" becomes ");
    quotes inside a field are text. A quoted field cannot hold a tab or a line break: refused, not guessed."""
    fields = []
    for field in text.split("\t"):
        if len(field) >= 2 and field[0] == field[-1] == '"':
            inner = field[1:-1]
            if '"' in inner.replace('""', ""):
                raise DataError(f"{path}:{number}: field {field[:40]!r} is quoted but holds a lone quote; "
                                'write a quote inside a quoted field as ""')
            field = inner.replace('""', '"')
        elif field.startswith('"') and '"' not in field[1:]:
            raise DataError(f"{path}:{number}: field {field[:40]!r} opens a quote that does not close on this "
                            "line: a TSV field cannot hold a tab or a line break, quoted or not")
        fields.append(field)
    return fields


def _csv_rows(reader, path):
    try:
        yield from reader
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def load_stsb(data_dir, split: str) -> list:
    """STS benchmark rows {sentence1, sentence2, score in 0..1} from `data_dir/{split}.tsv`.

    The files have no header: genre, file, year, id, score (0..5), sentence1, sentence2; a few rows carry
    extra trailing fields, which are ignored. Quotes are text, not CSV quoting.
    """
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: expected the STS-B folder (holding train.tsv, dev.tsv and test.tsv), "
                        "not a file")
    path = Path(data_dir) / f"{split}.tsv"
    rows = []
    for number, line in enumerate(_open_text(path), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 7:
            raise DataError(f"{path}:{number}: {len(fields)} fields, STS-B rows have at least 7")
        try:
            score = float(fields[4])
        except ValueError:
            raise DataError(f"{path}:{number}: score {fields[4]!r} is not a number") from None
        if not 0 <= score <= 5:
            raise DataError(f"{path}:{number}: score {score} is outside 0..5")
        rows.append({"sentence1": fields[5], "sentence2": fields[6], "score": score / 5})
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return rows


SICK_SPLITS = {"train": "TRAIN", "trial": "TRIAL", "dev": "TRIAL", "test": "TEST"}


def load_sick(path, split: str) -> list:
    """SICK rows {premise, hypothesis, label, score} for one SemEval split (train, trial/dev, test).

    label: entailment 0, neutral 1, contradiction 2; score: relatedness 1..5 scaled to 0..1.
    """
    path = Path(path)
    if split not in SICK_SPLITS:
        raise DataError(f"{path}: SICK has splits {sorted(SICK_SPLITS)}, not {split!r}")
    lines = _open_text(path)
    if not lines:
        raise DataError(f"{path}: the file is empty")
    header = lines[0].split("\t")
    needed = ["sentence_A", "sentence_B", "entailment_label", "relatedness_score", "SemEval_set"]
    missing = [name for name in needed if name not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {missing}")
    index = {name: header.index(name) for name in needed}
    rows = []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < len(header):
            raise DataError(f"{path}:{number}: {len(fields)} fields, the header has {len(header)}")
        if fields[index["SemEval_set"]] != SICK_SPLITS[split]:
            continue
        label = fields[index["entailment_label"]].lower()
        if label not in NLI_LABELS:
            raise DataError(f"{path}:{number}: entailment label {label!r} is not one of {list(NLI_LABELS)}")
        try:
            score = float(fields[index["relatedness_score"]])
        except ValueError:
            raise DataError(f"{path}:{number}: relatedness {fields[index['relatedness_score']]!r} "
                            "is not a number") from None
        rows.append({"premise": fields[index["sentence_A"]], "hypothesis": fields[index["sentence_B"]],
                     "label": NLI_LABELS[label], "score": (score - 1) / 4})
    return rows


# --- batches ---------------------------------------------------------------------------------------------------

class RandomBatchSampler:
    """Shuffled batches of row indices, a new order each epoch from (seed, epoch); the last may be short.
    min_size: batches smaller than this are left out (a batch of one has no in-batch negatives)."""

    def __init__(self, rows: list, batch_size: int, seed: int = 42, drop_last: bool = False, min_size: int = 1):
        self.rows, self.batch_size, self.seed, self.drop_last = rows, batch_size, seed, drop_last
        self.min_size = batch_size if drop_last else min_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def _batches(self):
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def __iter__(self):
        return (batch for batch in self._batches() if len(batch) >= self.min_size)

    def __len__(self) -> int:
        """Batches in the current epoch (exact)."""
        return sum(1 for _ in self)


class NoDuplicatesBatchSampler(RandomBatchSampler):
    """Like RandomBatchSampler, but no text appears twice in one batch: with in-batch negatives a duplicate
    would be scored as its own negative. A row that collides waits for a later batch; every row is used
    once per epoch (the last batches may be short when duplicates are many; below min_size they are left out)."""

    def __init__(self, rows: list, batch_size: int, seed: int = 42, drop_last: bool = False, columns=None,
                 min_size: int = 1):
        super().__init__(rows, batch_size, seed, drop_last, min_size)
        self.columns = columns

    def _texts(self, row: dict) -> set:
        columns = self.columns or [c for c in row if isinstance(row[c], str)]
        return {row[c] for c in columns}

    def _batches(self):
        remaining = self._order()
        while remaining:
            batch, seen, collided = [], set(), []
            rest = iter(remaining)
            for index in rest:
                texts = self._texts(self.rows[index])
                if texts & seen:
                    collided.append(index)
                    continue
                batch.append(index)
                seen |= texts
                if len(batch) == self.batch_size:
                    break
            remaining = collided + list(rest)  # the collided rows go first in the next batch
            yield batch


class RoundRobinBatches:
    """Batches from several samplers in turn, (dataset index, row indices), until the shortest runs out:
    sentence-transformers' 'round_robin' multi-dataset sampler. With one sampler, its batches as
    (0, row indices): the training loop sees one shape of batch whatever the number of datasets."""

    def __init__(self, samplers: list):
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def __iter__(self):
        iterators = [iter(sampler) for sampler in self.samplers]
        while True:
            for dataset_index, iterator in enumerate(iterators):
                batch = next(iterator, None)
                if batch is None:
                    return
                yield dataset_index, batch

    def __len__(self) -> int:
        return len(self.samplers) * min(len(sampler) for sampler in self.samplers)


class ProportionalBatches(RoundRobinBatches):
    """Every batch of every sampler once an epoch, the datasets interleaved at random in proportion to their
    numbers of batches (a new order each epoch from (seed, epoch)): sentence-transformers' default
    'proportional' multi-dataset sampler. With one sampler, its batches in its own order."""

    def __init__(self, samplers: list, seed: int = 42):
        super().__init__(samplers)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self):
        owners = [index for index, sampler in enumerate(self.samplers) for _ in range(len(sampler))]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        iterators = [iter(sampler) for sampler in self.samplers]
        for position in torch.randperm(len(owners), generator=generator).tolist():
            yield owners[position], next(iterators[owners[position]])

    def __len__(self) -> int:
        return sum(len(sampler) for sampler in self.samplers)


MULTI_DATASET = {"proportional": ProportionalBatches, "round_robin": RoundRobinBatches}


def collate(rows: list, text_columns: list, label_column, tokenize):
    """Rows -> (one packed batch per text column, labels tensor or None)."""
    features = [tokenize([row[column] for row in rows]) for column in text_columns]
    if label_column is None:
        return features, None
    dtype = torch.long if isinstance(rows[0][label_column], int) else torch.float32
    return features, torch.tensor([row[label_column] for row in rows], dtype=dtype)



def load_snli(path) -> list:
    """SNLI 1.0 as distributed (snli_1.0_{dev,test}.jsonl[.gz]) -> rows {premise, hypothesis, label}.

    premise = sentence1, hypothesis = sentence2, label from gold_label in NLI_LABELS' order (entailment 0,
    neutral 1, contradiction 2: SoftmaxLoss's and the SICK reader's order). Pairs whose annotators reached no
    majority (gold_label "-") have no label: they are dropped, and how many is said once on stderr.
    """
    import gzip
    import sys

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    rows, unlabelled = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                missing = [f for f in ("sentence1", "sentence2", "gold_label")
                           if not isinstance(record, dict) or not isinstance(record.get(f), str)]
                if missing:
                    raise DataError(f"{path}:{number}: missing or non-text field(s) {missing} (SNLI rows have "
                                    f"sentence1, sentence2, gold_label)")
                if record["gold_label"] == "-":
                    unlabelled += 1
                    continue
                if record["gold_label"] not in NLI_LABELS:
                    raise DataError(f"{path}:{number}: gold_label {record['gold_label']!r} is not one of "
                                    f"{list(NLI_LABELS)} or '-'")
                rows.append({"premise": record["sentence1"], "hypothesis": record["sentence2"],
                             "label": NLI_LABELS[record["gold_label"]]})
    except (OSError, EOFError, UnicodeDecodeError) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read as SNLI JSONL ({error})") from None
    if unlabelled:
        print(f"{path}: {unlabelled} pairs without a gold label ('-') dropped", file=sys.stderr)
    if not rows:
        raise DataError(f"{path}: no labelled pairs")
    return rows


def is_snli(path) -> bool:
    """Is this location one of SNLI's original JSONL files (gzipped or not)?"""
    name = Path(path).name.lower()
    return name.startswith("snli") and (name.endswith(".jsonl") or name.endswith(".jsonl.gz"))
