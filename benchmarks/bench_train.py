"""Training speed: train.py vs sentence-transformers' trainer, same data, same steps, same machine, one run.

    python benchmarks/bench_train.py                  # MNRL bs 32 and cosine bs 16, 40 steps each, 2 threads
    python benchmarks/bench_train.py --precision bf16 --losses mnrl
    python benchmarks/bench_train.py --losses scifact  # MNRL on SciFact (claim, abstract), 512 tokens, bs 16

Each run is a separate process, timed whole (start-up, model load, data, training, save). Prints pairs/s of the
training loop, whole-process seconds, peak RSS, and train.py's ratio to the reference. --precision bf16 is
train.py's --precision bf16 and the reference trainer's bf16=True (autocast on the CPU, both).
The scifact case trains MNRL on SciFact's 919 train (claim, abstract) pairs (title + " " + text), written to a
temporary JSONL that both read, truncated at 512 tokens: long inputs, where attention and padding cost most.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# case -> (train.py --loss, batch size, max_seq_length or None for the model's)
CONFIGS = {"mnrl": ("mnrl", 32, None), "cosine": ("cosine", 16, None), "scifact": ("mnrl", 16, 512)}


def scifact_pairs(scifact: Path, target: Path) -> Path:
    """SciFact's train qrels as (claim, abstract) pairs, in a JSONL file that train.py and the reference read."""
    claims = {row["_id"]: row["text"] for row in map(json.loads, (scifact / "queries.jsonl").open(encoding="utf-8"))}
    abstracts = {row["_id"]: f"{row['title']} {row['text']}"
                 for row in map(json.loads, (scifact / "corpus.jsonl").open(encoding="utf-8"))}
    lines = (scifact / "qrels" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    with target.open("w", encoding="utf-8") as out:
        for query, document, _ in (line.strip().split("\t") for line in lines if line.strip()):
            out.write(json.dumps({"anchor": claims[query], "positive": abstracts[document]}) + "\n")
    return target

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
    parser.add_argument("--scifact", default=str(REPO.parent / "shared" / "data" / "scifact"),
                        help="SciFact in BEIR layout, for the scifact case")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both trainers")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=["mnrl", "cosine"], choices=list(CONFIGS),
                        help="cases to run (default: mnrl cosine)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for loss in args.losses:
            loss_name, batch, max_seq_length = CONFIGS[loss]
            data = str(scifact_pairs(Path(args.scifact), Path(scratch) / "scifact.jsonl")) if loss == "scifact" \
                else args.data
            common = ["--loss", loss_name, "--data", data, "--batch-size", str(batch), "--max-steps",
                      str(args.steps), "--precision", args.precision]
            if max_seq_length:
                common += ["--max-seq-length", str(max_seq_length)]
            ours_dir = Path(scratch) / f"minilm-{loss}"
            ours = run([sys.executable, "-c", WRAPPER, *common, "--out", str(ours_dir), "--no-progress",
                        "--save-steps", "0", "--log-steps", str(args.steps)], args.threads)
            log = [json.loads(line) for line in (ours_dir / "log.jsonl").read_text().splitlines()]
            ours["pairs_per_second"] = args.steps * batch / log[-1]["seconds"]
            theirs = run([sys.executable, "benchmarks/reference_train.py", *common,
                          "--out", str(Path(scratch) / f"st-{loss}")], args.threads)
            rows.append((loss, batch, ours, theirs))

    print(f"\n{args.steps} steps, {args.threads} threads, {args.precision}, CPU\n")
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
