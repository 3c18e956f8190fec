"""Corpus encoding at scale: streaming `python -m minilm encode` vs in-memory `encode()`, and SciFact NDCG@10 of
float32 / int8 / binary(+rescore) embeddings.

    python benchmarks/bench_corpus.py --sizes 100000,1000000      # the full run, fp32 (~1 hour on 2 quiet cores)
    python benchmarks/bench_corpus.py --sizes 100000,1000000 --compare-size 100000 --rounds 3 --precision bf16
                                                                  # the figures in benchmarks/README.md (~36 min)
    python benchmarks/bench_corpus.py --sizes 100000 --rounds 3 --scifact-docs 0    # speed ratio, in turns
    python benchmarks/bench_corpus.py --sizes 5000,20000 --scifact-docs 300    # a quick check of the script

1. Builds a corpus of max(--sizes) texts, each with an id, from the shared data's sentences (STS-B, SICK, Quora,
   SNLI dev/test, SciFact queries and titles; ~70k distinct sentences, repeated in reshuffled passes to reach the
   size), as JSONL {"id", "text"} in --work.
2. For each size (the first `size` lines): the streaming encoder (minilm.corpus.encode_corpus, the code behind
   python -m minilm encode, default window 10,000) and, at --compare-size texts (default: the largest size),
   in-memory model.encode() on the same texts (--rounds times, in turns with streaming, median ratio printed);
   each in its own process, timed after the model is loaded, with that process's peak RSS (ru_maxrss).
   Streaming time includes its validation pass over the input.
3. SciFact test: the corpus (title + " " + text) streamed to float32 once, int8 (ranges calibrated on the first
   1,000 documents, as --dtype int8 does) and binary (np.packbits(> 0), as --dtype binary does) derived from it
   with the same functions the encoder uses, queries searched exactly with minilm.search; NDCG@10 computed here
   (binary: Hamming alone, and rescored with the float queries over the 4 x 10 best). Published float32 figure for
   all-MiniLM-L6-v2: 0.6451 (MTEB).
"""

import argparse
import csv
import gzip
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def sentences(data: Path) -> list:
    """Distinct sentences of the shared data, in a fixed order."""
    found = []
    for split in ("train", "dev", "test"):
        for line in (data / "stsb" / f"{split}.tsv").read_text(encoding="utf-8").splitlines():
            fields = line.split("\t")
            if len(fields) >= 7:
                found += fields[5:7]
    with open(data / "sick" / "SICK.tsv", encoding="utf-8") as file:
        for row in csv.DictReader(file, delimiter="\t"):
            found += [row["sentence_A"], row["sentence_B"]]
    with open(data / "quora" / "duplicates.tsv", encoding="utf-8") as file:
        for row in csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE):
            found += [row["anchor"], row["positive"]]
    for split in ("dev", "test"):
        with gzip.open(data / "snli" / f"snli_1.0_{split}.jsonl.gz", "rt", encoding="utf-8") as file:
            for line in file:
                row = json.loads(line)
                found += [row["sentence1"], row["sentence2"]]
    for name, key in (("queries.jsonl", "text"), ("corpus.jsonl", "title")):
        with open(data / "scifact" / name, encoding="utf-8") as file:
            found += [json.loads(line)[key] for line in file]
    return list(dict.fromkeys(text.strip() for text in found if text.strip()))


def make_corpus(data: Path, path: Path, size: int) -> None:
    if path.is_file() and sum(1 for _ in open(path, "rb")) == size:
        return
    pool, rng = sentences(data), random.Random(0)
    with open(path, "w", encoding="utf-8") as file:
        written = 0
        while written < size:
            order = list(range(len(pool)))
            rng.shuffle(order)
            for index in order[:size - written]:
                file.write(json.dumps({"id": f"t{written:07d}", "text": pool[index]}, ensure_ascii=False) + "\n")
                written += 1
    print(f"corpus: {size:,} texts from {len(pool):,} distinct sentences -> {path}", flush=True)


