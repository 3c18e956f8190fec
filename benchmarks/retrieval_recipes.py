"""minilm's train.py vs sentence-transformers' trainer on the retrieval seed recipes, on real data.

    python benchmarks/retrieval_recipes.py --max-steps 60 --seeds 42 --out runs/retrieval-recipes
    python benchmarks/retrieval_recipes.py --toy --max-steps 2 --out runs/retrieval-toy   # the pipeline, in minutes

Recipes (recipes/): 000 SciFact (claim -> abstract, max_seq_length 512, no Normalize; NDCG@10 on SciFact test),
the same with one hard negative per pair mined by mine.py with the untouched model (scifact-hard),
001 Quora (duplicates, a fixed 10% held out by recipes/split_pairs.py; NDCG@10, each held-out question against
all held-out questions), 003 SNLI (SoftmaxLoss trained on SNLI dev; accuracy on SNLI test). Both trainers get
the same rows (minilm's readers), the recipe's hyperparameters, the same seed and the same schedule (the recipe's
epochs, or --epochs/--max-steps for both); both models are scored by the same evaluator (minilm's, equal to
sentence-transformers' to 1e-6: tests/test_retrieval.py), train.py's at the end of its run, the reference's by
eval.py. --toy: the same pipeline on small slices of the data (SciFact 300 documents, 200 SNLI pairs), to check
the script, not the models. Finished runs are kept in OUT/results.json, so the same command after an
interruption runs only what is missing. Prints a markdown table (mean and range over seeds, seconds of each run).
"""

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_quality import run  # noqa: E402  (a command, timed; exits naming it if it fails)

SHARED = REPO.parent / "shared" / "data"
RECIPES = {"scifact": ("recipes/000_scifact_mnrl.json", "cosine_ndcg@10"),
           "scifact-hard": ("recipes/000_scifact_mnrl_hard_negatives.json", "cosine_ndcg@10"),
           "quora": ("recipes/001_quora_mnrl.json", "cosine_ndcg@10"),
           "snli": ("recipes/003_snli_softmax.json", "accuracy")}


def toy_data(out: Path) -> dict:
    """Small slices of the real data, in the same layouts: {recipe: (train data, eval data)}."""
    sys.path.insert(0, str(REPO))
    from minilm import evaluation

    scifact = out / "scifact"
    (scifact / "qrels").mkdir(parents=True, exist_ok=True)
    corpus = evaluation.read_corpus(SHARED / "scifact" / "corpus.jsonl")
    queries = evaluation.read_queries(SHARED / "scifact" / "queries.jsonl")
    keep_docs, keep_queries = set(), set()
    for split, count in (("train", 48), ("test", 20)):
        relevant = evaluation.read_qrels(SHARED / "scifact" / "qrels" / f"{split}.tsv", queries, corpus)
        chosen = list(relevant.items())[:count]
        keep_queries |= {q for q, _ in chosen}
        keep_docs |= {d for _, docs in chosen for d in docs}
        (scifact / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, docs in chosen for d in docs))
    keep_docs |= set(sorted(corpus)[:300 - len(keep_docs)])
    (scifact / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": corpus[d]}) + "\n"
                                                  for d in sorted(keep_docs)))
    (scifact / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": queries[q]}) + "\n"
                                                   for q in sorted(keep_queries)))
    snli = out / "snli"
    snli.mkdir(exist_ok=True)
    for split in ("dev", "test"):
        with gzip.open(SHARED / "snli" / f"snli_1.0_{split}.jsonl.gz", "rt") as lines:
            head = [next(lines) for _ in range(200)]
        with gzip.open(snli / f"snli_1.0_{split}.jsonl.gz", "wt") as written:
            written.writelines(head)
    quora = out / "quora"
    (quora / "duplicates.tsv").parent.mkdir(exist_ok=True)
    quora_lines = (SHARED / "quora" / "duplicates.tsv").read_text().splitlines()[:301]
    (quora / "duplicates.tsv").write_text("\n".join(quora_lines) + "\n")
    run([sys.executable, "recipes/split_pairs.py", str(quora / "duplicates.tsv"), "--out", str(quora)])
    mine_hard_negatives(str(scifact), out / "scifact-hard-negatives.jsonl")
    return {"scifact": ([str(scifact)], str(scifact)),
            "scifact-hard": ([str(out / "scifact-hard-negatives.jsonl")], str(scifact)), "quora": ([str(quora / "train.tsv")], str(quora / "test")),
            "snli": ([str(snli / "snli_1.0_dev.jsonl.gz")], str(snli / "snli_1.0_test.jsonl.gz"))}


