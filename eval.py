"""Evaluate a sentence-embedding model on a local benchmark and print (and optionally save) its metrics.

    python eval.py --model sentence-transformers/all-MiniLM-L6-v2 --task stsb --data ../shared/data/stsb
    python eval.py --model runs/cosine --task sick --data ../shared/data/sick/SICK.tsv --json metrics.json

Tasks:
  stsb      STS benchmark: Pearson/Spearman of cosine similarity vs gold scores (--data: the stsb directory)
  stsb-binary  STS-B pairs as similar (score >= 3/5) or not: binary-classification metrics
  sick      SICK relatedness: the same metrics on SICK's relatedness scores (--data: SICK.tsv)
  nli       SICK 3-way entailment: accuracy of the softmax classifier saved with a SoftmaxLoss model
  pairs     any TSV/CSV/JSONL with sentence1, sentence2, score (0..1): Pearson/Spearman
  binary    any file with sentence1, sentence2, label (0/1): accuracy, F1, precision, recall, AP, thresholds
  retrieval any file with anchor, positive: each anchor must find its positive among all positives
            (MRR@10, NDCG@10, Recall@k, MAP@100)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import minilm
from minilm.losses.softmax import SoftmaxLoss
from minilm import evaluation

SPLITS = {"stsb": ("train", "dev", "test"), "stsb-binary": ("train", "dev", "test"),
          "sick": ("train", "trial", "test"), "nli": ("train", "trial", "test")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory or a hub id")
    parser.add_argument("--task", required=True, choices=evaluation.TASKS)
    parser.add_argument("--data", required=True, help="the data file or directory of the task (see above)")
    parser.add_argument("--split", default="test", help="split of stsb/sick/nli (default: test)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)

    if args.task in SPLITS and args.split not in SPLITS[args.task]:
        parser.error(f"--split for {args.task} must be one of {SPLITS[args.task]}, not {args.split!r}")
    try:
        model = minilm.load(args.model, device=args.device)
        classifier = SoftmaxLoss.load_classifier(model.source_dir) if args.task == "nli" else None
        evaluator = evaluation.for_task(args.task, args.data, args.split, classifier=classifier)
    except (FileNotFoundError, ValueError) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return 2
    evaluator.batch_size = args.batch_size
    start = time.perf_counter()
    with torch.inference_mode():
        metrics = evaluator(model)
    seconds = time.perf_counter() - start

    print(f"{args.task} ({args.split}) with {args.model}, {seconds:.1f} s")
    for key, value in metrics.items():
        print(f"  {key:32s} {value:.4f}")
    if args.json:
        result = {"model": args.model, "task": args.task, "split": args.split, "metrics": metrics}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
