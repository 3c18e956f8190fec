"""train.py's checkpoints: what a stopped run needs to continue exactly where it left off, the checks a checkpoint
passes before it is used, and the stops that write one.

RUN/checkpoints/step-N/state.pt holds one dict: the run's flags ("args", and "cwd", the folder they are relative
to), the model's, the loss's, the optimizer's, the scheduler's and the grad scaler's states, the loop's position
("state": step, epoch, batch_in_epoch, history, ...), the data files' fingerprints ("data"), the number of processes
("world") and the random states ("rng"; rank r > 0 keeps its own in rng-rank{r}.pt beside it). It holds plain
Python numbers, strings, lists, dicts and tensors only, so that it loads with torch.load(weights_only=True): nothing
in it can run code.

A checkpoint is a file in the user's folder, so it is input: every field is checked before anything is used (the
flags through train.py's own parser and cross-checks, exactly as flags; the position, the history and the random
states by kind and range; the optimizer's, scheduler's and scaler's states against this run's own), and a damaged
or crafted one is one line naming the file and the field. open_for_resume and restore are the two steps of
--resume, start_run the first write of a new run (whose folder rules are minilm/run_folder.py's). StopRequest
turns Ctrl-C or SIGTERM into a checkpoint at the end of the step; check_finite stops a run whose loss diverged.
"""

import argparse
import math
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from minilm import data
from minilm.distributed import any_rank, barrier
from minilm.errors import InputError, UsageError, first_line
from minilm.run_folder import check_output, create_run_folder, folder_lock, remove_failed_run

CHECKPOINT = "state.pt"  # checkpoints/step-N/state.pt
PATH_FLAGS = ("data", "model", "eval_data", "teacher")  # read relative to the folder train.py was started in
# Flags that may change on --resume: they say how a run is watched and when it stops, not what a step computes.
SAFE_ON_RESUME = ("max_steps", "epochs", "log_steps", "eval_steps", "save_steps", "save_total_limit",
                  "no_progress", "device", "early_stopping_patience")
# Flags that checkpoints of earlier versions lack, with the value that continues them as they ran (a new flag of
# train.py goes here, or its runs' checkpoints are refused as lacking it).
ADDED_LATER = {"multi_dataset": "round_robin", "metric_for_best": None, "load_best": False,
               "early_stopping_patience": 0, "prompts": None, "matryoshka_dims": None, "matryoshka_weights": None,
               "teacher": None, "layers": None, "keep_self_matches": False,
               "eval_precision": "fp32"}


