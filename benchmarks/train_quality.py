"""Does train.py train as well as sentence-transformers' trainer? The same two recipes, full epochs, both tools.

    python benchmarks/train_quality.py --data ../shared/data/stsb --out runs/quality

Recipes (issue 3): CosineSimilarityLoss bs 16 on STS-B train (score / 5); MultipleNegativesRankingLoss bs 32 on
STS-B train pairs scoring >= 4/5; 1 epoch, lr 5e-5, seed 42. Each saved model is loaded in
sentence-transformers and scored on STS-B test (Spearman of cosine). Prints a table with the wall time of each run.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"cosine": ["--loss", "cosine", "--batch-size", "16"], "mnrl": ["--loss", "mnrl", "--batch-size", "32"]}


def sts_test_spearman(model_dir: Path, data: str) -> float:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    sys.path.insert(0, str(REPO))
    from minilm.data import load_stsb

    rows = load_stsb(data, "test")
    evaluator = EmbeddingSimilarityEvaluator([r["sentence1"] for r in rows], [r["sentence2"] for r in rows],
                                             [r["score"] for r in rows], name="sts-test", write_csv=False)
    return evaluator(SentenceTransformer(str(model_dir), device="cpu"))["sts-test_spearman_cosine"]


def run(command: list, last_json: bool = False):
    """Run a command, exiting with its name and stderr if it fails -> its wall seconds, or with last_json
    (wall seconds, its last stdout line read as JSON)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    return (seconds, json.loads(result.stdout.strip().splitlines()[-1])) if last_json else seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "stsb"))
    parser.add_argument("--out", default=str(REPO / "runs" / "quality"))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for name in args.recipes:
        ours, theirs = out / f"minilm-{name}", out / f"st-{name}"
        ours_seconds = run([sys.executable, "train.py", *RECIPES[name], "--data", args.data, "--epochs", "1",
                            "--lr", "5e-5", "--seed", "42", "--out", str(ours), "--overwrite", "--no-progress"])
        theirs_seconds = run([sys.executable, "benchmarks/reference_train.py", *RECIPES[name], "--data", args.data,
                              "--out", str(theirs)])
        results[name] = {"minilm_spearman": sts_test_spearman(ours, args.data), "minilm_seconds": ours_seconds,
                         "st_spearman": sts_test_spearman(theirs, args.data), "st_seconds": theirs_seconds}
    print("\n| recipe | train.py STS-B test Spearman | sentence-transformers | difference | train.py s | ST s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['minilm_spearman']:.4f} | {r['st_spearman']:.4f} | "
              f"{r['minilm_spearman'] - r['st_spearman']:+.4f} | {r['minilm_seconds']:.0f} | {r['st_seconds']:.0f} |")
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
