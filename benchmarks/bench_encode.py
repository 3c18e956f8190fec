"""Encode speed: minilm vs sentence-transformers on the 2,758 STS-B test sentences, same process, same threads.

    python benchmarks/bench_encode.py                    # fp32, batch 32, 2 threads
    python benchmarks/bench_encode.py --precision bf16   # minilm in bf16 autocast (CPUs with AVX-512 bf16)

Prints sentences/s of each, their ratio, the largest difference between their embeddings, and the roofline:
useful FLOPs (real tokens only) / time / the matmul GFLOP/s measured here, in the same run.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import minilm  # noqa: E402
from minilm.data import load_stsb  # noqa: E402
from minilm.encoder import flops_per_token  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def measure_matmul_gflops(repeats: int = 20) -> float:
    """What this machine's fp32 GEMM reaches at the shapes the encoder runs ([tokens, 384] x [384, 1536])."""
    a, b = torch.randn(4096, 384), torch.randn(384, 1536)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 4096 * 384 * 1536 / statistics.median(times) / 1e9


def timed(fn, repeats: int):
    """Median seconds of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "stsb"), help="STS-B directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the median is reported")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="minilm's precision")
    parser.add_argument("--no-reference", action="store_true", help="skip sentence-transformers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = load_stsb(args.data, "test")
    sentences = [row["sentence1"] for row in rows] + [row["sentence2"] for row in rows]
    model = minilm.load(MODEL, device="cpu")
    lengths = [len(ids) for ids in model.tokenizer.encode_ids(sentences)]
    useful_flops = sum(length * flops_per_token(model.encoder.config, length) for length in lengths)
    peak = measure_matmul_gflops()
    print(f"{len(sentences)} sentences, {sum(lengths)} tokens, {useful_flops / 1e9:.1f} GFLOP of useful work; "
          f"{args.threads} threads; matmul peak measured here {peak:.0f} GFLOP/s; torch {torch.__version__}")

    encode_kwargs = {"batch_size": args.batch_size}
    if args.precision != "fp32":
        encode_kwargs["precision"] = args.precision
    seconds, ours = timed(lambda: model.encode(sentences, **encode_kwargs), args.repeats)
    results = [("minilm " + args.precision, seconds)]

    reference_embeddings = None
    if not args.no_reference:
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(str(model.source_dir), device="cpu")
        seconds, reference_embeddings = timed(
            lambda: reference.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True), args.repeats)
        results.append(("sentence-transformers fp32", seconds))

    print(f"\n| path | sentences/s | x reference | % of matmul peak |")
    print(f"|---|---|---|---|")
    reference_rate = len(sentences) / results[-1][1] if reference_embeddings is not None else None
    for name, seconds in results:
        rate = len(sentences) / seconds
        ratio = f"{rate / reference_rate:.2f}" if reference_rate else "-"
        print(f"| {name} | {rate:.0f} | {ratio} | {100 * useful_flops / seconds / 1e9 / peak:.0f}% |")
    if reference_embeddings is not None:
        print(f"\nmax |minilm - sentence-transformers| = {np.abs(ours - reference_embeddings).max():.2e}")


if __name__ == "__main__":
    main()