def child(args) -> None:
    """One measurement in this process: --child stream|memory."""
    import torch

    import minilm
    from minilm import corpus

    model = minilm.load(args.model, device="cpu")
    model.encode(["warm up the inference copy"])
    start = time.perf_counter()
    if args.child == "stream":
        out = Path(args.out)
        corpus.encode_corpus(model, args.input, out, model_name=args.model, field="text", id_field="id",
                             window=args.window, batch_size=args.batch_size, precision=args.precision,
                             overwrite=True, progress=False,
                             log=lambda message: None)
        count = json.loads((out / "manifest.json").read_text())["count"]
    else:
        with open(args.input, encoding="utf-8") as file:
            texts = [json.loads(line)["text"] for _, line in zip(range(args.count), file)]
        embeddings = model.encode(texts, batch_size=args.batch_size, precision=args.precision)
        count = len(embeddings)
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": args.child, "count": count, "seconds": seconds, "texts_per_s": count / seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "threads": torch.get_num_threads()}))


def measure(args, mode: str, input_path: Path, count: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--input", str(input_path), "--count", str(count),
               "--out", str(args.work / f"out-{count}"), "--model", args.model, "--window", str(args.window),
               "--batch-size", str(args.batch_size), "--precision", args.precision]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{mode} run failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{mode:>6} {row['count']:>9,} texts  {row['seconds']:8.1f} s  {row['texts_per_s']:8.1f} texts/s  "
          f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
    return row


def head(path: Path, count: int, target: Path) -> Path:
    """The first `count` lines of `path` (the streaming encoder reads whole files)."""
    if not target.is_file() or sum(1 for _ in open(target, "rb")) != count:
        with open(path, "rb") as source, open(target, "wb") as out:
            for _, line in zip(range(count), source):
                out.write(line)
    return target


def ndcg_at_10(indices, relevant: list) -> float:
    """Mean NDCG@10 over queries; relevant[q]: {corpus row: grade}."""
    total = 0.0
    for rows, grades in zip(indices, relevant):
        dcg = sum(grades.get(row, 0) / math.log2(rank + 2) for rank, row in enumerate(rows[:10]))
        best = sorted(grades.values(), reverse=True)[:10]
        ideal = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(best))
        total += dcg / ideal
    return total / len(relevant)


