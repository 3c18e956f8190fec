"""Hold out a fixed fraction of a duplicate-pairs file as a retrieval test (recipe 001 on Quora).

    python recipes/split_pairs.py ../shared/data/quora/duplicates.tsv --out runs/data/quora

Writes OUT/train.tsv (anchor, positive: the pairs to train on) and OUT/test/, a BEIR-layout folder in which every
held-out question is both a query and a corpus entry (same id), relevant to the questions it is paired with:
each question must find its duplicate among all held-out questions (eval.py/train.py's retrieval task skip the
query itself, as BEIR and MTEB do). The split is deterministic (no random state): questions linked by pairs form
groups, a group is held out or kept whole (no held-out question is seen in training), and groups are taken in
the order of a SHA-256 of their texts until --test-fraction of the pairs is held out.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


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


def write_beir(folder: Path, pairs: list) -> None:
    ids = {}
    for pair in pairs:
        for text in pair:
            ids.setdefault(text, f"q{len(ids):06d}")
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"_id": i, "title": "", "text": t}, ensure_ascii=False) + "\n" for t, i in ids.items()]
    (folder / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    lines = [json.dumps({"_id": i, "text": t}, ensure_ascii=False) + "\n" for t, i in ids.items()]
    (folder / "queries.jsonl").write_text("".join(lines), encoding="utf-8")
    judged = dict.fromkeys((ids[a], ids[b]) for a, p in pairs for a, b in ((a, p), (p, a)) if a != b)
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in judged), encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="split_pairs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="pairs file with anchor, positive columns (TSV/CSV with a header, or JSONL)")
    parser.add_argument("--out", required=True, help="output folder (train.tsv and test/)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="pairs held out (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be between 0 and 1, not {args.test_fraction}")
    from minilm import data

    try:
        rows = data.read_dataset(args.data).rows
    except data.DataError as error:
        parser.error(str(error))
    if not rows or not {"anchor", "positive"} <= set(rows[0]):
        parser.error(f"{args.data}: needs anchor and positive columns")
    bad = [r for r in rows if any(c in r[k] for k in ("anchor", "positive") for c in "\t\n")]
    if bad:
        parser.error(f"{args.data}: a text holds a tab or a line break, which train.tsv cannot: {bad[0]}")
    train, held = split([(r["anchor"], r["positive"]) for r in rows], args.test_fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.tsv").write_text("anchor\tpositive\n" + "".join(f"{a}\t{p}\n" for a, p in train), encoding="utf-8")
    write_beir(out / "test", held)
    print(f"{len(train)} training pairs -> {out / 'train.tsv'}; {len(held)} held-out pairs -> {out / 'test'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