# --- random state ----------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_state() -> dict:
    """The random states as tensors and lists, so that a checkpoint loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_random_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, position, has_gauss, cached = saved["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def own_state(loss_fn) -> dict:
    """The loss's own weights (SoftmaxLoss's classifier), without the model it wraps."""
    return {key: value for key, value in loss_fn.state_dict().items() if not key.startswith("model.")}


# --- writing and finding ---------------------------------------------------------------------------------------

def save_checkpoint(out: Path, checkpoint: dict, limit: int, rank: int) -> Path:
    """Write checkpoints/step-N atomically (written as .partial-N, renamed into place) and prune old ones.
    On failure (a full disk) the partial checkpoint is removed and the earlier ones stay."""
    checkpoints = out / "checkpoints"
    step = checkpoint["state"]["step"]
    final, partial = checkpoints / f"step-{step:07d}", checkpoints / f".partial-{step:07d}"
    try:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        if rank > 0:
            torch.save(random_state(), partial / f"rng-rank{rank}.pt")
        barrier()
        if rank == 0:
            torch.save({**checkpoint, "rng": random_state()}, partial / CHECKPOINT)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in sorted(checkpoints.glob("step-*"))[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(checkpoints).free if checkpoints.exists() else 0
        previous = latest_checkpoint(out)
        raise UsageError(f"writing checkpoint {final} failed ({first_line(error)[:120]}; {free / 2**20:.0f} MiB "
                         "free on that disk): removed the partial checkpoint; "
                         + (f"{previous} is intact: free space, then --resume" if previous
                            else "no earlier checkpoint exists")) from None
    barrier()
    return final


def latest_checkpoint(out: Path):
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


# --- loading and checking --------------------------------------------------------------------------------------

def load_checkpoint(out: Path, rank: int, parser: argparse.ArgumentParser) -> tuple:
    """The newest checkpoint that loads (weights_only: nothing in it can run code) and passes check_checkpoint
    (its flags through `parser`, train.py's); a damaged or crafted one is reported and the previous one used.
    -> (folder, checkpoint dict with its flags parsed, this rank's random state)."""
    found = sorted((out / "checkpoints").glob("step-*"), reverse=True)
    if not found:
        raise UsageError(f"--out {out}: --resume: no checkpoint in {out / 'checkpoints'} (is --save-steps 0?)")
    problems = []
    for folder in found:
        try:
            checkpoint = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
            checkpoint["args"] = check_checkpoint(checkpoint, parser)
            rng = checkpoint["rng"]
            if rank > 0:
                rng = torch.load(folder / f"rng-rank{rank}.pt", weights_only=True)
                check_random_state(rng)
        except Exception as error:  # any way a file can be damaged or crafted: try the one before
            reason = first_line(error)[:240]
            if reason.startswith("Weights only load failed"):  # torch's advice about weights_only misleads here
                reason = "not a checkpoint train.py wrote (damaged, or holds objects other than tensors)"
            problems.append(f"{folder / CHECKPOINT}: {reason}")
            continue
        if problems and rank == 0:
            print(f"train.py: {'; '.join(problems)}: cannot be used; resuming from {folder} instead",
                  file=sys.stderr)
        return folder, checkpoint, rng
    raise UsageError(f"--resume: no usable checkpoint in {out / 'checkpoints'}: {'; '.join(problems)}")


class BadField(ValueError):
    """A field of a checkpoint that train.py would not have written."""


def _shown(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {list(value.shape)}"
    return repr(value)[:60] if isinstance(value, (int, float, str, type(None))) else f"a {type(value).__name__}"


def _expect(value, kinds, field: str, what: str, low=None):
    """value is of one of `kinds` (a bool is no number here), finite and at least `low`, else BadField naming
    the field. -> value."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    wrong_kind = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    if wrong_kind or (low is not None and not value >= low) \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise BadField(f"field {field} is {_shown(value)}, expected {what}")
    return value


def check_checkpoint(checkpoint, parser: argparse.ArgumentParser) -> dict:
    """Every field as train.py writes it, else BadField naming the field. -> the flags, parsed by `parser`."""
    _expect(checkpoint, dict, "(the whole file)", "a dict of a checkpoint's fields")
    missing = sorted({"args", "model", "loss", "optimizer", "scheduler", "scaler", "state", "data", "world",
                      "rng"} - set(checkpoint))
    if missing:
        raise BadField(f"entries are missing: {', '.join(missing)}")
    for name in ("model", "loss"):
        for key, value in _expect(checkpoint[name], dict, name, "a dict of tensors").items():
            _expect(value, torch.Tensor, f"{name}[{key!r}]", "a tensor")
    for name in ("optimizer", "scheduler", "scaler"):
        _expect(checkpoint[name], dict, name, "a dict")
    _expect(checkpoint.get("cwd", ""), str, "cwd", "a folder name")
    _expect(checkpoint["world"], int, "world", "a number of processes >= 1", low=1)
    for index, data in enumerate(_expect(checkpoint["data"], list, "data", "a list of fingerprints")):
        field = f"data[{index}]"
        _expect(data, dict, field, "a fingerprint {file, bytes, sha256}")
        _expect(data.get("file"), str, f"{field}['file']", "a file name")
        _expect(data.get("bytes"), int, f"{field}['bytes']", "a size >= 0", low=0)
        _expect(data.get("sha256"), str, f"{field}['sha256']", "a SHA-256 in hex")
    check_state(checkpoint["state"])
    check_random_state(checkpoint["rng"])
    flags = check_flags(checkpoint["args"], parser)
    if len(checkpoint["data"]) != len(flags["data"]):
        raise BadField(f"field data holds {len(checkpoint['data'])} fingerprint(s) for {len(flags['data'])} --data")
    return flags


def check_state(state) -> None:
    """The loop's position and history: whole numbers >= 0, a time, log entries of numbers."""
    _expect(state, dict, "state", "a dict")
    for name in ("step", "epoch", "batch_in_epoch"):
        _expect(state.get(name), int, f"state['{name}']", "a whole number >= 0", low=0)
    _expect(state.get("train_seconds"), (int, float), "state['train_seconds']", "seconds >= 0", low=0)
    _expect(state.get("running_loss", 0.0), (int, float), "state['running_loss']", "a finite number")
    _expect(state.get("running_count", 0), int, "state['running_count']", "a whole number >= 0", low=0)
    for index, entry in enumerate(_expect(state.get("history"), list, "state['history']", "a list of log entries")):
        field = f"state['history'][{index}]"
        _expect(entry, dict, field, "a log entry (a dict)")
        _expect(entry.get("step"), int, f"{field}['step']", "a whole number >= 0", low=0)
        _expect(entry.get("epoch"), (int, float), f"{field}['epoch']", "a number >= 0", low=0)
        for key, value in entry.items():
            if not isinstance(key, str) or not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BadField(f"field {field}[{key!r}] is {type(value).__name__}, expected a number")


def check_random_state(rng) -> None:
    """The saved random states restore (tried, then this process's own put back)."""
    _expect(rng, dict, "rng", "a dict of random states")
    own = random_state()
    try:
        restore_random_state(rng)
    except Exception as error:
        raise BadField(f"field rng does not restore ({first_line(error)[:100]})") from None
    finally:
        restore_random_state(own)


def check_flags(saved, parser: argparse.ArgumentParser) -> dict:
    """The run's flags, each given to its flag of `parser` as on the command line (a recipe's values pass the same
    way): a missing, unknown, null, mistyped or refused value is BadField naming it. -> {flag dest: value}."""
    _expect(saved, dict, "args", "a dict of flag values")
    defaults = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    saved = {**{key: value for key, value in ADDED_LATER.items() if key not in saved}, **saved}
    missing = sorted(set(defaults) - set(saved))
    if missing:
        raise BadField(f"field args lacks the flag(s) {', '.join(missing)}")
    try:  # a null is the flag's default, checked below
        parsed = parser.parse_values({key: value for key, value in saved.items() if value is not None}, "field args")
    except UsageError as error:
        raise BadField(str(error)) from None
    for key, value in saved.items():
        if value is None and (defaults[key] is not None or key in ("loss", "data")):
            raise BadField(f"field args {key!r} is null, where train.py saves a value")
        if value is not None and not isinstance(value, bool) and parsed[key] != value:  # "32" where 32 is saved
            raise BadField(f"field args {key!r} is {value!r} ({type(value).__name__}), not the value its flag "
                           f"reads ({parsed[key]!r})")
    return saved


# --- resuming ----------------------------------------------------------------------------------------------------

def open_for_resume(args, given: dict, rank: int, world: int, held, parser: argparse.ArgumentParser,
                    check_args) -> tuple:
    """--resume: the run's folder (checked, and locked by rank 0 for as long as `held`, an ExitStack, lasts), its
    newest usable checkpoint, and the run's flags with those given now, through check_args(args, world) as any
    run's (its errors then name the checkpoint). -> (args, folder, what check_args returned, (checkpoint file,
    checkpoint, this rank's random state))."""
    folder = check_output(args)
    if rank == 0:
        held.enter_context(folder_lock(folder, args.out))
    checkpoint_dir, checkpoint, rng = load_checkpoint(folder, rank, parser)
    file = checkpoint_dir / CHECKPOINT
    args = resume_args(checkpoint, given)
    if checkpoint["world"] != world:
        raise UsageError(f"--resume: the run used {checkpoint['world']} process(es), this is {world}; resume "
                         "with the same torchrun --nproc_per_node")
    try:
        checked = check_args(args, world)
    except UsageError as error:
        raise UsageError(f"{error} (the run's flags, from {file})") from None
    return args, folder, checked, (file, checkpoint, rng)


def as_started(args, resumed) -> tuple:
    """The flags as the run was started (path flags as given), and the folder they are relative to (see
    resume_args): what a checkpoint holds as "args" and "cwd", and what the model card shows."""
    if not resumed:
        return dict(vars(args)), os.getcwd()
    checkpoint = resumed[1]
    return ({**vars(args), **{key: checkpoint["args"][key] for key in PATH_FLAGS}},
            checkpoint.get("cwd", os.getcwd()))  # checkpoints of earlier versions lack it


def start_run(folder: Path, out: str, held) -> None:
    """A new run (rank 0), once everything is checked: create its folder (marked as a minilm run) and lock it for
    as long as `held` (an ExitStack) lasts. A new run that fails before its first checkpoint leaves no trace: a plain
    re-run can start again, and an --overwrite retry leaves the old run as it was."""
    staging = folder != Path(out)
    created = not folder.exists()
    create_run_folder(folder, Path(out) if staging else None)
    held.push(lambda failed, *_: failed and latest_checkpoint(folder) is None  # runs after the lock is released
              and remove_failed_run(folder, created or staging))
    held.enter_context(folder_lock(folder, out))


def restore(parts: dict, resumed: tuple, steps_per_epoch: int, grad_accum: int, total_steps: int,
            rank: int) -> dict:
    """Put each part ({"model": model, "loss": loss_fn, "optimizer": ..., "scheduler": ..., "scaler": ...}; the
    loss's holds its own weights only) and this rank's random states where the checkpoint left them, once they fit
    this run. resumed: open_for_resume's (file, checkpoint, random state). -> the loop's state."""
    file, checkpoint, rng = resumed
    state = checkpoint["state"]
    try:
        check_position(state, steps_per_epoch, grad_accum)
        check_optimizer(checkpoint["optimizer"], parts["optimizer"])
        for name in ("scheduler", "scaler"):
            check_like(checkpoint[name], parts[name].state_dict(), name)
        if checkpoint["scheduler"].get("last_epoch") != state["step"]:  # one scheduler step per optimizer step
            raise BadField(f"field scheduler['last_epoch'] is {checkpoint['scheduler'].get('last_epoch')!r}, "
                           f"where the step is {state['step']}")
    except BadField as error:
        raise UsageError(f"{file}: {error}; not a checkpoint train.py wrote") from None
    if total_steps < state["step"]:
        raise UsageError(f"--max-steps {total_steps}: the run is at step {state['step']} already")
    try:
        for name, part in parts.items():
            saved = checkpoint[name]
            part.load_state_dict({**part.state_dict(), **saved} if name == "loss" else saved)
    except Exception as error:  # a checkpoint of another model or loss, or crafted
        raise UsageError(f"{file}: does not fit this model and loss ({first_line(error)[:160]})") from None
    restore_random_state(rng)
    if rank == 0:
        print(f"resuming from {file.parent} at step {state['step']}")
    return state


def check_position(state: dict, steps_per_epoch: int, grad_accum: int) -> None:
    """A checkpoint is written after an optimizer step: its step follows from its epoch and batch."""
    batches = steps_per_epoch * grad_accum
    expected = state["epoch"] * steps_per_epoch + state["batch_in_epoch"] // grad_accum
    if state["batch_in_epoch"] > batches or state["batch_in_epoch"] % grad_accum or state["step"] != expected:
        raise BadField(f"field state: step {state['step']}, epoch {state['epoch']}, batch_in_epoch "
                       f"{state['batch_in_epoch']} do not fit this run's {batches} batches an epoch of {grad_accum} "
                       f"per step (step {expected} would)")


def check_like(saved, fresh, field: str) -> None:
    """saved is shaped as fresh (this run's own state_dict of the same part) where both have a key: dicts, lists
    and tuples of the same length, numbers for numbers, tensors of the same shape, else the same type."""
    if isinstance(fresh, dict):
        for key in _expect(saved, dict, field, "a dict").keys() & fresh.keys():
            check_like(saved[key], fresh[key], f"{field}[{key!r}]")
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, type(fresh)) or len(saved) != len(fresh):
            raise BadField(f"field {field} is {_shown(saved)}, expected a {type(fresh).__name__} of {len(fresh)}")
        for index, (value, like) in enumerate(zip(saved, fresh)):
            check_like(value, like, f"{field}[{index}]")
    elif torch.is_tensor(fresh):
        if not torch.is_tensor(saved) or saved.shape != fresh.shape:
            raise BadField(f"field {field} is {_shown(saved)}, expected a tensor of shape {list(fresh.shape)}")
    elif isinstance(fresh, (int, float)) and not isinstance(fresh, bool):
        _expect(saved, (int, float), field, "a number")
    elif type(saved) is not type(fresh):
        raise BadField(f"field {field} is {_shown(saved)}, expected {_shown(fresh)}")


def check_optimizer(saved, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's settings shaped as this run's, over the same parameters, and a state (AdamW's step and
    moments) of each parameter's shape."""
    fresh = optimizer.state_dict()
    check_like(saved, fresh, "optimizer")
    if [group.get("params") for group in saved.get("param_groups", [])] != \
            [group["params"] for group in fresh["param_groups"]]:
        raise BadField("field optimizer['param_groups'] does not list this model's parameters")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in _expect(saved.get("state"), dict, "optimizer['state']", "a dict").items():
        field = f"optimizer['state'][{index!r}]"
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise BadField(f"field {field}: there is no parameter {index!r}")
        for key, value in _expect(entry, dict, field, "a dict").items():
            if not torch.is_tensor(value) or (value.dim() and value.shape != params[index].shape):
                raise BadField(f"field {field}[{key!r}] is {_shown(value)}, expected a tensor of shape "
                               f"{list(params[index].shape)} (or a number's)")


def absolute_paths(value, folder: str):
    """A path flag's value (a string, a list of them, or None) with each path that exists relative to `folder`
    made absolute, so that --resume finds the run's files from any folder and takes ../x/data.tsv for
    /y/x/data.tsv; anything else (a hub id) is kept as it is."""
    if isinstance(value, list):
        return [absolute_paths(item, folder) for item in value]
    if value is None or not (Path(folder) / value).exists():
        return value
    return os.path.realpath(Path(folder) / value)


def resume_args(checkpoint: dict, given: dict) -> argparse.Namespace:
    """The run's own flags, with the flags given now where they may change; others must equal the run's.
    Paths are compared and used as absolute paths: the run's against the folder it was started in."""
    started_in = checkpoint.get("cwd", os.getcwd())  # checkpoints of earlier versions lack it
    saved = {key: absolute_paths(value, started_in) if key in PATH_FLAGS else value
             for key, value in checkpoint["args"].items()}
    for key, value in given.items():
        if key in ("out", "resume") or key in SAFE_ON_RESUME:
            continue
        if key in PATH_FLAGS:
            value = absolute_paths(value, os.getcwd())
        if not same_setting(key, saved.get(key), value):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {value}: the run being resumed used {saved.get(key)}; --resume continues it "
                             f"unchanged, and only {', '.join('--' + k.replace('_', '-') for k in SAFE_ON_RESUME)} "
                             "may change")
    safe = {key: value for key, value in given.items() if key in SAFE_ON_RESUME}
    return argparse.Namespace(**{**saved, **safe, "resume": True, "overwrite": False, "out": given["out"]})


def same_setting(key: str, before, now) -> bool:
    """Whether a flag's value equals the run's: --prompts by the prompts it gives, so that its JSON written with
    other spacing (or a recipe's object) is the same value; malformed, it differs (and check_flags names it);
    --matryoshka-weights by the weights it gives: not given is a weight of 1 for every size."""
    if key == "prompts" and before != now:
        try:
            return data.prompts_value(before) == data.prompts_value(now)
        except InputError:
            return False
    if key == "matryoshka_weights" and (before is None) != (now is None):
        return all(weight == 1 for weight in before or now)
    return before == now


def check_same_data(saved: list, now: list) -> None:
    for before, after in zip(saved, now):
        if (before["bytes"], before["sha256"]) != (after["bytes"], after["sha256"]):
            raise UsageError(f"--resume: {after['file']} changed since the checkpoint (was {before['bytes']} bytes, "
                             f"sha256 {before['sha256'][:12]}; now {after['bytes']} bytes, sha256 "
                             f"{after['sha256'][:12]}); restore it, or start a new run")


# --- stopping --------------------------------------------------------------------------------------------------

def check_finite(loss_sum: torch.Tensor, grad_norm, folder: Path, state: dict) -> None:
    """Stop a run whose loss or gradient norm became inf or nan, naming its last good checkpoint. One host sync:
    call it at log steps and before a checkpoint, never per micro-batch."""
    bad_loss = not bool(torch.isfinite(loss_sum))
    bad_grad = grad_norm is not None and not bool(torch.isfinite(grad_norm))
    if any_rank(bad_loss or bad_grad):
        last = latest_checkpoint(folder)
        what = f"loss became {float(loss_sum)}" if bad_loss else f"gradient norm became {float(grad_norm)}"
        raise UsageError(f"the {what} by step {state['step']} (epoch {state['epoch']}); stopping. The last "
                         f"good checkpoint is {last or 'none (none was written yet)'}. Try a lower --lr, "
                         "--precision fp32, or check the data.")


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during training: stop without finishing the step."""


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads after each optimizer step; a second signal stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal is not None:
            raise StoppedAtOnce
        self.signal = signal.Signals(number).name
        print(f"\ntrain.py: {self.signal}: finishing this step, then writing a checkpoint (again to stop now)",
              file=sys.stderr, flush=True)

    def say_stopped(self, step: int, saved, folder, rank: int) -> None:
        """The run's last line (rank 0's) when a signal stopped it: where the checkpoint is and how to go on."""
        if rank == 0:
            print(f"train.py: stopped by {self.signal or 'a signal'} after step {step}; checkpoint {saved}. Continue "
                  f"with: python train.py --out {folder} --resume", file=sys.stderr)

    def say_stopped_at_once(self, folder: Path) -> None:
        """The run's last line when a second signal stopped it mid-step: the newest checkpoint and how to go on
        from it, or, before the first, that the run left nothing (start_run) and the same command starts again."""
        newest = latest_checkpoint(folder)
        if newest is None:
            print("train.py: stopped at once (a second signal) before the run's first checkpoint, so it kept nothing; "
                  "run the same command again", file=sys.stderr)
        else:
            print(f"train.py: stopped at once (a second signal); newest checkpoint {newest}. Continue with: python "
                  f"train.py --out {folder} --resume", file=sys.stderr)

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
