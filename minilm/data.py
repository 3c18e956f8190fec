"""Training and evaluation data: file readers, the two local benchmarks, batch samplers, and collation.

Rows are plain dicts keyed by sentence-transformers' column names:
  anchor, positive[, negative, negative_2, ...]   in-batch-negative losses (MultipleNegativesRankingLoss)
  sentence1, sentence2, score (float)              scored pairs (CosineSimilarityLoss, CoSENTLoss)
  premise, hypothesis, label (int)                 classification (SoftmaxLoss)
  text (or sentence)                               distillation (MSELoss; a .txt file read by read_texts)
Every reader checks its input as it reads, before any training starts; a problem is a DataError naming the
file, the line and what is wrong. Texts must be strings; a UTF-8 byte-order mark is dropped. How lines, TSV and
CSV are read is one rule, below, shared by every reader of minilm (training data, evaluation files, corpus input
of `python -m minilm encode`). Which range of scores a loss accepts is the loss's to say (losses/).
"""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import torch

from minilm.errors import InputError
from minilm.tokenizer import lone_surrogate

# Column names in the wild -> the names the losses use (the seed cards' trainer names columns sentence_0, ...).
ALIASES = {"sentence_0": "sentence1", "sentence_1": "sentence2", "sentence_2": "sentence3",
           "sentence_A": "sentence1", "sentence_B": "sentence2", "query": "anchor", "answer": "positive"}
TEXT_COLUMNS = ("anchor", "positive", "sentence1", "sentence2", "premise", "hypothesis", "text", "sentence")
NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


class DataError(ValueError):
    """Malformed training or evaluation data; the message names the file, the line and the problem."""


class Dataset:
    """Rows (dicts) read from one file, with their column names in file order and the line of each row."""

    def __init__(self, rows: list, column_names: list, source: str, lines=None):
        self.rows, self.column_names, self.source, self.lines = rows, column_names, source, lines

    def __len__(self) -> int:
        return len(self.rows)


# --- reading text files: one rule for every reader (training data, evaluation files, corpus input) ------------
#
# A line ends at "\n" or "\r\n", nowhere else: str.splitlines() also splits at U+2028/2029, U+0085, \x0b, \x0c
# and \x1c-\x1e, which are text inside a line (json.dumps(..., ensure_ascii=False) writes U+2028 as it is, and a
# TSV field may hold any of them). TSV: fields are separated by every tab; a field is quoted only when it is
# wholly in double quotes and every quote inside is doubled (what csv and pandas writers produce for a text holding
# a quote); anything else is literal text, never an error (real data opens quotes it never closes: `"Yes," she
# said`). A TSV record is one line. CSV follows RFC 4180: a field that starts with a quote is quoted, may hold
# commas and line breaks, and ends at a quote followed by a comma or the end of the record; a quote inside an
# unquoted field is text.


def strip_line_ending(line: str) -> str:
    r"""The line without its ending ("\n" or "\r\n"; a lone "\r" is text)."""
    if line.endswith("\n"):
        return line[:-2] if line.endswith("\r\n") else line[:-1]
    return line


def numbered_lines(path, keep_endings: bool = False):
    """Yield (line number, line) of a UTF-8 text file, gzipped when its name ends in .gz; lines end as above.

    A UTF-8 byte-order mark (Excel writes one) is dropped from line 1. A DataError names the file (and the line,
    for bytes that are not UTF-8)."""
    path = Path(path)
    try:
        file = (gzip.open if path.suffix == ".gz" else open)(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a data file (TSV, CSV or JSONL)") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror})") from None
    with file:
        number = 0
        try:
            for number, raw in enumerate(file, 1):  # a binary file's lines end at b"\n" only
                text = raw.decode("utf-8")
                text = text.removeprefix("\ufeff") if number == 1 else text
                yield number, text if keep_endings else strip_line_ending(text)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:{number}: bytes that are not UTF-8 ({error.reason})") from None
        except (OSError, EOFError) as error:  # a damaged gzip file (gzip.BadGzipFile is an OSError)
            raise DataError(f"{path}:{number + 1}: cannot read it ({error})") from None


def read_lines(path) -> list:
    """The lines of a text file, without their endings (a text per line)."""
    return [line for _, line in numbered_lines(path)]


