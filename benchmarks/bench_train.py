"""Training speed: train.py vs sentence-transformers' trainer, same data, same steps, same machine, one run.

    python benchmarks/bench_train.py                  # MNRL bs 32 and cosine bs 16, 40 steps each, 2 threads

Each run is a separate process, timed whole (start-up, model load, data, training, save). Prints pairs/s of the
training loop, whole-process seconds, peak RSS, and train.py's ratio to the reference.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"mnrl": 32, "cosine": 16}

# train.py run in-process by a wrapper that reports what the reference script reports.
WRAPPER = """
import json, resource, runpy, sys, time
started = time.perf_counter()
sys.argv = ["train.py"] + sys.argv[1:]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as stop:
    if stop.code:
        raise
print(json.dumps({"wall_seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run(command: list, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return last_json_line(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "stsb"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for loss in args.losses:
            batch = CONFIGS[loss]
            common = ["--loss", loss, "--data", args.data, "--batch-size", str(batch), "--max-steps", str(args.steps)]
            ours_dir = Path(scratch) / f"minilm-{loss}"
            ours = run([sys.executable, "-c", WRAPPER, *common, "--out", str(ours_dir), "--no-progress",
                        "--save-steps", "0", "--log-steps", str(args.steps)], args.threads)
            log = [json.loads(line) for line in (ours_dir / "log.jsonl").read_text().splitlines()]
            ours["pairs_per_second"] = args.steps * batch / log[-1]["seconds"]
            theirs = run([sys.executable, "benchmarks/reference_train.py", *common,
                          "--out", str(Path(scratch) / f"st-{loss}")], args.threads)
            rows.append((loss, batch, ours, theirs))

    print(f"\n{args.steps} steps, {args.threads} threads, fp32, CPU\n")
    print("| loss | batch | train.py pairs/s | ST trainer pairs/s | x | train.py process s | ST process s | x "
          "| train.py peak RSS MB | ST peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for loss, batch, ours, theirs in rows:
        print(f"| {loss} | {batch} | {ours['pairs_per_second']:.1f} | {theirs['pairs_per_second']:.1f} | "
              f"{ours['pairs_per_second'] / theirs['pairs_per_second']:.2f} | {ours['wall_seconds']:.1f} | "
              f"{theirs['wall_seconds']:.1f} | {theirs['wall_seconds'] / ours['wall_seconds']:.2f} | "
              f"{ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