def mine_hard_negatives(folder: str, out: Path) -> None:
    """SciFact train pairs with one mined negative each (the command in recipe 000_scifact_mnrl_hard_negatives),
    mined by the untouched model once, shared by both trainers."""
    if not out.is_file():
        run([sys.executable, "mine.py", "--model", "sentence-transformers/all-MiniLM-L6-v2", "--data", folder,
             "--split", "train", "--corpus", str(Path(folder) / "corpus.jsonl"), "--num-negatives", "1",
             "--range-min", "3", "--range-max", "50", "--relative-margin", "0.05", "--max-seq-length", "512",
             "--out", str(out)])


def training_seconds(run_dir: Path) -> float:
    """train.py's seconds of training (its last step's log line), without loading and the final evaluation."""
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    return steps[-1]["seconds"]


def final_metrics(run_dir: Path) -> dict:
    evaluations = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
                   if '"eval_' in line]
    return {key.removeprefix("eval_"): value for key, value in evaluations[-1].items() if key.startswith("eval_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--epochs", type=float, help="for both trainers (default: each recipe's)")
    parser.add_argument("--max-steps", type=int, default=0, help="for both trainers (0: the epochs)")
    parser.add_argument("--toy", action="store_true", help="small slices of the data: check the pipeline")
    parser.add_argument("--out", default=str(REPO / "runs" / "retrieval-recipes"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.toy:
        locations = toy_data(out / "toy-data")
    else:
        if "quora" in args.recipes and not (REPO / "runs/data/quora/train.tsv").is_file():
            run([sys.executable, "recipes/split_pairs.py", str(SHARED / "quora" / "duplicates.tsv"),
                 "--out", "runs/data/quora"])
        if "scifact-hard" in args.recipes:
            (REPO / "runs" / "data").mkdir(parents=True, exist_ok=True)
            mine_hard_negatives(str(SHARED / "scifact"), REPO / "runs/data/scifact-hard-negatives.jsonl")
        locations = {}
    schedule = (["--max-steps", str(args.max_steps)] if args.max_steps else []) + (
        ["--epochs", str(args.epochs)] if args.epochs else [])
    # Finished runs are kept: the same command after an interruption runs only what is missing.
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    for name in args.recipes:
        recipe, metric = RECIPES[name]
        task = json.loads((REPO / recipe).read_text())["eval_task"]
        data_flags, eval_data = [], json.loads((REPO / recipe).read_text())["eval_data"]
        if name in locations:
            data_flags, eval_data = ["--data", *locations[name][0]], locations[name][1]
        for seed in args.seeds:
            if any(r["seed"] == seed for r in results.get(name, [])):
                continue
            ours, theirs = out / f"minilm-{name}-{seed}", out / f"st-{name}-{seed}"
            ours_seconds = run([sys.executable, "train.py", "--recipe", recipe, *data_flags, *schedule,
                                "--eval-data", eval_data, "--seed", str(seed), "--out", str(ours), "--overwrite",
                                "--no-progress", "--save-steps", "0"])
            theirs_seconds, theirs_run = run([sys.executable, "benchmarks/reference_retrieval_train.py",
                                              "--recipe", recipe, *data_flags, *schedule, "--seed", str(seed),
                                              "--out", str(theirs)], last_json=True)
            split = ["--split", "test"] if Path(eval_data).is_dir() else []  # a file (SNLI's test) is its split
            run([sys.executable, "eval.py", "--model", str(theirs), "--task", task, "--data", eval_data, *split,
                 "--json", str(theirs / "metrics.json")])
            theirs_metrics = json.loads((theirs / "metrics.json").read_text())["metrics"]
            results.setdefault(name, []).append({
                "seed": seed, "minilm": final_metrics(ours)[metric], "st": theirs_metrics[metric],
                "minilm_seconds": ours_seconds, "st_seconds": theirs_seconds,
                "minilm_train_seconds": training_seconds(ours), "st_train_seconds": theirs_run["train_seconds"]})
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nschedule: {' '.join(schedule) or 'each recipe as written'}; seeds {args.seeds}"
          + ("; TOY data" if args.toy else ""))
    print("| recipe | metric | seeds | train.py mean (range) | sentence-transformers mean (range) | "
          "training s: train.py / ST | process s: train.py (with its final evaluation) / ST |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        runs = [r for r in runs if r["seed"] in args.seeds]
        if name not in args.recipes or not runs:
            continue

        def summary(key):
            values = [r[key] for r in runs]
            return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"

        def seconds(key):
            values = [r[key] for r in runs if r.get(key) is not None]
            return f"{statistics.mean(values):.0f}" if values else "-"

        print(f"| {name} | {RECIPES[name][1]} | {len(runs)} | {summary('minilm')} | {summary('st')} | "
              f"{seconds('minilm_train_seconds')} / {seconds('st_train_seconds')} | "
              f"{seconds('minilm_seconds')} / {seconds('st_seconds')} |")


if __name__ == "__main__":
    main()