def read_texts(path) -> Dataset:
    """A plain text file, one text per line (as `python -m minilm encode` reads one) -> rows {"text": line};
    blank lines are left out. A file without a text is a DataError."""
    rows, lines = [], []
    for number, line in numbered_lines(path):
        if line.strip():
            rows.append({"text": line})
            lines.append(number)
    if not rows:
        raise DataError(f"{path}: no text in it (a text file holds one text per line)")
    return Dataset(rows, ["text"], str(path), lines)


def tsv_fields(line: str) -> list:
    """The fields of one TSV line (without its ending); never an error. Every tab separates two fields, so a
    quoted field cannot hold a tab: STS-B's train.tsv has a line whose sentence1 opens a quote and whose sentence2
    closes one (`"Oh, you're such a good person!` and `You're such a bad person!"`), two literal fields."""
    return [_unquoted(field) for field in line.split("\t")]


def _unquoted(field: str) -> str:
    """A field wholly in quotes whose every inner quote is doubled loses its quotes ("" is one quote); any other
    field is literal text."""
    if len(field) >= 2 and field[0] == field[-1] == '"' and '"' not in field[1:-1].replace('""', ""):
        return field[1:-1].replace('""', '"')
    return field


def csv_fields(record: str):
    """The fields of one CSV record (its lines, without the last one's ending), or None when the record ends
    inside a quoted field: it goes on on the next line. ValueError for text after a closing quote."""
    fields, start = [], 0
    while True:
        if record.startswith('"', start):
            parts, position = [], start + 1
            while True:
                close = record.find('"', position)
                if close < 0:
                    return None
                parts.append(record[position:close])
                if not record.startswith('"', close + 1):
                    break
                parts.append('"')  # "" is one quote
                position = close + 2
            fields.append("".join(parts))
            start = close + 1
            if start < len(record) and record[start] != ",":
                raise ValueError(f"field {len(fields)} is quoted, then {record[start:start + 10]!r} follows its "
                                 'closing quote (RFC 4180: a quoted field ends at a quote and a comma; a quote '
                                 'inside it is written "")')
        else:
            end = record.find(",", start)
            end = len(record) if end < 0 else end
            fields.append(record[start:end])
            start = end
        if start >= len(record):
            return fields
        start += 1  # the comma


def delimited_records(lines, delimiter: str, where):
    r"""Yield (key of its first line, fields) for each record of TSV (delimiter "\t") or CSV (",") lines.

    lines: (key, line with its ending) pairs, the key being what `where(key)` turns into a place for an error
    ("file:line"). Blank lines between records are skipped. A DataError for a CSV record whose quoting breaks
    RFC 4180, or whose quoted field never closes."""
    first, pending = None, ""
    for key, line in lines:
        if first is None:
            if not line.strip() and delimiter not in line:
                continue
            first = key
        if delimiter == "\t":
            yield first, tsv_fields(strip_line_ending(line))
            first = None
            continue
        pending += line
        try:
            fields = csv_fields(strip_line_ending(pending))
        except ValueError as error:
            raise DataError(f"{where(first)}: not valid CSV: {error}") from None
        if fields is not None:
            yield first, fields
            first, pending = None, ""
    if first is not None:
        raise DataError(f"{where(first)}: not valid CSV: a quoted field opens here and never closes (RFC 4180: a "
                        'quoted field ends at a quote; a quote inside it is written "")')


def write_tsv_line(fields) -> str:
    r"""One TSV line (ending in "\n") that tsv_fields reads back as `fields`: a field that starts with a quote or
    holds a carriage return (which could end the line) is quoted, wrapped in quotes with its quotes doubled.
    ValueError for a field holding a tab or a line break ("\n"), which no TSV field can hold."""
    written = []
    for field in fields:
        if "\t" in field or "\n" in field:
            raise ValueError(f"{field[:40]!r} holds a tab or a line break, which a TSV field cannot hold")
        quote = field.startswith('"') or "\r" in field
        written.append('"' + field.replace('"', '""') + '"' if quote else field)
    return "\t".join(written) + "\n"


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
    """Read a TSV/CSV file with a header line, or JSONL (one object per line); the reading rules are above.

    Columns are renamed by ALIASES; `score` becomes a float, `label` an int (string labels are numbered in
    order of first appearance, NLI names as entailment 0, neutral 1, contradiction 2).
    """
    path = Path(path)
    records = _jsonl_records(path) if path.suffix.lower() in (".jsonl", ".json") else _table_records(path)
    label_names = dict(NLI_LABELS)
    rows, row_lines, columns = [], [], None
    for number, columns, record in records:
        if record is None:  # the header
            continue
        rows.append(_convert(record, path, number, num_labels, label_names))
        row_lines.append(number)
    if columns is None:
        raise DataError(f"{path}: the file is empty")
    if not rows:
        raise DataError(f"{path}: a header but no rows")
    return Dataset(rows, [ALIASES.get(c, c) for c in columns], str(path), row_lines)


