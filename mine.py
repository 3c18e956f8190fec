"""Mine hard negatives: for each (anchor, positive) pair, the corpus texts the model ranks highest for the anchor
that are not its positive, written as anchor, positive, negative_1..n rows that train.py reads as they are.

    python mine.py --model sentence-transformers/all-MiniLM-L6-v2 --data pairs.tsv --out triplets.jsonl
    python mine.py --model M --data pairs.tsv --corpus corpus.jsonl --num-negatives 3 --range-min 5 \\
        --range-max 50 --relative-margin 0.05 --sampling random --out triplets.jsonl

--data: TSV/CSV (header) or JSONL with columns anchor, positive (query/answer accepted, as in train.py), or a
BEIR folder (corpus.jsonl, queries.jsonl, qrels/<--split>.tsv): its (query, relevant document) pairs.
--corpus: the candidate texts: a BEIR corpus.jsonl (_id, title, text: title + " " + text is the text), a TSV/CSV
with a header or any JSONL file with --corpus-column naming the text, or a text file with one text per line.
Default: the distinct positives of --data.

For each anchor, candidates are ranked by cosine similarity (exact search, minilm.search); a model with prompts
(train.py --prompts) embeds the anchors with its "query" prompt and the other texts with its "document" one, as
encode_query and encode_document do. Never mined: the anchor's positive, any other positive of the same anchor,
and any text equal to one of them or to the anchor (texts are compared exactly; equal texts are one candidate).
Of the remaining candidates, ranks [--range-min, --range-max) are eligible (rank 0 = the most similar left), then
those passing the margins:
  --absolute-margin m   sim(anchor, negative) <= sim(anchor, positive) - m
  --relative-margin r   sim(anchor, negative) <= sim(anchor, positive) * (1 - r)   (NV-Retriever's TopK-PercPos)
--sampling top takes the n best eligible, random n of them (--seed), kept in rank order. Pairs with fewer than
n eligible negatives are dropped (said once).

Memory: besides the model and the texts, the embeddings of the distinct texts (4 x dim bytes each: 1.5 KB for
MiniLM, ~300 MB for 200,000 texts) and, at any moment of the search, one block of scores (--query-chunk x
--corpus-chunk float32: 1024 x 16384 x 4 B = 64 MB by default) plus two float copies of one corpus chunk
(2 x 16384 x dim x 4 B = 48 MB for MiniLM) and the running top-k (small): never the full anchors x corpus
matrix. Texts are tokenized and encoded --encode-window at a time, on encode's fast path (the token ids of one
window and the activations of one batch come on top). Measured (benchmarks/bench_mining.py, bf16): peak RSS
grows by the embeddings and ~470 MB more, the same at 100,000 and 200,000 corpus texts (1.07 / 1.28 GB in all).
The output is written to a temporary file beside --out and renamed into place: an interrupted run leaves no
partial file, and an existing --out is kept unless --overwrite. --out is never one of the inputs (--data, a file of
a --data or --model folder, --corpus), whatever links or ../ lead to it.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import minilm
from minilm import corpus as corpus_files, data, evaluation, files
from minilm.errors import Parser, UsageError
from minilm.model import PRECISIONS, resolve_device


def read_pairs(path, split: str = "train") -> list:
    """(anchor, positive) tuples of a pairs file, or (query, relevant document) pairs of a BEIR folder's split;
    a DataError names the file and what is missing."""
    if Path(path).is_dir():
        return [(row["anchor"], row["positive"]) for row in evaluation.beir_pairs(path, split)]
    dataset = data.read_dataset(path)
    if not {"anchor", "positive"} <= set(dataset.column_names):
        raise data.DataError(f"{path}: columns {dataset.column_names}; mining needs anchor and positive "
                             f"(or query and answer)")
    return [(row["anchor"], row["positive"]) for row in dataset.rows]


def read_corpus_texts(path, column=None) -> list:
    """Distinct candidate texts of a corpus file: a BEIR corpus.jsonl (title + " " + text), a TSV/CSV with a
    header or a JSONL file with --corpus-column naming the text, or one text per line."""
    path = Path(path)
    if path.is_dir():
        raise data.DataError(f"--corpus {path} is a folder: pass its corpus.jsonl (or a TSV/CSV/text file)")
    kind = corpus_files.input_format(path)
    if kind in ("tsv", "csv") or (kind == "jsonl" and column):
        if kind != "jsonl" and column is None:
            raise data.DataError(f"--corpus {path}: name the column holding the texts with --corpus-column")
        try:
            reader = corpus_files.Reader(path, kind, field=column)
            texts = [text for _, _, text, _ in reader.records()]
        except corpus_files.CorpusError as error:
            raise data.DataError(str(error).replace("pass --column", "pass --corpus-column")) from None
    elif kind == "jsonl":
        try:
            texts = list(evaluation.read_corpus(path).values())
        except data.DataError as error:
            if "without the field" not in str(error):
                raise
            raise data.DataError(f"{error}: without --corpus-column, a JSONL --corpus is read as a BEIR "
                                 "corpus.jsonl (_id, title, text); name the field holding the texts with "
                                 "--corpus-column") from None
    else:
        texts = [line for line in data.read_lines(path) if line.strip()]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise data.DataError(f"{path}: no texts")
    return list(dict.fromkeys(texts))


def encode_in_windows(model, texts: list, batch_size: int, precision: str, window: int, prompt: str) -> np.ndarray:
    """[len(texts), dim] float32, encoded `window` texts at a time (tokens of one window in memory); dim: what encode
    returns, the model's truncate_dim when it has one (a Matryoshka model's), as sentence-transformers mines.
    prompt: put before each text ("" for none)."""
    out = np.empty((len(texts), model.truncate_dim or model.embedding_dim), dtype=np.float32)
    for start in range(0, len(texts), window):
        out[start:start + window] = model.encode(texts[start:start + window], batch_size=batch_size,
                                                 precision=precision, prompt=prompt)
    return out


def mine(model, pairs: list, corpus=None, num_negatives: int = 1, range_min: int = 0, range_max: int = 50,
         absolute_margin=None, relative_margin=None, sampling: str = "top", seed: int = 42, batch_size: int = 64,
         precision: str = "fp32", query_chunk: int = 1024, corpus_chunk: int = 16384, encode_window: int = 16384):
    """-> (rows [{anchor, positive, negative_1..n}], number of pairs dropped for want of negatives).

    pairs: (anchor, positive) tuples; corpus: candidate texts (None: the distinct positives)."""
    candidates = list(dict.fromkeys(corpus if corpus is not None else [p for _, p in pairs]))
    position = {text: index for index, text in enumerate(candidates)}
    anchors = list(dict.fromkeys(a for a, _ in pairs))
    # Positives outside the corpus need an embedding too, as documents: the positive's score sets the margins.
    outside = list(dict.fromkeys(p for _, p in pairs if p not in position))
    outside_position = {text: index for index, text in enumerate(outside)}
    # Anchors as queries, candidates and positives as documents, with the model's prompts for each (a model trained
    # with --prompts): as sentence-transformers' mine_hard_negatives (encode_query, encode_document) and eval.py.
    query_prompt, document_prompt = model.resolve_prompt(role="query"), model.resolve_prompt(role="document")
    corpus_embeddings = encode_in_windows(model, candidates, batch_size, precision, encode_window, document_prompt)
    outside_embeddings = encode_in_windows(model, outside, batch_size, precision, encode_window, document_prompt)
    anchor_embeddings = encode_in_windows(model, anchors, batch_size, precision, encode_window, query_prompt)

    def document(text):
        return corpus_embeddings[position[text]] if text in position else outside_embeddings[outside_position[text]]

    # Per anchor: the candidate indices never to mine (its positives and texts equal to them or to itself).
    excluded = {anchor: set() for anchor in anchors}
    for anchor, positive in pairs:
        excluded[anchor].update(position[t] for t in (anchor, positive) if t in position)
    depth = min(range_max + max(len(e) for e in excluded.values()), len(candidates))
    indices, scores = minilm.search(anchor_embeddings, corpus_embeddings, top_k=depth, query_chunk=query_chunk,
                                    corpus_chunk=corpus_chunk)
    indices, scores = indices.numpy(), scores.numpy()
    pairs_of = {}
    for number, (anchor, _) in enumerate(pairs):
        pairs_of.setdefault(anchor, []).append(number)
    rng = np.random.default_rng(seed)
    chosen = [None] * len(pairs)  # per pair: its negatives' candidate indices, or None (too few eligible)
    for row, anchor in enumerate(anchors):  # one anchor's ranking at a time (Python lists of one row)
        kept = [(i, s) for i, s in zip(indices[row].tolist(), scores[row].tolist()) if i not in excluded[anchor]]
        window = kept[range_min:range_max]
        a = anchor_embeddings[row]
        for number in pairs_of[anchor]:
            p = document(pairs[number][1])
            positive_score = float(np.dot(a, p) / (np.linalg.norm(a) * np.linalg.norm(p)))
            eligible = [index for index, score in window
                        if (absolute_margin is None or score <= positive_score - absolute_margin)
                        and (relative_margin is None or score <= positive_score * (1 - relative_margin))]
            if len(eligible) < num_negatives:
                continue
            if sampling == "random":
                eligible = [eligible[i] for i in sorted(rng.choice(len(eligible), num_negatives, replace=False))]
            chosen[number] = eligible[:num_negatives]
    rows = [{"anchor": anchor, "positive": positive,
             **{f"negative_{n + 1}": candidates[index] for n, index in enumerate(negatives)}}
            for (anchor, positive), negatives in zip(pairs, chosen) if negatives is not None]
    dropped = chosen.count(None)
    return rows, dropped


def write_atomically(path: Path, rows: list) -> None:
    """JSONL through a temporary file in the same folder, renamed into place (all or nothing), with the mode of a
    new file (not mkstemp's 0600)."""
    with files.replaced_atomically(path) as temporary, open(temporary, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def input_files(args) -> list:
    """(what it is, path) for each file --out must not be: --data (or every file of a --data folder, and the BEIR
    files read from it, named even when a link leads out of the folder), --corpus, every file of a --model folder."""
    found = []
    for flag in ("data", "model"):
        location = Path(getattr(args, flag))
        if location.is_dir():
            listed = [Path(folder, name) for folder, _, names in os.walk(location) for name in names]
            if flag == "data":
                listed += [location / "corpus.jsonl", location / "queries.jsonl",
                           location / "qrels" / f"{args.split}.tsv"]
            found += [(f"{path}, a file of the --{flag} folder {location}", path) for path in listed]
        elif flag == "data":
            found.append((f"the --data file {location}", location))
    if args.corpus:
        found.append((f"the --corpus file {args.corpus}", Path(args.corpus)))
    return found


def check_out_is_no_input(out: Path, args) -> None:
    """--overwrite replaces --out: refuse an --out that is one of the files mine.py reads, compared as files (links,
    ../ and hard links included), so that no flag combination writes the mined rows over their own input."""
    if not out.exists():
        return  # a path that is not there cannot be an input (a dangling link is replaced, not its target)
    for what, path in input_files(args):
        if path.exists() and os.path.samefile(out, path):
            raise UsageError(f"--out {out}: is {what}; mined rows go to a file of their own, away from their inputs "
                             f"(--overwrite replaces an earlier output, never an input)")


def main(argv=None) -> int:
    """-> exit status: 0, or 2 after one line naming the flag or file at fault."""
    try:
        return run(argv)
    except (UsageError, data.DataError) as error:
        print(f"mine.py: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> Parser:
    parser = Parser(prog="mine.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", required=True, help="a model directory or hub id")
    add("--data", required=True, help="(anchor, positive) pairs: TSV/CSV with a header, or JSONL; or a BEIR "
        "folder, whose --split qrels give (query, document) pairs")
    add("--split", default="train", help="qrels split when --data is a BEIR folder (default: %(default)s)")
    add("--corpus", help="candidate texts: a BEIR corpus.jsonl, a TSV/CSV with a header or a JSONL file (with "
        "--corpus-column), or a text file, one text per line (default: the positives)")
    add("--corpus-column", help="the TSV/CSV column or JSONL field of --corpus holding the texts")
    add("--out", required=True, help="output JSON lines, a .jsonl (or .json) file: anchor, positive, negative_1..n")
    add("--overwrite", action="store_true", help="replace an existing --out (never an input file)")
    add("--num-negatives", type=int, default=1, help="negatives per pair (default: %(default)s)")
    add("--range-min", type=int, default=0, help="skip this many top-ranked candidates (default: %(default)s)")
    add("--range-max", type=int, default=50, help="consider candidates ranked below this (default: %(default)s)")
    add("--absolute-margin", type=float, help="require sim(neg) <= sim(pos) - margin")
    add("--relative-margin", type=float, help="require sim(neg) <= sim(pos) * (1 - margin), 0 <= margin < 1")
    add("--sampling", choices=["top", "random"], default="top",
        help="best eligible, or a random draw of them (default: %(default)s)")
    add("--seed", type=int, default=42, help="for --sampling random (default: %(default)s)")
    add("--batch-size", type=int, default=64, help="encode batch size (default: %(default)s)")
    add("--precision", choices=list(PRECISIONS), default="fp32", help="encode precision (default: fp32)")
    add("--max-seq-length", type=int, help="truncate texts to this many tokens (default: the model's)")
    add("--device", help="cpu, cuda, ... (default: CUDA when available)")
    add("--query-chunk", type=int, default=1024, help="anchors scored at once (memory, see above) (default: "
        "%(default)s)")
    add("--corpus-chunk", type=int, default=16384, help="candidates scored at once (memory, see above) "
        "(default: %(default)s)")
    add("--encode-window", type=int, default=16384, help="texts tokenized and encoded at once (default: "
        "%(default)s)")
    return parser


def check_args(args) -> None:
    """The flags' values and --out, before anything is read: one UsageError naming the flag."""
    for flag in ("num_negatives", "batch_size", "query_chunk", "corpus_chunk", "encode_window", "range_max"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if not 0 <= args.range_min < args.range_max:
        raise UsageError(f"--range-min ({args.range_min}) must be >= 0 and below --range-max ({args.range_max})")
    if args.range_max - args.range_min < args.num_negatives:
        raise UsageError(f"the rank window [--range-min, --range-max) = [{args.range_min}, {args.range_max}) "
                         f"holds fewer than --num-negatives {args.num_negatives} candidates")
    if args.relative_margin is not None and not 0 <= args.relative_margin < 1:
        raise UsageError(f"--relative-margin must be in [0, 1), not {args.relative_margin}")
    if args.absolute_margin is not None and args.absolute_margin < 0:
        raise UsageError(f"--absolute-margin must be >= 0, not {args.absolute_margin}")
    if args.corpus_column and not args.corpus:
        raise UsageError(f"--corpus-column {args.corpus_column}: names the text column of --corpus, which is not "
                         "given (without --corpus the candidates are the positives of --data)")
    try:
        resolve_device(args.device)
    except ValueError as error:
        raise UsageError(f"--device {args.device}: {error}") from None
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: --out is the JSONL file to write")
    check_out_is_no_input(out, args)  # before the --overwrite question: no flag makes an input writable
    if out.suffix.lower() not in (".jsonl", ".json"):  # train.py picks its reader by extension: a .tsv is misread
        found = f"not {out.suffix}" if out.suffix else "and it has no extension"
        raise UsageError(f"--out {out}: mine.py writes JSON lines, so --out must end in .jsonl (or .json), {found}; "
                         "train.py reads a file by its extension")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists: choose another path or add --overwrite")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    out = Path(args.out)
    try:
        pairs = read_pairs(args.data, args.split)
        corpus = read_corpus_texts(args.corpus, args.corpus_column) if args.corpus else None
    except (FileNotFoundError, ValueError) as error:  # the readers' messages name the file and line
        raise UsageError(str(error)) from None
    try:
        model = minilm.load(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as error:  # the loader's messages name the file and field
        raise UsageError(f"--model {args.model}: {error}") from None
    if args.max_seq_length is not None:
        try:  # the model's setter checks it against the checkpoint's positions
            model.max_seq_length = args.max_seq_length
        except ValueError as error:
            raise UsageError(f"--max-seq-length {args.max_seq_length}: {error}") from None
    with torch.inference_mode():
        rows, dropped = mine(model, pairs, corpus, args.num_negatives, args.range_min, args.range_max,
                             args.absolute_margin, args.relative_margin, args.sampling, args.seed, args.batch_size,
                             args.precision, args.query_chunk, args.corpus_chunk, args.encode_window)
    if dropped:
        print(f"mine.py: {dropped} of {len(pairs)} pairs had fewer than {args.num_negatives} eligible negatives "
              f"and were dropped", file=sys.stderr)
    if not rows:
        raise UsageError("no pair has enough eligible negatives: widen --range-max, lower the margins or "
                         "--num-negatives")
    write_atomically(out, rows)
    print(f"wrote {len(rows)} rows with {args.num_negatives} negative(s) each to {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # --out is written all at once at the end (write_atomically): nothing half-written
        print("\nmine.py: interrupted; --out was not written", file=sys.stderr)
        sys.exit(130)
