"""Hold out a fixed fraction of a duplicate-pairs file as a retrieval test (recipe 001 on Quora).

    python recipes/split_pairs.py ../shared/data/quora/duplicates.tsv --out runs/data/quora

Writes OUT/train.tsv (anchor, positive: the pairs to train on) and OUT/test/, a BEIR-layout folder in which every
held-out question is both a query and a corpus entry (same id), relevant to the questions it is paired with:
each question must find its duplicate among all held-out questions (eval.py/train.py's retrieval task skip the
query itself, as BEIR and MTEB do). The split is deterministic (no random state): questions linked by pairs form
groups, a group is held out or kept whole (no held-out question is seen in training), and groups are taken in
the order of a SHA-256 of their texts until --test-fraction of the pairs is held out.

An earlier split in OUT is replaced only with --overwrite (its four files; nothing else in OUT is touched), never one
that is the input, and each file is written whole (a temporary file renamed into place): an interrupted run leaves
the old file or the new one, never half of one.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minilm import data, files  # noqa: E402
from minilm.errors import Parser, UsageError  # noqa: E402


def split(pairs: list, test_fraction: float):
    """pairs -> (train pairs, held-out pairs), whole groups of linked texts on each side."""
    parent = {}

    def root(text):
        while parent.setdefault(text, text) != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    for anchor, positive in pairs:
        parent[root(anchor)] = root(positive)
    groups = {}
    for index, (anchor, _) in enumerate(pairs):
        groups.setdefault(root(anchor), []).append(index)

    def key(indices):
        texts = sorted({t for i in indices for t in pairs[i]})
        return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()

    held = set()
    for indices in sorted(groups.values(), key=key):
        if len(held) >= test_fraction * len(pairs):
            break
        held.update(indices)
    return ([p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held])


# What a split writes into --out, and all it may replace there.
OUTPUTS = ("train.tsv", "test/corpus.jsonl", "test/queries.jsonl", "test/qrels/test.tsv")


def write_beir(folder: Path, pairs: list) -> None:
    ids = {}
    for pair in pairs:
        for text in pair:
            ids.setdefault(text, f"q{len(ids):06d}")
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"_id": i, "title": "", "text": t}, ensure_ascii=False) + "\n" for t, i in ids.items()]
    files.write_text(folder / "corpus.jsonl", "".join(lines))
    lines = [json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n" for t, i in ids.items()]
    files.write_text(folder / "queries.jsonl", "".join(lines))
    judged = dict.fromkeys((ids[a], ids[b]) for a, p in pairs for a, b in ((a, p), (p, a)) if a != b)
    files.write_text(folder / "qrels" / "test.tsv",
                     "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in judged))


def check_out(data_path: Path, out: Path, overwrite: bool) -> None:
    """Before anything is read or written: --out is a folder whose outputs are not the input (compared as files:
    links and ../ included), and which holds no earlier split unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; give the folder to write train.tsv and test/ into")
    for name in OUTPUTS:
        target = out / name
        if target.exists() and data_path.exists() and os.path.samefile(target, data_path):
            raise UsageError(f"--out {out}: the split would write {target} over the input {data_path}; give another "
                             "--out (--overwrite replaces an earlier split, never the input)")
    if (out / "test").exists() and not (out / "test").is_dir():
        raise UsageError(f"--out {out}: {out / 'test'} is a file, where the held-out folder test/ goes")
    earlier = [name for name in ("train.tsv", "test") if (out / name).exists()]
    if earlier and not overwrite:
        raise UsageError(f"--out {out}: holds {' and '.join(earlier)} already (an earlier split?); choose another "
                         "--out or add --overwrite to replace them")


def main(argv=None) -> int:
    """-> exit status: 0, or 2 after one line naming the flag or file at fault."""
    try:
        return run(argv)
    except UsageError as error:
        print(f"split_pairs.py: error: {error}", file=sys.stderr)
        return 2


def run(argv=None) -> int:
    parser = Parser(prog="split_pairs.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="pairs file with anchor, positive columns (TSV/CSV with a header, or JSONL)")
    parser.add_argument("--out", required=True, help="output folder (train.tsv and test/)")
    parser.add_argument("--overwrite", action="store_true", help="replace the train.tsv and test/ files of an "
                        "earlier split in --out (never the input)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="pairs held out (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        raise UsageError(f"--test-fraction must be between 0 and 1, not {args.test_fraction}")
    out = Path(args.out)
    check_out(Path(args.data), out, args.overwrite)
    try:
        rows = data.read_dataset(args.data).rows
    except (OSError, data.DataError) as error:
        raise UsageError(str(error)) from None
    if not rows or not {"anchor", "positive"} <= set(rows[0]):
        raise UsageError(f"{args.data}: needs anchor and positive columns")
    bad = [r for r in rows if any(c in r[k] for k in ("anchor", "positive") for c in "\t\n")]
    if bad:
        raise UsageError(f"{args.data}: a text holds a tab or a line break, which train.tsv cannot: {bad[0]}")
    train, held = split([(r["anchor"], r["positive"]) for r in rows], args.test_fraction)
    out.mkdir(parents=True, exist_ok=True)
    # Quoted where minilm's TSV reader would otherwise misread a text (a leading quote): read back unchanged.
    files.write_text(out / "train.tsv", "anchor\tpositive\n" + "".join(data.write_tsv_line(pair) for pair in train))
    write_beir(out / "test", held)
    print(f"{len(train)} training pairs -> {out / 'train.tsv'}; {len(held)} held-out pairs -> {out / 'test'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