def parse_json_line(line: str):
    """One JSONL line's value (json.JSONDecodeError as json.loads). A raw control character inside a string (a
    tab some writer left unescaped) is kept as text; a line break cannot be there: it ends the line."""
    return _JSON.decode(line)


_JSON = json.JSONDecoder(strict=False)


def _jsonl_records(path: Path):
    """(line number, columns, record) of a JSONL file; the columns are the first record's keys."""
    columns = None
    for number, text in numbered_lines(path):
        if not text.strip():
            continue
        try:
            record = parse_json_line(text)
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
        yield number, columns, record


def _table_records(path: Path):
    """(line number, columns, {column: field}) of a TSV (.tsv, .tab, .txt) or CSV file with a header line."""
    tsv = path.suffix.lower() in (".tsv", ".tab", ".txt")
    lines = numbered_lines(path, keep_endings=True)
    columns = None
    for number, fields in delimited_records(lines, "\t" if tsv else ",", lambda line: f"{path}:{line}"):
        if columns is None:
            columns = [name.strip() for name in fields]
            if not tsv and len(columns) == 1 and "\t" in columns[0]:
                raise DataError(f"{path}:{number}: the header is one column holding tabs: the file is read as "
                                "CSV (by its name: only .tsv, .tab and .txt are read as tab-separated); name a "
                                "tab-separated file .tsv")
            _check_unique_columns(columns, path, number)
            yield number, columns, None
            continue
        if len(fields) != len(columns):
            raise DataError(f"{path}:{number}: {len(fields)} fields, the header has {len(columns)} "
                            f"({', '.join(columns)})")
        yield number, columns, dict(zip(columns, fields))


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


def load_stsb(data_dir, split: str) -> list:
    """STS benchmark rows {sentence1, sentence2, score in 0..1} from `data_dir/{split}.tsv`.

    The files have no header: genre, file, year, id, score (0..5), sentence1, sentence2; a few rows carry
    extra trailing fields, which are ignored. Quotes are text, not CSV quoting.
    """
    if not Path(data_dir).is_dir():
        found = "a file" if Path(data_dir).exists() else "nothing at that path"
        raise DataError(f"{data_dir}: {found}; expected the STS-B folder (holding train.tsv, dev.tsv and test.tsv)")
    path = Path(data_dir) / f"{split}.tsv"
    rows = []
    for number, line in numbered_lines(path):
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
    lines = read_lines(path)
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


def collate(rows: list, text_columns: list, label_column, tokenize, prompts=None):
    """Rows -> (one packed batch per text column, labels tensor or None).

    prompts: None, one string put before every text, or {column: string} for some columns (the others get none),
    as sentence-transformers' trainer applies its `prompts` argument: before tokenization, so that a prompt
    counts against max_seq_length as it does in encode."""
    features = []
    for column in text_columns:
        prompt = prompts if isinstance(prompts, str) else (prompts or {}).get(column, "")
        features.append(tokenize([prompt + row[column] for row in rows]))
    if label_column is None:
        return features, None
    labels = [row[label_column] for row in rows]
    if isinstance(labels[0], np.ndarray):  # a teacher's embeddings (distillation), [dim] each
        return features, torch.from_numpy(np.stack(labels))  # [B, dim]
    return features, torch.tensor(labels, dtype=torch.long if isinstance(labels[0], int) else torch.float32)


