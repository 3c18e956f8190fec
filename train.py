"""Fine-tune a sentence-embedding model: one readable loop, configured by flags and optionally a recipe file.

    python train.py --loss cosine --data cosine.tsv --batch-size 16 --epochs 1 --lr 5e-5 --out runs/cosine
    python train.py --recipe recipes/002_binary_cosine.json --data ../shared/data/stsb --out runs/002
    python train.py --out runs/cosine --resume          # continue exactly where a stopped run left off
    torchrun --nproc_per_node=N train.py ...            # DDP: each process trains on its share of every batch

--data: TSV/CSV (header), JSONL or (--loss mse) text files with sentence-transformers' column names, the STS-B
folder, SICK.tsv or a BEIR folder, each row checked before training against what the loss reads (docs/losses.md).
A recipe (recipes/) is a JSON file of flag values, checked as flags are; command-line flags win. Under torchrun rank
0 alone logs, evaluates, saves. The run folder gets the model, README.md (model card), log.jsonl, loss.png,
checkpoints/ (for --resume) and minilm-run.json (the files it wrote); --overwrite replaces a previous minilm run
(only) once the new run succeeds. Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and says how to resume.
"""

import argparse
import contextlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import minilm
from minilm import best_model, checkpoint as checkpoints, data, evaluation, fast_paths, model_card, training_data
from minilm.distributed import any_rank, barrier, global_mean, setup_distributed, tear_down
from minilm.errors import (InputError, Parser, UsageError, any_float, blamed_on, comma_list, fraction, json_object,
                           non_negative_float, non_negative_int, positive_float, positive_int, seed)
from minilm.model import PRECISIONS, resolve_device
from minilm.optimizer import clip_gradients, parameter_groups
from minilm.run_folder import RunFolderError, check_output, finish_run_folder, save_started
from losses import LOSSES, MatryoshkaLoss, check_loss_params

RECIPE_NOTES = ("description", "seed_card")  # recipe keys that document, not configure


# --- flags -----------------------------------------------------------------------------------------------------

