"""Encode speed: minilm vs sentence-transformers on the 2,758 STS-B test sentences, same process, same threads.

    python benchmarks/bench_encode.py                      # minilm fp32 and bf16 vs the reference: batch 32, 2 threads
    python benchmarks/bench_encode.py --precisions fp32    # minilm fp32 only

Prints sentences/s of each path, their ratio to sentence-transformers (fp32) timed in the same run, the roofline
(useful FLOPs of the real tokens / time / the GEMM GFLOP/s this machine reaches in that precision, measured in
the same run), STS-B test Spearman from each path's embeddings, the largest difference from the reference's, and
the peak memory held by tensors during one more encode (torch.profiler's allocation records).

The paths take turns, one encode each per round, so that a slow spell of a shared machine hits all of them; each
path's time is its median over the rounds, and the range of its per-round ratios to the reference is printed too.
minilm's batches are encode's default (the first batch is the batch_size longest sentences, later batches fill
the same number of tokens: see `length_sorted_batches` in minilm/model.py); the "fixed batches" row is minilm
with exactly batch_size sentences per forward pass (token_budget=False), as sentence-transformers batches.
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
from minilm.evaluation import similarity_metrics  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
REFERENCE = "sentence-transformers"


def measure_matmul_gflops(dtype, repeats: int = 20) -> float:
    """What this machine's GEMM reaches at the shapes the encoder runs ([tokens, 384] x [384, 1536])."""
    a, b = torch.randn(4096, 384, dtype=dtype), torch.randn(384, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 4096 * 384 * 1536 / statistics.median(times) / 1e9


def timed_in_turns(paths: dict, rounds: int):
    """paths: {name: fn}. One warm-up call of each, then `rounds` rounds calling each once in turn.
    Returns {name: (seconds of each round, last result)}."""
    results = {name: fn() for name, fn in paths.items()}
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], results[name]) for name in paths}


def peak_tensor_mib(fn) -> float:
    """Peak of the bytes held by live tensors during fn(), from torch.profiler's allocation records (MiB)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as profiler:
        fn()
    events = sorted((event for event in profiler.events() if event.self_cpu_memory_usage),
                    key=lambda event: event.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "stsb"), help="STS-B directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; each path's median is reported")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"],
                        help="minilm's precisions to time (default: fp32 bf16)")
    parser.add_argument("--no-reference", action="store_true", help="skip sentence-transformers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = load_stsb(args.data, "test")
    sentences = [row["sentence1"] for row in rows] + [row["sentence2"] for row in rows]
    scores = [row["score"] for row in rows]
    model = minilm.load(MODEL, device="cpu")
    lengths = [len(ids) for ids in model.tokenizer.encode_ids(sentences)]
    useful_flops = sum(length * flops_per_token(model.encoder.config, length) for length in lengths)
    peaks = {"fp32": measure_matmul_gflops(torch.float32), "bf16": measure_matmul_gflops(torch.bfloat16),
             "fp16": measure_matmul_gflops(torch.float16)}
    print(f"{len(sentences)} sentences, {sum(lengths)} tokens, {useful_flops / 1e9:.1f} GFLOP of useful work; "
          f"batch {args.batch_size}; {args.threads} threads; matmul peak measured here: "
          + ", ".join(f"{name} {peaks[name]:.0f} GFLOP/s" for name in ("fp32", "bf16")) + f"; torch {torch.__version__}")

    paths = {}  # name -> (precision, encode call)
    for precision in args.precisions:
        paths[f"minilm {precision}"] = (precision, lambda precision=precision: model.encode(
            sentences, batch_size=args.batch_size, precision=precision))
        if precision == "fp32":
            paths[f"minilm fp32, fixed batches of {args.batch_size}"] = ("fp32", lambda: model.encode(
                sentences, batch_size=args.batch_size, token_budget=False))
    if not args.no_reference:
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(str(model.source_dir), device="cpu")
        paths[REFERENCE] = ("fp32", lambda: reference.encode(sentences, batch_size=args.batch_size,
                                                              convert_to_numpy=True))
    measured = timed_in_turns({name: fn for name, (_, fn) in paths.items()}, args.repeats)
    memory = {name: peak_tensor_mib(fn) for name, (_, fn) in paths.items()}  # after the timing: it slows them

    print("\n| path | sentences/s | x sentence-transformers fp32 (range over rounds) | % of matmul peak (same "
          "precision) | STS-B test Spearman | max abs diff vs sentence-transformers | peak tensor MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (precision, _) in paths.items():
        times, embeddings = measured[name]
        seconds = statistics.median(times)
        ratio = difference = "-"
        if REFERENCE in measured:
            reference_times, reference_embeddings = measured[REFERENCE]
            per_round = [theirs / ours for ours, theirs in zip(times, reference_times)]
            ratio = f"{statistics.median(reference_times) / seconds:.2f} ({min(per_round):.2f}-{max(per_round):.2f})"
            difference = f"{np.abs(embeddings - reference_embeddings).max():.1e}"
        half = len(rows)
        metrics = similarity_metrics(torch.as_tensor(embeddings[:half]), torch.as_tensor(embeddings[half:]), scores)
        print(f"| {name} | {len(sentences) / seconds:.0f} | {ratio} | "
              f"{100 * useful_flops / seconds / 1e9 / peaks[precision]:.0f}% | {metrics['spearman_cosine']:.4f} | "
              f"{difference} | {memory[name]:.1f} |")


if __name__ == "__main__":
    main()