def prompts_value(value):
    """--prompts' value, its columns not yet checked: None; a dict (a recipe's JSON value) or a string as they are;
    or the flag's text read: a JSON object such as '{"anchor": "query: ", "positive": "passage: "}', a JSON string
    ('"query: "', the prompt between the quotes), else the prompt itself (such as "query: ", or "[INST] ", which
    is no JSON). Malformed JSON of an object, or a JSON array (a list of prompts, which has no columns), is an
    InputError."""
    if isinstance(value, str) and value.lstrip().startswith(("{", "[", '"')):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            if value.lstrip().startswith("{"):
                raise InputError(f"--prompts {value!r}: not valid JSON ({error.msg} at character {error.pos}); "
                                 'expected a prompt, or an object such as {"anchor": "query: "}') from None
            return value  # "[INST] ", '"quoted" text': the prompt as written
        if isinstance(parsed, list):
            raise InputError(f"--prompts {value!r}: a JSON array; expected one prompt for every column, or an object "
                             'of column -> prompt such as {"anchor": "query: ", "positive": "passage: "}')
        return parsed
    return value


def parse_prompts(value, loss_class):
    """train.py's --prompts -> None, one string for every text column, or {column: prompt} (collate's prompts).

    value: as prompts_value takes it. loss_class: the loss (losses/), whose declared text columns the dict's keys
    must be. A column the loss does not read, a prompt that is not a string, or what prompts_value refuses is an
    InputError naming it."""
    value = prompts_value(value)
    if value is None or isinstance(value, str):
        return value or None
    if not isinstance(value, dict):
        raise InputError(f"--prompts: expected a prompt or an object of column -> prompt, not "
                         f"{type(value).__name__}")
    columns = sorted({column for layout in loss_class.text_columns for column in layout})
    prefix = loss_class.extra_text_columns
    for column, prompt in value.items():
        if column not in columns and not (prefix and column.startswith(prefix)):
            read = ", ".join(columns + ([f"{prefix}..."] if prefix else []))
            raise InputError(f"--prompts: column {column!r} is not one the {loss_class.__name__} loss reads "
                             f"(it reads {read}; scored pairs are read as its first two columns)")
        if not isinstance(prompt, str):
            raise InputError(f"--prompts: the prompt of {column!r} is {json.dumps(prompt)}; expected a string")
    return value


def model_prompts(prompts, text_columns: list) -> tuple:
    """Training prompts (parse_prompts' value, not None) -> (prompts, default_prompt_name) for the trained model
    to keep (model.prompts, model.default_prompt_name; saved in config_sentence_transformers.json), so that it
    encodes as it was trained, by name:
      - each column that had a prompt, under its own name ("anchor", "positive", ...);
      - the first text column's prompt as "query" and the second's as "document" (anchor/positive,
        sentence1/sentence2, premise/hypothesis; "" for a column without one): what encode_query and
        encode_document use, in minilm and in sentence-transformers, and so the retrieval evaluator;
      - when every text column had the same prompt (one string for all), "query" is also the default prompt,
        which plain encode uses (the STS evaluators, search's and corpus's texts alike).
    sentence-transformers' trainer keeps nothing: a model it trained with prompts encodes without them unless
    they are given again at encode time."""
    given = {column: prompts for column in text_columns} if isinstance(prompts, str) else dict(prompts)
    query_column, document_column = text_columns[0], text_columns[min(1, len(text_columns) - 1)]
    kept = {"query": given.get(query_column, ""), "document": given.get(document_column, ""), **given}
    same = len({given.get(column, "") for column in text_columns}) == 1 and kept["query"] != ""
    return kept, "query" if same else None



def load_snli(path) -> list:
    """SNLI 1.0 as distributed (snli_1.0_{dev,test}.jsonl[.gz]) -> rows {premise, hypothesis, label}.

    premise = sentence1, hypothesis = sentence2, label from gold_label in NLI_LABELS' order (entailment 0,
    neutral 1, contradiction 2: SoftmaxLoss's and the SICK reader's order). Pairs whose annotators reached no
    majority (gold_label "-") have no label: they are dropped, and how many is said once on stderr.
    """
    import sys

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows, unlabelled = [], 0
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = parse_json_line(line)
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
    if unlabelled:
        print(f"{path}: {unlabelled} pairs without a gold label ('-') dropped", file=sys.stderr)
    if not rows:
        raise DataError(f"{path}: no labelled pairs")
    return rows


def is_snli(path) -> bool:
    """Is this location one of SNLI's original JSONL files (gzipped or not)?"""
    name = Path(path).name.lower()
    return name.startswith("snli") and (name.endswith(".jsonl") or name.endswith(".jsonl.gz"))
