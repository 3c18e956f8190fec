"""Cached MNRL (GradCache) against plain MNRL on one large batch: peak memory, time per step, same loss.

    python benchmarks/bench_cached_mnrl.py                      # batch 256, mini-batches of 32, STS-B pairs
    python benchmarks/bench_cached_mnrl.py --batch-size 512 --mini-batch-sizes 16 64

Each variant runs in a fresh process (so one's memory never counts against the other): load the real
all-MiniLM-L6-v2, take `--batch-size` (anchor, positive) pairs from STS-B train, and run `--steps` training steps
(forward, backward, AdamW) on the same batch, dropout off. It reports the median step time, the loss of the first step (the
variants must agree: same loss, same gradients), and peak memory: on CUDA torch.cuda.max_memory_allocated, on the
CPU the process's peak RSS and its rise over the RSS just before the first step (the activations, gradients and
optimizer state, not the interpreter and weights that both variants hold anyway).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_variant(args) -> dict:
    """One variant, in this process: the child side."""
    import torch

    import minilm
    from losses import LOSSES
    from minilm.data import load_stsb

    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = minilm.load(args.model, device=device)
    model.train()
    for module in model.modules():  # dropout off, so that the variants' losses compare exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_p"):
            module.dropout_p = 0.0  # attention-probability dropout
    pairs = [row for row in load_stsb(args.data, "train") if row["score"] >= 0.8][: args.batch_size]
    if len(pairs) < args.batch_size:
        sys.exit(f"only {len(pairs)} STS-B train pairs score >= 4/5; ask for a smaller --batch-size")
    features = [model.tokenize([row[column] for row in pairs]) for column in ("sentence1", "sentence2")]
    features = [{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
                for batch in features]
    if args.variant == "plain":
        loss_fn = LOSSES["mnrl"](model)
    else:
        loss_fn = LOSSES["cached-mnrl"](model, mini_batch_size=args.mini_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    rss_before = current_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = loss_fn(features)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    result = {"variant": args.variant, "mini_batch_size": args.mini_batch_size if args.variant == "cached" else None,
              "seconds_per_step": statistics.median(times), "first_loss": losses[0]}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        result.update(peak_mib=peak, rise_mib=peak - rss_before)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "stsb"), help="STS-B directory")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--mini-batch-sizes", type=int, nargs="+", default=[32], help="cached MNRL mini-batches")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["plain", "cached"], help=argparse.SUPPRESS)  # the child side
    parser.add_argument("--mini-batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    common = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--batch-size",
              str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads)]
    rows = []
    for variant, mini in [("plain", None)] + [("cached", size) for size in args.mini_batch_sizes]:
        command = common + ["--variant", variant] + (["--mini-batch-size", str(mini)] if mini else [])
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"{variant:>6} done: {rows[-1]}", file=sys.stderr)

    plain = rows[0]
    cpu = "rise_mib" in plain
    memory = "rise_mib" if cpu else "peak_mib"
    print(f"\nMNRL, batch {args.batch_size} pairs ({2 * args.batch_size} sentences), all-MiniLM-L6-v2, "
          f"{'CPU, %d threads' % args.threads if cpu else 'CUDA'}\n")
    print("| loss | mini-batch | s/step | time vs plain | first-step loss | peak MiB | memory rise MiB | rise vs plain |"
          if cpu else "| loss | mini-batch | s/step | time vs plain | first-step loss | peak MiB | vs plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" if cpu else "|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        name = "MNRL" if row["variant"] == "plain" else "cached MNRL"
        cells = [name, str(row["mini_batch_size"] or "-"), f"{row['seconds_per_step']:.2f}",
                 f"{row['seconds_per_step'] / plain['seconds_per_step']:.2f}x", f"{row['first_loss']:.6f}",
                 f"{row['peak_mib']:.0f}"]
        if cpu:
            cells.append(f"{row['rise_mib']:.0f}")
        cells.append(f"{row[memory] / plain[memory]:.2f}x")
        print("| " + " | ".join(cells) + " |")
    worst = max(abs(row["first_loss"] - plain["first_loss"]) for row in rows)
    print(f"\nlargest first-step loss difference from plain MNRL: {worst:.1e}")


if __name__ == "__main__":
    main()
