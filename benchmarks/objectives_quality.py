"""Issue 21's quality measures on real data: Matryoshka, prompts and distillation, minilm against sentence-transformers.

    python benchmarks/objectives_quality.py --experiments matryoshka prompts --seeds 42 1 2 --out runs/objectives
    python benchmarks/objectives_quality.py --experiments distill --seeds 42 --distill-texts 12000 \\
        --distill-steps 300 --out runs/objectives

Experiments (each run trains once per seed; finished runs and their scores are kept in OUT/results.json, so the
same command after an interruption runs only what is missing, and the same command with another --eval-precision
scores the kept models again without training them):
  matryoshka  recipe 000 (SciFact train, MNRL) for --epochs (default 1): train.py plain, train.py with
              --matryoshka-dims 384,256,128,64, and sentence-transformers' MatryoshkaLoss(MNRL) on the same rows
              (benchmarks/reference_retrieval_train.py). The batches are the same in both trainers (the same
              sampler, seed and order), but train.py's mnrl leaves a repeated abstract out of its own claim's
              negatives (mask_duplicates, its default) where sentence-transformers' MNRL counts it as one.
  matryoshka-no-duplicates
              the same three runs on batches without a repeated text (train.py's mnrl with mask_duplicates off,
              sentence-transformers' NO_DUPLICATES sampler): identical batches and the same loss in both, so the
              two trainers differ only by their dropout masks (a paired comparison).
  prompts     recipe 000 with --prompts '{"anchor": "query: ", "positive": "passage: "}' beside the plain run
              (the model keeps them as its "query" and "document" prompts, and the evaluator uses them).
  distill     recipe 005 (3 of the 6 layers, MSE toward the teacher's embeddings): train.py against
              sentence-transformers' MSELoss on the same student, texts and seed
              (benchmarks/reference_distill_train.py),
              for --distill-steps steps on --distill-texts texts of recipes/distill_sentences.py's file (0: all of
              them, the recipe's epochs).
Every trained model is scored by the same evaluator, eval.py (equal to sentence-transformers' to 1e-6): SciFact test
NDCG@10 at each Matryoshka size (--truncate-dim, one encode), and for distillation also STS-B test Spearman.
train.py's own evaluation is left out (the recipe is copied without it). --eval-precision (default fp32) is
eval.py's --precision; the table says which ran. Prints one markdown table per experiment: the mean and range over
the seeds, and each side's training seconds.
"""

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_quality import run  # noqa: E402  (a command, timed; exits naming it if it fails)

SHARED = REPO.parent / "shared" / "data"
DIMS = "384,256,128,64"
PROMPTS = '{"anchor": "query: ", "positive": "passage: "}'
NO_MASK = '{"scale": 20.0, "similarity": "cos", "mask_duplicates": false}'  # recipe 000's, with masking off
SCIFACT = ["--task", "retrieval", "--data", str(SHARED / "scifact"), "--split", "test", "--truncate-dim", DIMS]
STSB = ["--task", "stsb", "--data", str(SHARED / "stsb"), "--split", "test"]
# experiment -> {run name: (trainer, extra flags)}; "plain" is shared by matryoshka and prompts.
EXPERIMENTS = {
    "matryoshka": {"minilm-plain": ("minilm", []), "minilm-matryoshka": ("minilm", ["--matryoshka-dims", DIMS]),
                   "st-matryoshka": ("st", ["--matryoshka-dims", DIMS])},
    # The same three on batches without a repeated text, identical in both trainers (the same sampler, seed and
    # order); with nothing to mask, mnrl's mask_duplicates is off, so both losses are the same math.
    "matryoshka-no-duplicates": {
        "minilm-plain-nodup": ("minilm", ["--loss-params", NO_MASK]),
        "minilm-matryoshka-nodup": ("minilm", ["--loss-params", NO_MASK, "--matryoshka-dims", DIMS]),
        "st-matryoshka-nodup": ("st", ["--batch-sampler", "no_duplicates", "--matryoshka-dims", DIMS])},
    "prompts": {"minilm-plain": ("minilm", []), "minilm-prompts": ("minilm", ["--prompts", PROMPTS])},
    "distill": {"minilm-distill": ("minilm", []), "st-distill": ("st", [])},
}


def without_evaluation(recipe: str, out: Path) -> Path:
    """A copy of the recipe without its eval_* keys (every model is scored by eval.py afterwards), with its data
    paths made absolute."""
    settings = json.loads((REPO / recipe).read_text())
    settings = {key: value for key, value in settings.items() if not key.startswith("eval_")}
    settings["data"] = [str((REPO / location).resolve()) for location in settings["data"]]
    copy = out / Path(recipe).name.replace(".json", "-no-eval.json")
    copy.write_text(json.dumps(settings, indent=2) + "\n")
    return copy


def distill_texts(count: int, out: Path) -> Path:
    """recipes/distill_sentences.py's texts (made once), or `count` of them drawn with a fixed seed."""
    every = REPO / "runs" / "data" / "distill_sentences.txt"
    if not every.is_file():
        run([sys.executable, "recipes/distill_sentences.py", str(SHARED), "--out", str(every)])
    if not count:
        return every
    texts = every.read_text().splitlines()
    chosen = out / f"distill-texts-{count}.txt"
    if chosen.is_file():  # drawn by an earlier run: every run of every seed reads the same texts
        return chosen
    chosen.write_text("\n".join(random.Random(0).sample(texts, count)) + "\n")
    return chosen


