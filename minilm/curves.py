"""The training curves of a run, from its log: what loss.png draws and the model card's log table lists.

The training loss is logged every --log-steps as the mean over the steps since the previous log entry. A run's
last entry may average fewer steps (360 steps logged every 50: the last one is the mean of 10), so it is noisier
and, drawn like the others, reads as a jump at the end. It is kept apart here ("partial") and drawn as a hollow
marker named for the steps it averages. The evaluation metric is drawn in a panel of its own below, and the step
whose model was saved with --load-best is marked on both.
"""

from pathlib import Path

from minilm import files


def series(history: list, eval_key=None, kept_step=None) -> dict:
    """The curves of a log (train.py's history: entries with "step" and "loss", or "step" and eval_* metrics).

    -> {"loss": [(step, loss)], "partial": None or (step, loss, steps averaged), "eval": [(step, value)] of
    eval_key, "kept": None or (step, value) of the evaluation at kept_step}. The last loss entry is partial when
    it averages fewer steps than the entry before it (a run's remainder after its last whole --log-steps).
    """
    loss = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    partial = None
    if len(loss) >= 2:
        windows = [step - previous for (step, _), (previous, _) in zip(loss, [(0, None)] + loss)]
        if windows[-1] < windows[-2]:
            partial = (*loss.pop(), windows[-1])
    evaluations = [(entry["step"], entry[eval_key]) for entry in history if eval_key and eval_key in entry]
    kept = next(((step, value) for step, value in evaluations if step == kept_step), None)
    return {"loss": loss, "partial": partial, "eval": evaluations, "kept": kept}


def plot(curves: dict, eval_key, path: Path) -> bool:
    """Draw series() into path (a PNG): the training loss above, the evaluation below when there is one.
    -> False (nothing written) without matplotlib or without a logged loss."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not curves["loss"] and not curves["partial"]:
        return False
    panels = 2 if curves["eval"] else 1
    figure, axes = plt.subplots(panels, 1, figsize=(6.5, 2.6 * panels + 0.6), sharex=True, squeeze=False)
    loss_axes = axes[0][0]
    if curves["loss"]:
        loss_axes.plot(*zip(*curves["loss"]), marker=".", color="C0", label="training loss (mean since the last point)")
    if curves["partial"]:
        step, value, steps = curves["partial"]
        loss_axes.plot([step], [value], marker="o", linestyle="none", markerfacecolor="none", color="C0",
                       label=f"last {steps} step(s) only (a noisier mean)")
    loss_axes.set_ylabel("training loss")
    if curves["eval"]:
        eval_axes = axes[1][0]
        eval_axes.plot(*zip(*curves["eval"]), marker="o", markersize=4, color="C1", label=eval_key)
        eval_axes.set_ylabel(eval_key.removeprefix("eval_"))
        if curves["kept"]:
            step, value = curves["kept"]
            eval_axes.plot([step], [value], marker="*", markersize=14, linestyle="none", color="C3",
                           label=f"kept: step {step} (--load-best)")
            for panel in (loss_axes, eval_axes):
                panel.axvline(step, color="C3", linestyle="--", linewidth=1)
    for (panel,) in axes:
        panel.grid(alpha=0.3)
        panel.legend(fontsize="small")
    axes[-1][0].set_xlabel("step")
    figure.tight_layout()
    with files.replaced_atomically(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    return True