def scifact(args) -> None:
    import minilm
    from minilm import corpus
    from minilm.similarity_search import calibrate_int8, pack_binary, quantize_int8

    data = args.data / "scifact"
    qrels = {}
    with open(data / "qrels" / "test.tsv", encoding="utf-8") as file:
        for row in list(csv.reader(file, delimiter="\t"))[1:]:
            qrels.setdefault(row[0].strip(), {})[row[1].strip()] = int(row[2])
    docs = [json.loads(line) for line in open(data / "corpus.jsonl", encoding="utf-8")]
    if args.scifact_docs:  # a quick check: the relevant documents plus the first N others
        wanted = {doc_id for grades in qrels.values() for doc_id in grades}
        docs = [doc for index, doc in enumerate(docs) if doc["_id"] in wanted or index < args.scifact_docs]
    path = args.work / "scifact-corpus.jsonl"
    with open(path, "w", encoding="utf-8") as file:
        for doc in docs:
            file.write(json.dumps({"_id": doc["_id"], "text": (doc["title"] + " " + doc["text"]).strip()}) + "\n")
    queries = {row["_id"]: row["text"] for row in map(json.loads, open(data / "queries.jsonl", encoding="utf-8"))}
    query_ids = [qid for qid in qrels if qid in queries]
    model = minilm.load(args.model, device="cpu")
    out = args.work / "scifact-float32"
    corpus.encode_corpus(model, path, out, model_name=args.model, id_field="_id", overwrite=True,
                         window=args.window, progress=True)
    embeddings = np.load(out / "embeddings.npy")
    row_of = {doc_id: row for row, doc_id in enumerate((out / "ids.txt").read_text().splitlines())}
    relevant = [{row_of[doc_id]: grade for doc_id, grade in qrels[qid].items() if doc_id in row_of}
                for qid in query_ids]
    query_embeddings = model.encode([queries[qid] for qid in query_ids])
    calibration = calibrate_int8(embeddings[:1000])
    results = {
        "float32": minilm.search(query_embeddings, embeddings, top_k=10)[0],
        "int8": minilm.search(query_embeddings, quantize_int8(embeddings, calibration), top_k=10,
                              calibration=calibration)[0],
        "binary": minilm.search(query_embeddings, pack_binary(embeddings), top_k=10)[0],
        "binary+rescore": minilm.search(query_embeddings, pack_binary(embeddings), top_k=10, rescore=4)[0],
    }
    sizes = {"float32": 4 * 384, "int8": 384, "binary": 48, "binary+rescore": 48}
    print(f"\nSciFact test ({len(query_ids)} queries, {len(docs):,} documents"
          f"{', a subset: not comparable to published figures' if args.scifact_docs else ''})")
    base = ndcg_at_10(results["float32"].tolist(), relevant)
    for name, indices in results.items():
        score = ndcg_at_10(indices.tolist(), relevant)
        print(f"  {name:15s} NDCG@10 {score:.4f}  ({score - base:+.4f} vs float32)  {sizes[name]:5d} bytes/text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="corpus sizes to stream (comma-separated)")
    parser.add_argument("--compare-size", type=int, default=None,
                        help="texts for the in-memory encode() comparison (default: the largest size; 0: skip)")
    parser.add_argument("--scifact-docs", type=int, default=None,
                        help="SciFact: only the relevant documents plus the first N (a quick check); 0: skip SciFact")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_corpus",
                        help="where the corpus and outputs are written (default: %(default)s)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--rounds", type=int, default=1,
                        help="in-memory / streaming comparisons, taken in turns (a shared machine: 3)")
    parser.add_argument("--window", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"],
                        help="encode's precision, both modes (SciFact is always fp32: the quality figures)")
    parser.add_argument("--child", choices=["stream", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.data.is_dir():
        sys.exit(f"--data {args.data}: no such directory (the shared data: stsb/, sick/, quora/, snli/, scifact/)")
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(size) for size in args.sizes.split(","))
    full = args.work / f"corpus-{sizes[-1]}.jsonl"
    make_corpus(args.data, full, sizes[-1])
    print(f"threads: {os.environ.get('OMP_NUM_THREADS', 'torch default')}; precision {args.precision}; window "
          f"{args.window}, batch {args.batch_size}; each run in its own process, model loading not timed")
    rows = {}
    for size in sizes:
        rows[size] = measure(args, "stream", head(full, size, args.work / f"corpus-{size}.jsonl"), size)
    compare = sizes[-1] if args.compare_size is None else args.compare_size
    if compare:
        # In turns (in-memory, streaming, in-memory, ...) so that a slow spell of a shared machine hits both.
        source = head(full, compare, args.work / f"corpus-{compare}.jsonl")
        ratios = []
        for round_ in range(args.rounds):
            memory = measure(args, "memory", source, compare)
            stream = rows.get(compare) if round_ == 0 and compare in rows else measure(args, "stream", source,
                                                                                        compare)
            ratios.append(stream["texts_per_s"] / memory["texts_per_s"])
        print(f"streaming / in-memory texts/s at {compare:,}: median {statistics.median(ratios):.3f} "
              f"(rounds: {', '.join(f'{ratio:.3f}' for ratio in ratios)})")
    if len(sizes) > 1:
        print(f"streaming peak RSS {sizes[0]:,} -> {sizes[-1]:,} texts: {rows[sizes[0]]['peak_rss_mb']:.0f} -> "
              f"{rows[sizes[-1]]['peak_rss_mb']:.0f} MB")
    if args.scifact_docs != 0:
        scifact(args)


if __name__ == "__main__":
    main()
