"""Hard-negative mining at corpus scale: time and peak memory of mine.py's mining with a large candidate corpus.

    python benchmarks/bench_mining.py --corpus-size 200000 --precision bf16

Corpus: distinct sentences of the shared data (STS-B, SICK, SNLI, Quora questions, SciFact claims and abstract
sentences), extended past their number by joining two of them, each text once. Pairs: the Quora duplicate
questions and STS-B pairs scoring >= 4/5 (anchors searched over the whole corpus). Prints one JSON line:
texts, seconds for encoding and for search + selection, peak RSS, the RSS before mining (model + texts
loaded) and the bound mine.py states for the extra memory.

--encode-sample N (when the CPU cannot spare the full encode): only the first N texts of each encode call are
encoded, and their embeddings are repeated to fill the rest; the encode time is then extrapolated linearly
(said in the output), while search, selection and memory run at the full corpus size.
"""

import argparse
import gzip
import json
import re
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    """Resident memory now (from /proc), MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def sentences(shared: Path) -> list:
    """Distinct sentences of the shared data, in a fixed order."""
    from minilm import data, evaluation

    found = []
    for split in ("train", "dev", "test"):
        for row in data.load_stsb(shared / "stsb", split):
            found += [row["sentence1"], row["sentence2"]]
    for row in data.read_dataset(shared / "quora" / "duplicates.tsv").rows:
        found += [row["anchor"], row["positive"]]
    for name in ("snli_1.0_dev.jsonl.gz", "snli_1.0_test.jsonl.gz"):
        with gzip.open(shared / "snli" / name, "rt", encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                found += [record["sentence1"], record["sentence2"]]
    found += list(evaluation.read_queries(shared / "scifact" / "queries.jsonl").values())
    for text in evaluation.read_corpus(shared / "scifact" / "corpus.jsonl").values():
        found += [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 20]
    return list(dict.fromkeys(s.strip() for s in found if s.strip()))


def corpus_of(size: int, pool: list) -> list:
    texts = list(pool[:size])
    step = 7919  # a prime: pool[i] joined with a far-away pool[j] gives new texts
    i = 0
    seen = set(texts)
    while len(texts) < size:
        text = pool[i % len(pool)] + " " + pool[(i * step + 1) % len(pool)]
        if text not in seen:
            seen.add(text)
            texts.append(text)
        i += 1
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--corpus-size", type=int, default=200_000)
    parser.add_argument("--pairs", type=int, default=0, help="use only this many pairs (0: all)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-negatives", type=int, default=5)
    parser.add_argument("--range-max", type=int, default=50)
    parser.add_argument("--query-chunk", type=int, default=1024)
    parser.add_argument("--corpus-chunk", type=int, default=16384)
    parser.add_argument("--encode-sample", type=int, default=0, help="encode only this many texts per call and "
                        "extrapolate (0: encode everything)")
    args = parser.parse_args()

    import numpy as np
    import torch

    import mine
    import minilm
    from minilm import data

    shared = Path(args.shared)
    pool = sentences(shared)
    corpus = corpus_of(args.corpus_size, pool)
    pairs = [(r["anchor"], r["positive"]) for r in data.read_dataset(shared / "quora" / "duplicates.tsv").rows]
    pairs += [(r["sentence1"], r["sentence2"]) for r in data.load_stsb(shared / "stsb", "train") if r["score"] >= 0.8]
    if args.pairs:
        pairs = pairs[:args.pairs]
    model = minilm.load(args.model, device="cpu")
    model.encode(pool[:64], batch_size=args.batch_size, precision=args.precision)  # one-off: the bf16 copy
    before = rss_mb()

    timings = {}
    original = mine.encode_in_windows

    def timed_encode(model, texts, *a, **k):  # encoding time, apart from search and selection
        sample = texts[:args.encode_sample] if args.encode_sample else texts
        start = time.perf_counter()
        result = original(model, sample, *a, **k)
        seconds = time.perf_counter() - start
        timings["encode_measured"] = timings.get("encode_measured", 0.0) + seconds
        if len(sample) < len(texts):  # tile the sample's embeddings; extrapolate the time
            result = result[np.arange(len(texts)) % len(sample)]
            seconds *= len(texts) / len(sample)
        timings["encode"] = timings.get("encode", 0.0) + seconds
        return result

    mine.encode_in_windows = timed_encode
    start = time.perf_counter()
    with torch.inference_mode():
        rows, dropped = mine.mine(model, pairs, corpus, num_negatives=args.num_negatives, range_max=args.range_max,
                                  batch_size=args.batch_size, precision=args.precision,
                                  query_chunk=args.query_chunk, corpus_chunk=args.corpus_chunk)
    total = time.perf_counter() - start
    dim = model.embedding_dim
    distinct = len(set(corpus)) + len({a for a, _ in pairs} | {p for _, p in pairs})
    # mine.py's statement: the embeddings, one block of scores, two copies of a corpus chunk, the running top-k
    bound_mb = (4 * dim * distinct + 4 * args.query_chunk * args.corpus_chunk + 8 * args.corpus_chunk * dim
                + 2 * 12 * args.query_chunk * (args.range_max + 2)) / 2**20
    print(json.dumps({
        "corpus_texts": len(corpus), "pairs": len(pairs), "rows": len(rows), "dropped": dropped,
        "precision": args.precision, "encode_seconds": round(timings["encode"], 1),
        "encode_extrapolated_from": args.encode_sample or None,
        "search_and_select_seconds": round(total - timings["encode_measured"], 1),
        "total_seconds": round(total - timings["encode_measured"] + timings["encode"], 1),
        "texts_per_second": round((len(corpus) + len(pairs)) / timings["encode"], 1),
        "rss_before_mining_mb": round(before), "peak_rss_mb": round(resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024), "stated_extra_bound_mb": round(bound_mb)}))


if __name__ == "__main__":
    main()
