"""Fine-tune a sentence-embedding model: one readable loop, configured by flags and optionally a recipe file.

    python train.py --loss cosine --data cosine.tsv --batch-size 16 --epochs 1 --lr 5e-5 --out runs/cosine
    python train.py --recipe recipes/002_binary_cosine.json --data ../shared/data/stsb --out runs/002
    python train.py --out runs/cosine --resume          # continue exactly where a stopped run left off

--data takes a TSV/CSV (header) or JSONL file with sentence-transformers' column names (anchor, positive
[, negative...] | sentence1, sentence2, score | premise, hypothesis, label), or a local benchmark: the STS-B
directory (../shared/data/stsb) or SICK.tsv. Several --data give round-robin batches, one dataset per batch.
A recipe is a JSON file of flag values (recipes/); flags on the command line override it.

Under torchrun (`torchrun --nproc_per_node=N train.py ...`) each process trains on its share of every global
batch of N x --batch-size rows; gradients are averaged across processes (DDP; nccl on CUDA, gloo on CPU), and
only rank 0 logs, evaluates, checkpoints and saves. Add --loss-params '{"gather_across_devices": true}' so that
in-batch-negative losses score each anchor against the positives of the whole global batch.

The run directory gets the model in sentence-transformers' layout, README.md (model card), log.jsonl (every
logged step and evaluation), loss.png (with matplotlib), and checkpoints/step-N (for --resume).
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import minilm
from minilm.losses import LOSSES, SoftmaxLoss
from minilm import data, evaluation, model_card

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="JSON file of flag values (see recipes/); command-line flags win")
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="base model: directory or hub id (default: %(default)s)")
    add("--loss", choices=sorted(LOSSES), help="training objective (required here or in the recipe)")
    add("--loss-params", type=json.loads, default={}, help='loss parameters as JSON, e.g. \'{"scale": 20}\'')
    add("--data", nargs="+", help="training data file(s) or benchmark location(s)")
    add("--split", default="train", help="split for benchmark data (default: train)")
    add("--min-score", type=float, default=0.8,
        help="for in-batch-negative losses on scored pairs: keep pairs scoring at least this (0..1; default 0.8)")
    add("--out", required=False, help="output directory")
    add("--overwrite", action="store_true", help="replace an existing output directory")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add("--batch-size", type=int, default=32)
    add("--epochs", type=float, default=1, help="passes over the data (ignored when --max-steps is set)")
    add("--max-steps", type=int, default=0, help="optimizer steps to run; 0: as many as --epochs gives")
    add("--lr", type=float, default=5e-5)
    add("--weight-decay", type=float, default=0.0)
    add("--warmup-ratio", type=float, default=0.0, help="fraction of steps with a linear warm-up")
    add("--warmup-steps", type=int, default=0, help="warm-up steps (overrides --warmup-ratio)")
    add("--max-grad-norm", type=float, default=1.0)
    add("--grad-accum", type=int, default=1, help="batches per optimizer step")
    add("--seed", type=int, default=42)
    add("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="autocast precision; auto: bf16 on CUDA when supported, else fp32")
    add("--max-seq-length", type=int, help="truncate inputs to this many tokens (default: the model's)")
    add("--normalize", choices=["keep", "yes", "no"], default="keep", help="add/remove the Normalize module")
    add("--eval-task", choices=evaluation.TASKS, help="evaluation during and after training")
    add("--eval-data", help="data for --eval-task (default: the first --data)")
    add("--eval-split", default="dev")
    add("--eval-steps", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    add("--log-steps", type=int, default=50)
    add("--save-steps", type=int, default=500, help="checkpoint every N steps (0: never)")
    add("--save-total-limit", type=int, default=2, help="checkpoints kept (oldest removed)")
    add("--device", default=None)
    add("--no-progress", action="store_true", help="no tqdm progress bar")

    args, _ = parser.parse_known_args(argv)
    if args.recipe:
        recipe = json.loads(Path(args.recipe).read_text())
        known = {action.dest for action in parser._actions}
        unknown = set(recipe) - known - {"description", "seed_card"}
        if unknown:
            parser.error(f"{args.recipe}: unknown keys {sorted(unknown)}")
        parser.set_defaults(**{key: value for key, value in recipe.items() if key in known})
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required")
    if not args.resume and (not args.loss or not args.data):
        parser.error("--loss and --data are required (or a --recipe that sets them)")
    return args


# --- data ------------------------------------------------------------------------------------------------------

def load_training_rows(location: str, split: str) -> list:
    path = Path(location)
    if path.is_dir() and (path / f"{split}.tsv").is_file():
        return data.load_stsb(path, split)
    if path.is_file() and path.name.lower().startswith("sick"):
        return data.load_sick(path, split)
    return data.read_dataset(path).rows


def columns_for_loss(rows: list, loss: str, min_score: float, source: str):
    """Pick the text columns and label column the loss needs; adapt scored pairs for in-batch negatives."""
    columns = set(rows[0]) if rows else set()
    if loss in ("mnrl", "cached-mnrl"):
        if {"anchor", "positive"} <= columns:
            negatives = sorted(c for c in columns if c.startswith("negative"))
            return rows, ["anchor", "positive", *negatives], None
        for first, second, score in (("sentence1", "sentence2", "score"), ("premise", "hypothesis", "score")):
            if {first, second} <= columns:
                if score in columns:
                    rows = [r for r in rows if r[score] >= min_score]
                return [{"anchor": r[first], "positive": r[second]} for r in rows], ["anchor", "positive"], None
    elif loss in ("cosine", "cosent"):
        for first, second in (("sentence1", "sentence2"), ("premise", "hypothesis")):
            if {first, second, "score"} <= columns:
                return rows, [first, second], "score"
    elif loss == "softmax":
        if {"premise", "hypothesis", "label"} <= columns:
            return rows, ["premise", "hypothesis"], "label"
        if {"sentence1", "sentence2", "label"} <= columns:
            return rows, ["sentence1", "sentence2"], "label"
    raise ValueError(f"{source}: columns {sorted(columns)} do not fit the {loss} loss "
                     f"(see `python train.py --help` for the column names each loss takes)")


def make_sampler(rows, columns, loss, batch_size, seed, drop_last):
    if loss in ("mnrl", "cached-mnrl"):  # a text twice in one batch would be its own in-batch negative
        return data.NoDuplicatesBatchSampler(rows, batch_size, seed=seed, drop_last=drop_last, columns=columns)
    return data.RandomBatchSampler(rows, batch_size, seed=seed, drop_last=drop_last)


# --- checkpoints -----------------------------------------------------------------------------------------------

def save_checkpoint(out: Path, model, loss_fn, optimizer, scheduler, scaler, state: dict, limit: int,
                    rank: int) -> None:
    """Write checkpoints/step-N atomically (a temporary directory renamed into place) and prune old ones.
    Every rank stores its random state there; rank 0 stores the rest (identical on all ranks)."""
    checkpoints = out / "checkpoints"
    final = checkpoints / f"step-{state['step']:07d}"
    partial = checkpoints / f".partial-{state['step']:07d}"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    torch.save(random_state(), partial / f"rng-rank{rank}.pt")
    barrier()
    if rank == 0:
        torch.save({"model": model.state_dict(), "loss": own_state(loss_fn), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "state": state},
                   partial / "training_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in sorted(checkpoints.glob("step-*"))[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def random_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_random_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def own_state(loss_fn) -> dict:
    """The loss's own weights (SoftmaxLoss's classifier), without the model it wraps."""
    return {key: value for key, value in loss_fn.state_dict().items() if not key.startswith("model.")}


def latest_checkpoint(out: Path):
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


# --- torch.distributed ------------------------------------------------------------------------------------------

def setup_distributed():
    """Join the process group when torchrun started us (WORLD_SIZE > 1). -> (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (itself outside torch.distributed)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- the run ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    rank, world = setup_distributed()
    if args.resume:
        checkpoint_dir = latest_checkpoint(out)
        if checkpoint_dir is None:
            sys.exit(f"train.py: --resume: no checkpoint in {out / 'checkpoints'}")
        saved_args = json.loads((out / "args.json").read_text())
        args = argparse.Namespace(**{**saved_args, "resume": True, "device": args.device,
                                     "no_progress": args.no_progress})
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.exit(f"train.py: {out} exists and is not empty: choose another --out, add --overwrite to replace "
                 f"it, or --resume to continue its run")
    try:
        return train(args, out, checkpoint_dir if args.resume else None, rank, world)
    except (data.DataError, FileNotFoundError, ValueError) as error:
        sys.exit(f"train.py: error: {error}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, out: Path, checkpoint_dir, rank: int, world: int) -> int:
    set_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    main_process = rank == 0
    model = minilm.load(args.model, device=device, max_seq_length=args.max_seq_length)
    if args.normalize != "keep":
        model.normalize = args.normalize == "yes"

    # Read and check all data before any training starts.
    datasets = []
    for location in args.data:
        rows = load_training_rows(location, args.split)
        if not rows:
            sys.exit(f"train.py: {location}: no training rows")
        rows, text_columns, label_column = columns_for_loss(rows, args.loss, args.min_score, location)
        datasets.append((location, rows, text_columns, label_column))
    loss_fn = LOSSES[args.loss](model, **args.loss_params).to(device)
    if world > 1:
        # The loss calls the wrapped model, so DDP averages the gradients of every backward pass.
        loss_fn.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    evaluator = None
    if args.eval_task:
        classifier = loss_fn.classifier if isinstance(loss_fn, SoftmaxLoss) else None
        evaluator = evaluation.for_task(args.eval_task, args.eval_data or args.data[0], args.eval_split, classifier)

    # Samplers draw global batches (world x batch size; only full ones under torchrun), each rank takes its slice.
    samplers = [make_sampler(rows, cols, args.loss, args.batch_size * world, args.seed, drop_last=world > 1)
                for _, rows, cols, _ in datasets]
    batches = data.RoundRobinBatches(samplers) if len(samplers) > 1 else samplers[0]
    steps_per_epoch = max(1, len(batches) // args.grad_accum)
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    warmup = args.warmup_steps or int(args.warmup_ratio * total_steps)

    # AdamW over the model and any weights the loss has (SoftmaxLoss's classifier). The fused kernel updates
    # each tensor in one pass: on the CPU a step takes ~15 ms instead of ~80 ms for MiniLM.
    loss_weights = [p for name, p in loss_fn.named_parameters() if not name.startswith("model.")]
    optimizer = torch.optim.AdamW(list(model.parameters()) + loss_weights, lr=args.lr,
                                  weight_decay=args.weight_decay, fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step / max(1, warmup) if step < warmup
        else max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "train_seconds": 0.0}
    if args.resume:
        saved = torch.load(checkpoint_dir / "training_state.pt", map_location=device, weights_only=False)
        restore_random_state(torch.load(checkpoint_dir / f"rng-rank{rank}.pt", weights_only=False))
        model.load_state_dict(saved["model"])
        loss_fn.load_state_dict({**loss_fn.state_dict(), **saved["loss"]})
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        if main_process:
            print(f"resuming from {checkpoint_dir} at step {state['step']}")
    elif main_process:
        if out.exists():  # --overwrite, and the data has been checked: only now is the old run removed
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    barrier()
    log_file = (out / "log.jsonl").open("a") if main_process else None

    def log(entry: dict) -> None:
        state["history"].append(entry)
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    def run_evaluation() -> dict:
        metrics = evaluator(model)
        model.train()
        log({"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4),
             **{f"eval_{key}": value for key, value in metrics.items()}})
        return metrics

    if main_process:
        print(f"training {args.loss} on {sum(len(d[1]) for d in datasets)} rows: {total_steps} steps of "
              f"{args.batch_size} x {args.grad_accum} x {world} process(es), {precision}, device {device}")
    progress = None
    if main_process and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    model.train()
    running_loss, running_count = 0.0, 0
    started = time.perf_counter() - state["train_seconds"]
    finished = state["step"] >= total_steps
    while not finished:
        batches.set_epoch(state["epoch"])
        for index, batch_indices in enumerate(batches):
            if index < state["batch_in_epoch"]:
                continue  # resumed mid-epoch: these batches were trained on already
            dataset_index, batch_indices = batch_indices if isinstance(batches, data.RoundRobinBatches) \
                else (0, batch_indices)
            batch_indices = batch_indices[rank * args.batch_size:(rank + 1) * args.batch_size]  # this rank's share
            _, rows, text_columns, label_column = datasets[dataset_index]
            features, labels = data.collate([rows[i] for i in batch_indices], text_columns, label_column,
                                            model.tokenize)
            features = [minilm.batch_to(f, device) for f in features]
            labels = labels.to(device) if labels is not None else None
            state["batch_in_epoch"] = index + 1
            accumulating = state["batch_in_epoch"] % args.grad_accum != 0
            # Between optimizer steps, DDP need not average gradients: the last micro-batch does it for all.
            no_sync = loss_fn.model.no_sync() if world > 1 and accumulating else contextlib.nullcontext()
            with no_sync:
                with autocast:
                    loss = loss_fn(features, labels)
                scaler.scale(loss / args.grad_accum).backward()
            loss_value = global_mean(loss.detach()).item()
            if not math.isfinite(loss_value):
                last = latest_checkpoint(out)
                sys.exit(f"train.py: the loss became {loss_value} at step {state['step']} (epoch {state['epoch']}); "
                         f"stopping. The last good checkpoint is {last or 'none (none was written yet)'}. Try a lower "
                         f"--lr, --precision fp32, or check the data.")
            running_loss += loss_value
            running_count += 1
            if accumulating:
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            step = state["step"]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % args.log_steps == 0 or step == total_steps:
                log({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": running_loss / running_count,
                     "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                     "seconds": round(time.perf_counter() - started, 2)})
                running_loss, running_count = 0.0, 0
            if main_process and evaluator and args.eval_steps and step % args.eval_steps == 0 and step < total_steps:
                run_evaluation()
            if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                state["train_seconds"] = time.perf_counter() - started
                save_checkpoint(out, model, loss_fn, optimizer, scheduler, scaler, state, args.save_total_limit,
                                rank)
            if step >= total_steps:
                finished = True
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    if progress is not None:
        progress.close()
    state["train_seconds"] = time.perf_counter() - started
    if not main_process:
        return 0

    final_metrics = run_evaluation() if evaluator else {}
    model.save(out)
    if isinstance(loss_fn, SoftmaxLoss):
        loss_fn.save(out)  # the classifier, for eval.py --task nli
    model_card.write(out, args=args, model=model, loss_fn=loss_fn, datasets=datasets, history=state["history"],
                     metrics=final_metrics, eval_name=evaluator.name if evaluator else None,
                     train_seconds=state["train_seconds"])
    log_file.close()
    print(f"saved to {out} after {state['step']} steps in {state['train_seconds']:.0f} s"
          + "".join(f"\n  {key}: {value:.4f}" for key, value in final_metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
