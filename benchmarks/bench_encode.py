"""Encode speed: minilm vs sentence-transformers on the 2,758 STS-B test sentences, same process, same threads.

    python benchmarks/bench_encode.py                      # minilm fp32 and bf16 vs the reference: batch 32, 2 threads
    python benchmarks/bench_encode.py --precisions fp32    # minilm fp32 only
    python benchmarks/bench_encode.py --corpus scifact --precisions fp32 bf16 int8

--corpus scifact: the first 1,000 SciFact abstracts (title + " " + text), max_seq_length 256 for both models:
long texts, most truncated at 256 tokens (no Spearman: the column shows "-"). --precisions int8: encode's
precision="int8" where it exists, otherwise a copy of the model with the encoder Linears but q/k/v swapped for
minilm.quantize.Int8Linear; its roofline column is against the int8 GEMM (torch._int_mm) measured in the run.

Prints texts/s (the "sentences/s" column) of each path, their ratio to sentence-transformers (fp32) timed in the
same run, the roofline (useful FLOPs of the real tokens / time / the GEMM GFLOP/s this machine reaches in that
precision, measured in the same run), STS-B test Spearman from each path's embeddings, the largest difference
from the reference's, and the peak memory held by tensors during one more encode (torch.profiler's allocation
records). Last, the CPU (minilm.cpu: vendor, AVX2 / AVX-512 / VNNI / AVX-512 bf16 / AMX) and the ceiling it sets:
how many times faster than the reference an encode could be if every useful FLOP ran at the fastest GEMM rate
measured here (any precision), with nothing else costing time. The GEMM rates are one encoder layer's four Linears
(minilm.cpu.LAYER_SHAPES) through the ops encode runs, at 1,024 rows and at the corpus's typical batch, the better.

A precision whose GEMMs run more than minilm.cpu.SLOW times slower than fp32 here (bf16 and int8 on a CPU with AVX2
only: 5-70x) is not run in the rounds: it is timed once on a slice of the texts (as many as ~15 s allow) beside
minilm fp32 on the same slice, and printed as such, so that the benchmark finishes on every CPU. `auto` (the
precision minilm.cpu.choose_precision picks here, with its reason printed) is a row of its own.

The paths take turns, one encode each per round, so that a slow spell of a shared machine hits all of them; each
path's time is its median over the rounds, and the range of its per-round ratios to the reference is printed too.
minilm's batches are encode's default (the first batch is the batch_size longest sentences, later batches fill
the same number of tokens: see `length_sorted_batches` in minilm/model.py); the "fixed batches" row is minilm
with exactly batch_size sentences per forward pass (token_budget=False), as sentence-transformers batches.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import minilm  # noqa: E402
from minilm import cpu  # noqa: E402
from minilm.data import load_stsb  # noqa: E402
from minilm.encoder import flops_per_token  # noqa: E402
from minilm.evaluation import similarity_metrics  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
REFERENCE = "sentence-transformers"
SLICE_SECONDS = 15  # a precision that is slow here is timed on about this many seconds' worth of texts


def measure_gemm_peaks(batch_rows: int) -> dict:
    """{precision: G(FL)OP/s}: one encoder layer's Linears (minilm.cpu.LAYER_SHAPES) through the ops encode runs,
    at 1,024 rows and at `batch_rows` (the corpus's typical batch), the better of the two; a precision that is
    slow here keeps minilm.cpu's small-trial rate."""
    rates = [cpu.measure_gemm_rates(rows, repeats=5) for rows in sorted({cpu.PROBE_ROWS, batch_rows})]
    return {precision: max(rate[precision] for rate in rates) for precision in cpu.PRECISIONS}


def timed_in_turns(paths: dict, rounds: int, warm_up: dict = None):
    """paths, warm_up: {name: fn}. Each warm-up call (default: each path once), then `rounds` rounds calling each
    path once in turn. Returns {name: (seconds of each round, last result)}."""
    for fn in (paths if warm_up is None else warm_up).values():
        fn()
    results, times = {}, {name: [] for name in paths}
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


def scifact_abstracts(scifact: Path, count: int) -> list:
    """The first `count` documents of SciFact's corpus, as title + " " + text."""
    texts = []
    with open(scifact / "corpus.jsonl", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            texts.append(f"{row['title']} {row['text']}")
            if len(texts) == count:
                break
    return texts


def int8_encoder(model, batch_size):
    """fn(texts): encode(precision="int8") if minilm has it, else the same thing by hand: a copy of the model whose
    encoder Linears are Int8Linear except q/k/v (minilm.quantize.keep_qkv_float; the unused pooler left as it is),
    encoding in float32 without the oneDNN copy."""
    from minilm.model import PRECISIONS

    if "int8" in PRECISIONS:
        return lambda texts: model.encode(texts, batch_size=batch_size, precision="int8")
    from minilm.quantize import keep_qkv_float, quantize_linears

    quantized = copy.deepcopy(model)
    quantized.packed_cpu_inference = False
    quantize_linears(quantized.encoder.layers, skip=keep_qkv_float)
    return lambda texts: quantized.encode(texts, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "stsb"), help="STS-B directory")
    parser.add_argument("--corpus", choices=["stsb", "scifact"], default="stsb",
                        help="STS-B test sentences, or the first 1,000 SciFact abstracts at max_seq_length 256")
    parser.add_argument("--scifact", default=str(REPO.parent / "shared" / "data" / "scifact"),
                        help="SciFact in BEIR layout")
    parser.add_argument("--limit", type=int, help="only the first N texts (a quick check)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; each path's median is reported")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16", "int8"], default=["fp32", "bf16"],
                        help="minilm's precisions to time (default: fp32 bf16)")
    parser.add_argument("--no-reference", action="store_true", help="skip sentence-transformers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.corpus == "stsb":
        rows = load_stsb(args.data, "test")[: args.limit]
        sentences = [row["sentence1"] for row in rows] + [row["sentence2"] for row in rows]
        scores = [row["score"] for row in rows]
    else:
        sentences, scores = scifact_abstracts(Path(args.scifact), args.limit or 1000), None
    model = minilm.load(MODEL, device="cpu", max_seq_length=256)
    lengths = [len(ids) for ids in model.tokenizer.encode_ids(sentences)]
    useful_flops = sum(length * flops_per_token(model.encoder.config, length) for length in lengths)
    batch_rows = sum(sorted(lengths, reverse=True)[: args.batch_size])  # encode's token budget per batch
    peaks = measure_gemm_peaks(batch_rows)
    print(f"{args.corpus}: {len(sentences)} texts, {sum(lengths)} tokens, {useful_flops / 1e9:.1f} GFLOP of useful "
          f"work; batch {args.batch_size}; {args.threads} threads; torch {torch.__version__}\nCPU: "
          f"{cpu.describe_cpu().summary()}\nGEMM peak measured here (one encoder layer's Linears, {cpu.PROBE_ROWS} "
          f"and {batch_rows} rows): " + ", ".join(f"{name} {peaks[name]:.0f}" for name in peaks) + " G(FL)OP/s")
    choice = cpu.choose_precision()
    print(f"precision='auto' here: {choice.reason}")

    slow = [precision for precision in args.precisions if peaks["fp32"] / peaks[precision] > cpu.SLOW]
    paths = encode_paths(model, sentences, args, [p for p in args.precisions if p not in slow], choice)
    if not args.no_reference:
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(str(model.source_dir), device="cpu")
        reference.max_seq_length = model.max_seq_length
        paths[REFERENCE] = ("fp32", lambda texts: reference.encode(texts, batch_size=args.batch_size,
                                                                   convert_to_numpy=True))
    # Warm-up and memory on the longest texts (they hold encode's first, largest batch: the peak is the same).
    longest = sorted(range(len(sentences)), key=lambda index: -lengths[index])[: 2 * args.batch_size]
    warm_up = [sentences[index] for index in longest]
    measured = timed_in_turns({name: lambda fn=fn: fn(sentences) for name, (_, fn) in paths.items()}, args.repeats,
                              warm_up={name: lambda fn=fn: fn(warm_up) for name, (_, fn) in paths.items()})
    memory = {name: peak_tensor_mib(lambda fn=fn: fn(warm_up)) for name, (_, fn) in paths.items()}  # slows them

    print_table(paths, measured, memory, scores, useful_flops, peaks, len(sentences))
    if slow:
        fp32_rate = len(sentences) / statistics.median(measured["minilm fp32"][0]) if "minilm fp32" in measured \
            else None
        print_slow(model, sentences, args.batch_size, slow, peaks, fp32_rate)
    if REFERENCE in measured:
        print_ceiling(useful_flops, statistics.median(measured[REFERENCE][0]), peaks)


def encode_paths(model, sentences, args, precisions, choice) -> dict:
    """{name: (precision of its GEMMs, fn(texts) -> embeddings)} for minilm's rows of the table."""
    paths = {}
    for precision in precisions:
        if precision == "int8":
            paths["minilm int8"] = ("int8", int8_encoder(model, args.batch_size))
        else:
            paths[f"minilm {precision}"] = (precision, lambda texts, precision=precision: model.encode(
                texts, batch_size=args.batch_size, precision=precision))
        if precision == "fp32":
            paths[f"minilm fp32, fixed batches of {args.batch_size}"] = ("fp32", lambda texts: model.encode(
                texts, batch_size=args.batch_size, token_budget=False))
    paths[f"minilm auto (= {choice.precision})"] = (choice.precision, lambda texts: model.encode(
        texts, batch_size=args.batch_size, precision="auto"))
    return paths


def print_table(paths, measured, memory, scores, useful_flops, peaks, count) -> None:
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
        spearman = "-"
        if scores is not None:
            half = len(scores)
            metrics = similarity_metrics(torch.as_tensor(embeddings[:half]), torch.as_tensor(embeddings[half:]), scores)
            spearman = f"{metrics['spearman_cosine']:.4f}"
        print(f"| {name} | {count / seconds:.0f} | {ratio} | "
              f"{100 * useful_flops / seconds / 1e9 / peaks[precision]:.0f}% | {spearman} | "
              f"{difference} | {memory[name]:.1f} |")


def print_slow(model, sentences, batch_size, slow, peaks, fp32_rate) -> None:
    """Each precision that is slow here, timed once on a slice spread over the texts (as many as SLICE_SECONDS
    allow at its GEMM slowdown), beside minilm fp32 on the same slice."""
    print("\n| slow on this CPU (not in the rounds) | GEMM slowdown vs fp32 | texts timed | texts/s | x minilm fp32 "
          "on the same texts |")
    print("|---|---:|---:|---:|---:|")
    for precision in slow:
        factor = peaks["fp32"] / peaks[precision]
        count = max(8, min(len(sentences), int(SLICE_SECONDS * (fp32_rate or 100) / factor)))
        texts = sentences[:: max(1, len(sentences) // count)][:count]
        encode = int8_encoder(model, batch_size) if precision == "int8" else (
            lambda texts, precision=precision: model.encode(texts, batch_size=batch_size, precision=precision))
        seconds = {}
        for name, fn in (("fp32", lambda texts: model.encode(texts, batch_size=batch_size)), (precision, encode)):
            fn(texts[:2])  # the inference copy, made outside the timing
            start = time.perf_counter()
            fn(texts)
            seconds[name] = time.perf_counter() - start
        print(f"| minilm {precision} | {factor:.0f}x | {len(texts)} | {len(texts) / seconds[precision]:.0f} | "
              f"{seconds['fp32'] / seconds[precision]:.2f} |")


def print_ceiling(useful_flops: float, reference_seconds: float, peaks: dict) -> None:
    """No encode can beat useful FLOPs / the fastest GEMM rate: the most any precision can gain on this CPU.
    (The attention's FLOPs run in float in every precision, so the int8 bound is looser than it can reach.)"""
    reference_rate = useful_flops / reference_seconds / 1e9
    print(f"\nCeiling on this CPU ({cpu.describe_cpu().summary()}): sentence-transformers fp32 does "
          f"{reference_rate:.0f} GFLOP/s of useful work ({100 * reference_rate / peaks['fp32']:.0f}% of the fp32 GEMM "
          "peak). With every useful FLOP at 100% of a GEMM peak and nothing else taking time, an encode is at most "
          + ", ".join(f"{peaks[precision] / reference_rate:.1f}x it in {precision}" for precision in
                      ("fp32", "bf16", "int8")) + ".")


if __name__ == "__main__":
    main()