def build_parser(explicit_only: bool = False) -> Parser:
    """train.py's flags. explicit_only: no defaults, so that parsing tells which flags were given."""
    parser = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(*names, default=None, **kwargs):
        if default is not None and default is not False and default != {} and "default" not in kwargs.get("help", ""):
            kwargs["help"] = (kwargs.get("help", "") + " (default: %(default)s)").lstrip()  # --help shows it
        parser.add_argument(*names, default=argparse.SUPPRESS if explicit_only else default, **kwargs)

    add("--recipe", help="JSON file of flag values (see recipes/); command-line flags win")
    add("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="base model: directory or hub id")
    add("--loss", choices=sorted(LOSSES), help="training objective (required here or in the recipe)")
    add("--loss-params", type=json_object, default={}, help='loss parameters as JSON, e.g. \'{"scale": 20}\'')
    add("--data", nargs="+", help="training data file(s) or benchmark location(s)")
    add("--split", default="train", help="split for benchmark data (default: train)")
    add("--multi-dataset", choices=sorted(data.MULTI_DATASET), default="proportional", help="several --data: every "
        "batch of each an epoch, interleaved at random; round_robin: one of each in turn until the smallest runs out")
    add("--score-scale", type=positive_float, default=1.0, help="divide every score by this: 5 for 0..5 STS scores")
    add("--min-score", type=any_float, default=0.8, help="losses without labels: keep the scored pairs scoring >= this")
    add("--prompts", help='prefix of each text column, as JSON (\'{"anchor": "query: "}\'), or one for all')
    add("--matryoshka-dims", type=comma_list(positive_int), metavar="D,...", help="Matryoshka sizes: 384,128,64")
    add("--matryoshka-weights", type=comma_list(positive_float), metavar="W,...", help="a weight per size (default 1)")
    add("--teacher", metavar="MODEL", help="distillation (--loss mse): the model whose embeddings the student learns")
    add("--layers", type=comma_list(non_negative_int), metavar="L,...", help="a student of these layers of --model")
    add("--out", help="output folder: new or empty (or a previous minilm run with --overwrite / --resume)")
    add("--overwrite", action="store_true", help="replace a previous minilm run (only) in --out once this run succeeds")
    add("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add("--batch-size", type=positive_int, default=32, help="rows per batch (per process under torchrun)")
    add("--epochs", type=positive_float, default=1, help="passes over the data (ignored when --max-steps is set)")
    add("--max-steps", type=non_negative_int, default=0, help="optimizer steps to run; 0: as many as --epochs gives")
    add("--lr", type=positive_float, default=5e-5, help="peak learning rate (AdamW, linear decay)")
    add("--weight-decay", type=non_negative_float, default=0.0, help="AdamW's decoupled weight decay")
    add("--warmup-ratio", type=fraction, default=0.0, help="fraction of steps with a linear warm-up")
    add("--warmup-steps", type=non_negative_int, default=0, help="warm-up steps (overrides --warmup-ratio)")
    add("--max-grad-norm", type=positive_float, default=1.0, help="clip the model's gradient norm to this")
    add("--grad-accum", type=positive_int, default=1, help="batches per optimizer step")
    add("--seed", type=seed, default=42, help="seed of the shuffling, dropout and any new weights")
    add("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="training's autocast; auto: "
        "bf16 on CUDA when supported, else fp32 (the CPU's fastest precision is for --eval-precision auto)")
    add("--max-seq-length", type=positive_int, help="truncate inputs to this many tokens (default: the model's)")
    add("--normalize", choices=["keep", "yes", "no"], default="keep", help="add/remove the Normalize module")
    add("--eval-task", choices=evaluation.TASKS, help="evaluation during and after training")
    add("--eval-data", help="data for --eval-task (default: the first --data)")
    add("--eval-split", default="dev", help="split of the --eval-data (SICK: dev is its trial split)")
    add("--keep-self-matches", action="store_true", help="retrieval: count a judged document with the query's id")
    add("--eval-precision", choices=[*PRECISIONS, "auto"], default="fp32", help="the evaluations' encode, as "
        "eval.py --precision; auto: the fastest here within measured quality bands (logged once, with why)")
    add("--eval-steps", type=non_negative_int, default=0, help="evaluate every N steps (0: only at the end)")
    add("--metric-for-best", metavar="NAME", help="the metric that picks the best evaluation (default: the main one)")
    add("--load-best", action="store_true", help="save the whole model of the best evaluation, not the last step's")
    add("--early-stopping-patience", type=non_negative_int, default=0, metavar="N",
        help="stop after N evaluations in a row not better than the best (default: 0, never)")
    add("--log-steps", type=positive_int, default=50, help="log the mean loss every N steps")
    add("--save-steps", type=non_negative_int, default=500, help="checkpoint every N steps (0: never)")
    add("--save-total-limit", type=positive_int, default=2, help="checkpoints kept (oldest removed)")
    add("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    add("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def parse_args(argv=None) -> tuple:
    """-> (args, the names of the flags given on the command line or in the recipe)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(build_parser(explicit_only=True).parse_args(argv))
    if args.recipe:
        if args.resume:
            raise UsageError("--recipe with --resume: a resumed run keeps its own settings; give only --out "
                             "and --resume (and flags that may change, such as --max-steps)")
        recipe = parser.values_from_json(args.recipe, "--recipe", ignored=RECIPE_NOTES, refused=("recipe", "resume"))
        given = {**recipe, **given}
        args = argparse.Namespace(**{**vars(args), **given})
    given.pop("recipe", None)
    if not args.out:
        raise UsageError("--out is required: the folder the run writes into (or, with --resume, the run's folder)")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite: one continues the run in --out, the other starts anew; choose one")
    return args, given


def check_args(args, world: int = 1) -> torch.device:
    """Checks across flags (each flag's values are checked by its type), a recipe's and a resumed run's -> device"""
    missing = [flag for flag, value in (("--loss", args.loss), ("--data", args.data)) if not value]
    if missing:
        recipe = f"the --recipe {args.recipe}" if args.recipe else "a --recipe"
        raise UsageError(f"{' and '.join(missing)} {'are' if missing[1:] else 'is'} required (here or in {recipe})")
    with blamed_on("", InputError):
        fast_paths.check_environment()
    loss_class = LOSSES[args.loss]
    with blamed_on(f"--loss-params {json.dumps(args.loss_params)}", ValueError):  # before anything is loaded
        check_loss_params(args.loss, args.loss_params)
    if loss_class.in_batch_negatives and args.batch_size * world < 2:
        raise UsageError(f"--batch-size {args.batch_size}: the {args.loss} loss contrasts at least 2 rows in a batch")
    with blamed_on(f"--device {args.device}", InputError):
        device = resolve_device(args.device)
    if args.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16: float16 training needs CUDA; use bf16 or fp32 on the CPU")
    best_model.check_flags(args)
    training_data.check_flags(args, loss_class)
    return device


# --- setting up ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop works with: set_up makes it, train and save use it."""
    args: argparse.Namespace
    rank: int
    world: int
    folder: Path
    data: training_data.TrainingData
    model: minilm.SentenceEncoder
    loss_fn: torch.nn.Module
    evaluator: object  # from minilm.evaluation.for_task, or None
    batches: object  # data.ProportionalBatches or data.RoundRobinBatches: (dataset index, row indices)
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: str  # fp32, bf16 or fp16: what the forward passes compute in (autocast)
    scaler: torch.amp.GradScaler  # scales fp16 losses; does nothing otherwise
    state: dict  # step, epoch, batch_in_epoch, history, train_seconds (and a resumed run's running loss)
    best: best_model.BestModel  # the best evaluation so far: its model for --load-best, its count for early stopping
    settings: dict  # the flags as the run was started: checkpoints hold them, the model card shows them
    started_in: str  # the folder the path flags are relative to
    started: float = 0.0  # time.perf_counter() when training started, less the seconds trained before a resume


def set_up(args, given: dict, rank: int, world: int, held: contextlib.ExitStack) -> Run:
    """Check, read and load everything first; only then create the run folder (a new run, locked for as long as
    `held` lasts) or restore the checkpoint (--resume)."""
    if args.resume:  # resumed: (checkpoint file, checkpoint, this rank's random state)
        args, folder, device, resumed = checkpoints.open_for_resume(args, given, rank, world, held, build_parser(),
                                                                    check_args)
    else:
        device, folder, resumed = check_args(args, world), check_output(args), None
    barrier()  # every rank has looked at --out before rank 0 creates anything there
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    loss_class = LOSSES[args.loss]
    prepared = training_data.prepare_data(args, loss_class)
    if resumed:
        checkpoints.check_same_data(resumed[1]["data"], prepared.fingerprints)
    checkpoints.set_seed(args.seed)
    model = training_data.load_model(args, prepared, device)  # --model, --layers, --max-seq-length, --prompts...
    teacher = training_data.load_teacher(args, model, device)  # None without --teacher
    with blamed_on(f"--loss-params {json.dumps(args.loss_params)}", TypeError, ValueError):
        loss_fn = loss_class(model, **args.loss_params).to(device)
    if args.matryoshka_dims:  # the loss at each size too, on one forward; loss_class stays the inner loss
        with blamed_on("--matryoshka-dims", ValueError):
            loss_fn = MatryoshkaLoss(model, loss_fn, args.matryoshka_dims, args.matryoshka_weights)
    evaluator = training_data.evaluator_for(args, prepared, getattr(loss_fn, "classifier", None), device)
    batches, steps_per_epoch = training_data.plan_batches(args, prepared.datasets, loss_class, world)
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)  # rounded up, as the HF trainer does
    if world > 1:  # the loss calls the wrapped model, so DDP averages the gradients of every backward pass
        loss_fn.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # AdamW over the model and any weights the loss has; the fused kernel updates each tensor in one pass.
    optimizer = torch.optim.AdamW(parameter_groups(model, loss_fn, args.weight_decay), lr=args.lr,
                                  fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        optimizer, lambda step: step / max(1, warmup) if step < warmup
        else max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    precision = fast_paths.training_precision(device, args.precision)  # auto: bf16 on CUDA where it can, else fp32
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "train_seconds": 0.0}
    if resumed:
        parts = {"model": model, "loss": loss_fn, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        state = checkpoints.restore(parts, resumed, steps_per_epoch, args.grad_accum, total_steps, rank)
    elif rank == 0:  # everything is checked: only now is anything written
        checkpoints.start_run(folder, args.out, held)
    barrier()
    training_data.add_teacher_embeddings(teacher, prepared, folder, rank, args)
    if rank == 0:  # the log holds exactly the entries up to the checkpoint: steps after it are trained again
        (folder / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in state["history"]))
    best = best_model.BestModel(args, folder, state["history"], total_steps, rank, prepared.notes)
    return Run(args, rank, world, folder, prepared, model, loss_fn, evaluator, batches, steps_per_epoch, total_steps,
               optimizer, scheduler, precision, scaler, state, best, *checkpoints.as_started(args, resumed))


# --- the loop --------------------------------------------------------------------------------------------------

def train(run: Run, stop: checkpoints.StopRequest) -> bool:
    """The loop, from run.state on: micro-batches, an optimizer step every --grad-accum of them, and between steps
    logs, evaluations and checkpoints. -> True after the last step, False when a signal stopped it (checkpointed)."""
    args, state, model = run.args, run.state, run.model
    progress = tqdm(total=run.total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
                    disable=run.rank != 0 or args.no_progress)
    model.train()
    # The loss stays on the device between log steps: no host sync per micro-batch. Restored on --resume: the loss
    # logged at the next log step then equals an uninterrupted run's.
    running_loss = torch.tensor(float(state.get("running_loss", 0.0)), device=run.model.device)
    running_count, grad_norm = state.get("running_count", 0), None
    run.started = time.perf_counter() - state["train_seconds"]
    while state["step"] < run.total_steps:
        run.batches.set_epoch(state["epoch"])
        # An epoch's last batches short of a whole --grad-accum are dropped, not carried into the next step.
        for index, (dataset_index, batch_indices) in enumerate(
                itertools.islice(run.batches, run.steps_per_epoch * args.grad_accum)):
            if index < state["batch_in_epoch"]:
                continue  # resumed mid-epoch: these batches were trained on already
            state["batch_in_epoch"] = index + 1
            accumulating = state["batch_in_epoch"] % args.grad_accum != 0
            running_loss += forward_backward(run, dataset_index, batch_indices, accumulating)
            running_count += 1
            if accumulating:
                continue
            run.scaler.unscale_(run.optimizer)
            grad_norm = clip_gradients(model, args.max_grad_norm)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            step = state["step"] = state["step"] + 1
            progress.update(1)
            if run.evaluator and args.eval_steps and step % args.eval_steps == 0 and step < run.total_steps:
                if run.rank == 0:
                    evaluate(run)
                if any_rank(run.best.stopped_at == step):  # --early-stopping-patience: this step is the last
                    run.total_steps = step
            if step % args.log_steps == 0 or step == run.total_steps:  # after an evaluation that stopped the run
                mean_loss, lr = global_mean(running_loss / running_count), run.scheduler.get_last_lr()[0]
                checkpoints.check_finite(mean_loss, grad_norm, run.folder, state)
                log(run, {"step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": float(mean_loss),
                          "lr": lr, "grad_norm": float(grad_norm),
                          "seconds": round(time.perf_counter() - run.started, 2)})
                progress.set_postfix(loss=f"{float(mean_loss):.4f}", lr=f"{lr:.2e}")
                running_loss, running_count = torch.zeros((), device=run.model.device), 0
            stopping = any_rank(stop.signal is not None)
            if step < run.total_steps and (stopping or args.save_steps and step % args.save_steps == 0):
                checkpoints.check_finite(running_loss, grad_norm, run.folder, state)
                # every rank's sum so far, averaged: what the next log step averages over the ranks anyway
                state["running_loss"], state["running_count"] = float(global_mean(running_loss)), running_count
                saved = write_checkpoint(run)
                run.best.prune()  # --load-best: the best files that only the checkpoints just removed needed
                if stopping:
                    progress.close()
                    stop.say_stopped(step, saved, run.folder, run.rank)
                    return False
            if step >= run.total_steps:
                break
        else:
            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
    progress.close()
    state["train_seconds"] = time.perf_counter() - run.started
    return True


def forward_backward(run: Run, dataset_index: int, batch_indices: list, accumulating: bool) -> torch.Tensor:
    """One micro-batch: this rank's slice of the global batch, its loss and gradients. -> the loss (on the device)."""
    batch_indices = batch_indices[run.rank * run.args.batch_size:(run.rank + 1) * run.args.batch_size]
    _, rows, text_columns, label_column = run.data.datasets[dataset_index]
    features, labels = data.collate([rows[i] for i in batch_indices], text_columns, label_column, run.model.tokenize,
                                    run.data.prompts)
    features = [minilm.batch_to(f, run.model.device) for f in features]
    labels = labels.to(run.model.device) if labels is not None else None
    # Between optimizer steps, DDP need not average gradients: the last micro-batch does it for all.
    with run.loss_fn.model.no_sync() if run.world > 1 and accumulating else contextlib.nullcontext():
        with torch.autocast(run.model.device.type, dtype=PRECISIONS[run.precision], enabled=run.precision != "fp32"):
            loss = run.loss_fn(features, labels)
        run.scaler.scale(loss / run.args.grad_accum).backward()
    return loss.detach().float()


def log(run: Run, entry: dict) -> None:
    """Into the run's history (checkpoints hold it: plain numbers only) and, on rank 0, log.jsonl."""
    run.state["history"].append(entry)
    if run.rank == 0:
        with open(run.folder / "log.jsonl", "a") as log_file:
            log_file.write(json.dumps(entry) + "\n")


def evaluate(run: Run) -> dict:
    run.model.refresh_inference_copies()  # the fused AdamW step bumps no tensor version: encode's copy goes stale
    # float(): evaluators give numpy numbers too, which a checkpoint cannot hold (it loads with weights_only=True)
    metrics = {key: float(value) for key, value in run.evaluator(run.model).items()}
    run.model.train()
    step = run.state["step"]
    log(run, {"step": step, "epoch": round(step / run.steps_per_epoch, 4),
              **{f"eval_{key}": value for key, value in metrics.items()}})
    run.best.update(step, metrics, run.model, run.loss_fn)
    return metrics


def write_checkpoint(run: Run) -> Path:
    """Everything --resume needs (minilm/checkpoint.py checks each field before using it)."""
    run.state["train_seconds"] = time.perf_counter() - run.started
    return checkpoints.save_checkpoint(run.folder, {
        "args": run.settings, "cwd": run.started_in, "model": run.model.state_dict(),
        "loss": checkpoints.own_state(run.loss_fn), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "state": run.state,
        "data": run.data.fingerprints, "world": run.world}, run.args.save_total_limit, run.rank)


def save(run: Run) -> tuple:
    """The final evaluation, then the model (--load-best: the best's), card and loss weights. -> (metrics, since)."""
    if run.evaluator and run.best.stopped_at is None:  # early stopping has evaluated the last step already
        evaluate(run)
    try:
        since = save_started(run.folder)
        metrics = run.best.keep(run.model, run.loss_fn, run.state["step"])
        run.model.save(run.folder)
        if hasattr(run.loss_fn, "save"):
            run.loss_fn.save(run.folder)  # SoftmaxLoss's classifier, for eval.py --task nli
        shown = [(name, *dataset[1:]) for name, dataset in zip(run.settings["data"], run.data.datasets)]  # as given
        model_card.write(run.folder, settings=run.settings, model=run.model, loss_fn=run.loss_fn, datasets=shown,
                         history=run.state["history"], metrics=metrics, train_seconds=run.state["train_seconds"],
                         evaluator=run.evaluator, best=run.best.summary(), precision=run.precision)
    except OSError as error:
        raise UsageError(f"saving the model to {run.folder} failed ({error.strerror or error}); the checkpoints "
                         "stay: free space, then --resume") from None
    return metrics, since


def main(argv=None) -> int:
    """Run train.py; -> exit status (0, 2 for a problem with the input, 130 when stopped by a signal)."""
    try:
        args, given = parse_args(argv)
        rank, world = setup_distributed()
        with contextlib.ExitStack() as held:  # the folder's lock, from the moment this run owns the folder
            run = set_up(args, given, rank, world, held)
            if rank == 0:  # said once everything is checked, so that an error is the only line when there is one
                for note in dict.fromkeys(run.data.notes):
                    print(f"train.py: note: {note}", file=sys.stderr)
                print(f"training {run.args.loss} on {sum(len(d[1]) for d in run.data.datasets)} rows: "
                      f"{run.total_steps} steps of {run.args.batch_size} x {run.args.grad_accum} x {world} "
                      f"process(es), {run.precision}, device {run.model.device}")
            with checkpoints.StopRequest() as stop:
                if not train(run, stop):
                    return 130
                if rank != 0:
                    return 0
                metrics, since = save(run)
            final = finish_run_folder(run.folder, since)
        print(f"saved to {final} after {run.state['step']} steps in {run.state['train_seconds']:.0f} s"
              + "".join(f"\n  {key}: {value:.4f}" for key, value in metrics.items()))
        return 0
    except (UsageError, RunFolderError, data.DataError, OSError) as error:  # OSError: a disk that fills, say
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except checkpoints.StoppedAtOnce:
        stop.say_stopped_at_once(run.folder)  # the newest checkpoint and the command that continues, or none
        return 130
    except KeyboardInterrupt:  # while loading, before the loop (a new run then keeps nothing: see set_up), or after
        print("train.py: interrupted outside the training steps (a signal there stops at once); run the command "
              "again, or with --out ... --resume where a checkpoint was written", file=sys.stderr)
        return 130
    finally:
        run = None  # noqa: F841  (its DDP reducer lets go of the process group first: see tear_down)
        tear_down()


if __name__ == "__main__":
    sys.exit(main())