def train(name: str, trainer: str, flags: list, experiment: str, seed: int, args, out: Path) -> dict:
    """Train one run -> {"seconds": wall seconds of the training process, "train_seconds": its training loop's}."""
    folder = out / f"{name}-{seed}"
    if experiment == "distill":
        recipe = without_evaluation("recipes/005_distill_3_layers.json", out)
        schedule = ["--max-steps", str(args.distill_steps)] if args.distill_steps else []
        data = ["--data", str(distill_texts(args.distill_texts, out))]
        reference = "benchmarks/reference_distill_train.py"
    else:
        recipe = without_evaluation("recipes/000_scifact_mnrl.json", out)
        schedule, data = ["--epochs", str(args.epochs)], []
        reference = "benchmarks/reference_retrieval_train.py"
    common = ["--recipe", str(recipe), *data, *schedule, "--seed", str(seed), "--out", str(folder), *flags]
    if trainer == "st":
        seconds, printed = run([sys.executable, reference, *common], last_json=True)
        return {"seconds": seconds, "train_seconds": printed["train_seconds"]}
    seconds = run([sys.executable, "train.py", *common, "--overwrite", "--no-progress", "--save-steps", "0"])
    steps = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"seconds": seconds, "train_seconds": steps[-1]["seconds"]}


def score(folder: Path, experiment: str, precision: str) -> dict:
    """eval.py's metrics of a saved model: SciFact test at every size, and for distillation STS-B test."""
    metrics = {}
    for task in [SCIFACT] + ([STSB] if experiment == "distill" else []):
        # beside the model (eval.py writes none into it), one file per precision
        kept = folder.with_name(f"{folder.name}-{task[1]}-{precision}.json")
        if not (kept.is_file() and kept.stat().st_mtime > (folder / "model.safetensors").stat().st_mtime):
            run([sys.executable, "eval.py", "--model", str(folder), *task, "--precision", precision,
                 "--json", str(kept)])  # else: scored after the model was saved, by an interrupted run
        written = json.loads(kept.read_text())
        metrics.update(written["metrics"])
        metrics["precision"] = written.get("precision", precision)
    return metrics


def scores_by_precision(results: dict) -> dict:
    """results.json as this script keeps it: {name: {seed: {"seconds", "train_seconds", "scores": {precision:
    metrics}}}}. Files written before scores were kept per precision held one set of metrics beside the timings,
    with the precision eval.py ran in them: moved under that precision."""
    for runs in results.values():
        for seed, entry in runs.items():
            if "scores" not in entry:
                timing = {key: entry.pop(key) for key in ("seconds", "train_seconds")}
                runs[seed] = {**timing, "scores": {entry["precision"]: entry}}
    return results


def table(experiment: str, results: dict, seeds: list, precision: str) -> None:
    names = list(EXPERIMENTS[experiment])
    columns = ["cosine_ndcg@10_dim" + dim for dim in DIMS.split(",")] if experiment != "distill" else [
        "cosine_ndcg@10_dim384", "spearman_cosine"]
    print(f"\n{experiment} (eval precision: {precision})")
    print("| run | seeds | " + " | ".join(columns) + " | training s |")
    print("|---|---|" + "---|" * len(columns) + "---|")
    for name in names:
        runs = [results[name][str(seed)] for seed in seeds
                if precision in results.get(name, {}).get(str(seed), {}).get("scores", {})]
        if not runs:
            continue

        def summary(key):
            values = [r["scores"][precision][key] for r in runs if key in r["scores"][precision]]
            if not values:
                return "-"
            return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"

        print(f"| {name} | {len(runs)} | " + " | ".join(summary(c) for c in columns)
              + f" | {statistics.mean(r['train_seconds'] for r in runs):.0f} |")


def resolved(precision: str) -> str:
    """The precision eval.py runs for --precision `precision` on this machine ("auto" is decided by the CPU)."""
    if precision != "auto":
        return precision
    from minilm import cpu

    return cpu.choose_precision().precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--epochs", type=float, default=1.0, help="matryoshka and prompts: epochs of recipe 000")
    parser.add_argument("--distill-texts", type=int, default=0, help="texts drawn for distill (0: all)")
    parser.add_argument("--distill-steps", type=int, default=0, help="steps of distill (0: the recipe's epochs)")
    parser.add_argument("--eval-precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--out", default=str(REPO / "runs" / "objectives"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    kept = out / "results.json"
    results = scores_by_precision(json.loads(kept.read_text()) if kept.is_file() else {})
    precision = resolved(args.eval_precision)
    for seed in args.seeds:  # seed by seed, so that an early stop still leaves comparable rows
        for experiment in args.experiments:
            for name, (trainer, flags) in EXPERIMENTS[experiment].items():
                entry = results.setdefault(name, {}).get(str(seed))
                if entry is None:
                    entry = {**train(name, trainer, flags, experiment, seed, args, out), "scores": {}}
                elif precision in entry["scores"]:
                    continue
                entry["scores"][precision] = score(out / f"{name}-{seed}", experiment, precision)
                results[name][str(seed)] = entry
                kept.write_text(json.dumps(results, indent=2) + "\n")
                print(f"{name} seed {seed} ({precision}): {json.dumps(entry)}", flush=True)
    settings = f"--epochs {args.epochs}" + (f"; distill: {args.distill_texts or 'all'} texts, "
                                            f"{args.distill_steps or 'the recipe'} steps"
                                            if "distill" in args.experiments else "")
    print(f"\n{settings}; seeds {args.seeds}")
    for experiment in args.experiments:
        table(experiment, results, args.seeds, precision)


if __name__ == "__main__":
    main()
