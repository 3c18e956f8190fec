"""The best evaluation of a training run: which step it was, its whole model kept (--load-best), and early stopping
(--early-stopping-patience).

The metric is --metric-for-best (a name the evaluation reports, as log.jsonl names it with or without "eval_"),
by default the evaluation's main metric (spearman_cosine for STS, cosine_ap for binary pairs, cosine_ndcg@10 for
retrieval, accuracy for NLI); with --matryoshka-dims, at the first size given (spearman_cosine_dim384 for
--matryoshka-dims 384,128), or at the size it names (spearman_cosine_dim128). Higher is better, except for a
metric whose name ends in "loss" (lower is better), as in the Hugging Face trainer; an evaluation improves on the
best only when strictly better (a tie keeps the earlier step), and a nan never does. The final evaluation, at the
last step, counts like the others.

--load-best: each evaluation that improves on the best writes the model's weights and the loss's own (SoftmaxLoss's
classifier) to RUN/checkpoints/best-step-N.safetensors (atomically; its metadata holds the step, the metric and its
value); the final save loads the best one back into the model, so that everything saved (the encoder's weights,
pooling, Normalize, the classifier, the card) is that step's whole model. The loop's evaluations run on rank 0 only,
so the files are written there.

--early-stopping-patience N: training ends after N evaluations in a row without improvement; the final save follows
as usual (the last evaluation is the final one: it is not run again).

--resume: the best so far and the evaluations since it are worked out again from the checkpoint's history (every
evaluation is logged there, and checked as input), so a checkpoint of an earlier version resumes with these flags
too. A best-step file stays on disk while the best of this run or of a checkpoint on disk names it, so a run resumed
from an older checkpoint (after a kill -9, or a damaged newest one) still finds its best; the file is input: its
metadata must match the history, its tensors the model, or it is not used (said once, naming it).
"""

import math
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from minilm import evaluation, files
from minilm.checkpoint import own_state
from minilm.errors import UsageError, first_line

PREFIX = "best-step-"  # checkpoints/best-step-0000120.safetensors (the step in 7 digits, as step-N folders)


def metric_for_best(args):
    """The metric the best evaluation is chosen by (as the evaluator names it, without "eval_"), or None without
    --eval-task. With --matryoshka-dims the evaluation reports each metric at each size, "NAME_dimD"; a NAME
    without a size (and the default, the main metric) is at the first of --matryoshka-dims. An unknown name or
    size is a UsageError listing the evaluation's metrics."""
    if not args.eval_task:
        return None
    evaluator, dims = evaluation.TASK_EVALUATORS[args.eval_task], args.matryoshka_dims or []
    name = (evaluator.main_metric if args.metric_for_best is None else args.metric_for_best).removeprefix("eval_")
    head, _, size = name.rpartition("_dim")
    base, dim = (head, int(size)) if dims and head and size.isdigit() else (name, dims[0] if dims else None)
    scores = [metric for metric in evaluator.metric_names if not metric.endswith("_threshold")]
    if base not in scores or (dims and dim not in dims):
        threshold = base in evaluator.metric_names and base not in scores
        what = "is a threshold the evaluation chose, not a score; " if threshold else ""
        sizes = f" at each of the sizes {', '.join(map(str, dims))} (NAME_dimD)" if dims else ""
        raise UsageError(f"--metric-for-best {args.metric_for_best}: {what}the {args.eval_task} evaluation reports "
                         f"{', '.join(scores)}{sizes} (log.jsonl: eval_NAME)")
    return f"{base}_dim{dim}" if dims else base


def check_flags(args) -> None:
    """--metric-for-best, --load-best and --early-stopping-patience against --eval-task and --eval-steps (a recipe's
    and a resumed run's flags come here too), before anything is read."""
    given = [flag for flag, value in (("--metric-for-best", args.metric_for_best is not None),
                                      ("--load-best", args.load_best),
                                      ("--early-stopping-patience", args.early_stopping_patience)) if value]
    if given and not args.eval_task:
        raise UsageError(f"{given[0]} needs --eval-task (and its --eval-data): the best step is the best evaluation")
    if (args.load_best or args.early_stopping_patience) and not args.eval_steps:
        flag = "--load-best" if args.load_best else "--early-stopping-patience"
        raise UsageError(f"{flag} needs --eval-steps N: without evaluations during training there is only the last "
                         "step to keep")
    metric_for_best(args)


class BestModel:
    """The best evaluation so far, its model on disk (--load-best), and the count that stops a run early."""

    def __init__(self, args, folder: Path, history: list, total_steps: int, rank: int, notes: list):
        """folder: the run's folder; history: the run's log (a resumed run's, from its checkpoint); total_steps:
        the steps planned; rank: only rank 0 reads and writes the files; notes: where a best file that cannot be
        used is said (train.py prints them once everything is checked)."""
        self.metric = metric_for_best(args)
        self.key = f"eval_{self.metric}"
        self.lower_is_better = bool(self.metric) and self.metric.endswith("loss")
        self.load_best, self.patience = args.load_best, args.early_stopping_patience
        self.folder, self.total_steps, self.rank = Path(folder) / "checkpoints", total_steps, rank
        self.best_step = self.best_value = None
        self.best_metrics = {}  # every metric of the best evaluation, for the card
        self.evaluations = self.since_best = 0
        self.trail = []  # (evaluation step, best step after it): which best file each checkpoint needs
        self.stopped_at = self.last = None  # last: (step, metrics) of the latest evaluation
        flags = [flag for flag, given in (("--load-best", self.load_best),
                                          ("--early-stopping-patience", self.patience)) if given]
        if flags and args.eval_steps >= total_steps:  # the loop evaluates at steps before the last only
            verb = "have" if flags[1:] else "has"
            notes.append(f"--eval-steps {args.eval_steps}: the run has {total_steps} step(s), so no evaluation falls "
                         f"during training and {' and '.join(flags)} {verb} only the last step's; lower --eval-steps")
        for entry in history:
            if self.key in entry:
                self._count(entry["step"], {k.removeprefix("eval_"): v for k, v in entry.items()
                                            if k.startswith("eval_")})
        if rank == 0 and self.load_best:
            problem = self.best_step is not None and self._check_file(self.path(self.best_step))
            if problem:
                notes.append(f"{problem}: the best model so far (step {self.best_step}, {self.key} "
                             f"{self.best_value:.4f}) cannot be kept; the best from this resume on is")
                self.best_step = self.best_value = None
                self.best_metrics, self.since_best, self.trail = {}, 0, []
            self.prune()  # and the best files of steps after the checkpoint, written before a kill

    def path(self, step: int) -> Path:
        return self.folder / f"{PREFIX}{step:07d}.safetensors"

    def _count(self, step: int, metrics: dict) -> bool:
        """One evaluation into the tally. -> whether it is the new best."""
        value = metrics[self.metric]
        improved = not math.isnan(value) and (
            self.best_value is None or (value < self.best_value if self.lower_is_better else value > self.best_value))
        self.evaluations += 1
        if improved:
            self.best_step, self.best_value, self.best_metrics, self.since_best = step, value, metrics, 0
        else:
            self.since_best += 1
        self.trail.append((step, self.best_step))
        self.last = (step, metrics)
        return improved

    def update(self, step: int, metrics: dict, model, loss_fn) -> None:
        """After an evaluation (rank 0): count it; a new best's model is written (--load-best; not at the last step,
        whose model is the one saved anyway); out of patience, self.stopped_at is set."""
        if self.metric not in metrics:  # the evaluator returned other names than evaluation.py declares
            raise UsageError(f"--metric-for-best {self.metric}: the evaluation reported {', '.join(metrics)}")
        improved = self._count(step, metrics)
        if improved and self.load_best:
            if step < self.total_steps:
                state = {f"model.{key}": value for key, value in model.state_dict().items()}
                state.update({f"loss.{key}": value for key, value in own_state(loss_fn).items()})
                self.folder.mkdir(exist_ok=True)  # checkpoints/: the run's manifest lists it from the start
                files.save_tensors({key: value.detach().cpu().contiguous() for key, value in state.items()},
                                   self.path(step), metadata={"step": str(step), "metric": self.metric,
                                                              "value": repr(float(metrics[self.metric]))})
            self.prune()
        if not improved and self.patience and self.since_best >= self.patience and step < self.total_steps:
            self.stopped_at = step
            best = f"{self.best_value:.4f} (step {self.best_step}" if self.best_step is not None else "nan (all"
            print(f"early stopping at step {step}: {self.since_best} evaluation(s) without a better {self.key} than "
                  f"{best}; --early-stopping-patience {self.patience})")

    def prune(self) -> None:
        """Remove the best files that neither this run's best nor the best of a checkpoint on disk names (rank 0)."""
        if self.rank != 0 or not self.folder.is_dir():
            return
        needed = {self.best_step}
        for checkpoint in self.folder.glob("step-*"):
            step = checkpoint.name.removeprefix("step-")
            before = [best for evaluated, best in self.trail if step.isdigit() and evaluated <= int(step)]
            needed.add(before[-1] if before else None)
        for file in self.folder.glob(f"{PREFIX}*.safetensors"):
            if file.name not in {self.path(step).name for step in needed if step is not None}:
                file.unlink(missing_ok=True)

    def _check_file(self, path: Path):
        """-> None when path holds the best of this run's history, else what is wrong with it."""
        try:
            with safe_open(path, framework="pt") as opened:
                metadata = opened.metadata() or {}
        except Exception as error:  # missing, damaged or not a safetensors file: any way a file can be wrong
            return f"{path}: cannot be read ({first_line(error)[:120]})"
        expected = {"step": str(self.best_step), "metric": self.metric, "value": repr(float(self.best_value))}
        if {key: metadata.get(key) for key in expected} != expected:
            return f"{path}: holds {metadata!r:.120}, where the run's log says {expected}"
        return None

    def keep(self, model, loss_fn, step: int) -> dict:
        """Before the final save (rank 0): with --load-best, the best evaluation's weights back into the model and
        the loss (nothing to load when the last step, `step`, is the best). -> the metrics of the model to be saved
        (its evaluation's; {} without one)."""
        if not (self.load_best and self.best_step is not None):
            return dict(self.last[1]) if self.last else {}
        if self.best_step != step:
            path = self.path(self.best_step)
            try:
                problem = self._check_file(path)
                if problem:
                    raise ValueError(problem)
                saved = load_file(path)
                loss_state = {k.removeprefix("loss."): v for k, v in saved.items() if k.startswith("loss.")}
                if loss_state.keys() != own_state(loss_fn).keys():
                    raise ValueError(f"holds the loss weights {sorted(loss_state)}, not {sorted(own_state(loss_fn))}")
                model.load_state_dict({k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")})
                loss_fn.load_state_dict({**loss_fn.state_dict(), **loss_state})
            except (ValueError, RuntimeError) as error:  # changed since it was written, or crafted
                raise UsageError(f"--load-best: {path}: not this run's best model ({first_line(error)[:200]}); "
                                 "nothing was saved: remove that file, then --resume keeps the best evaluation from "
                                 "the last checkpoint on") from None
            print(f"keeping the model of step {self.best_step} of {step}: the best {self.key}, {self.best_value:.4f} "
                  "(--load-best)")
        return dict(self.best_metrics)

    def summary(self) -> dict:
        """What the model card says about it: {"metric": log key or None, "kept_step": the step whose model was
        saved with --load-best, else None, "text": one paragraph (or "")}."""
        text = ""
        if self.best_step is not None:
            last_step, better = self.last[0], "lower" if self.lower_is_better else "higher"
            best = f"the best {self.key} of {self.evaluations} evaluation(s), {self.best_value:.4f} ({better} is better"
            if self.load_best:
                text = f"The model saved is step {self.best_step}'s of {self.total_steps}: {best}; --load-best)."
            elif self.best_step == last_step:
                text = f"The model saved is the last step's ({last_step}), also {best})."
            else:
                text = (f"The model saved is the last step's ({last_step}, {self.key} {self.last[1][self.metric]:.4f}"
                        f"); {best}) was at step {self.best_step}: --load-best would keep that step's model.")
        if self.stopped_at is not None:
            text += (f" Training stopped early at step {self.stopped_at} of {self.total_steps}: {self.since_best} "
                     f"evaluation(s) in a row without a better {self.key} (--early-stopping-patience {self.patience}).")
        return {"metric": self.key if self.metric else None, "kept_step": self.best_step if self.load_best else None,
                "text": text.strip()}
