"""The loss log (``trainer_log.jsonl``, one JSON object per logged step) and its plot (``training_loss.png``).

The log is appended to as training runs, so it can be followed live and a run that crashes keeps what it logged.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOG_NAME = "trainer_log.jsonl"
PLOT_NAME = "training_loss.png"


def read_loss_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a loss log, oldest first; an absent log is empty."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class LossLog(TrainerCallback):
    """Appends every logged training loss to ``trainer_log.jsonl``; also logs the last step, whatever its number.

    On resume the entries past the checkpoint's step are dropped, so the log reads as one uninterrupted run.
    """

    def __init__(self, output_dir: Path, on_loss: Callable[[int, int, float], None] | None = None) -> None:
        self.path = output_dir / LOG_NAME
        self.on_loss = on_loss
        self._started = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [entry for entry in read_loss_log(self.path) if entry["step"] <= state.global_step]
        self.path.write_text("".join(json.dumps(entry) + "\n" for entry in kept) if state.global_step else "")

    def on_step_end(self, args, state, control, **kwargs):
        # The final loss is the last step's, not the one a logging interval happened to end on.
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        entry = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
            "elapsed_s": round(time.monotonic() - self._started, 3),
        }
        with self.path.open("a") as log:
            log.write(json.dumps(entry) + "\n")
        if self.on_loss is not None:
            self.on_loss(state.global_step, state.max_steps, entry["loss"])


def smoothed(steps: list[float], values: list[float], span: float = 0.1) -> list[float]:
    """The loss with its step-to-step noise smoothed away, following its trend to the last point.

    A local linear fit (LOESS with a box kernel) over the nearest ``span`` of the points, in log space when
    every loss is positive: an exponentially decaying loss is a line there, so the fit reproduces it. An
    exponential moving average instead lags the loss by its window, which on a short log is most of the
    run.
    """
    logs = all(value > 0 and math.isfinite(value) for value in values)
    ys = [math.log(value) for value in values] if logs else list(values)
    count = len(ys)
    half = max(1, round(span * count / 2))
    result = []
    for index in range(count):
        # The window keeps its width at the ends (shifted inwards), so the first and last fits smooth too.
        low = min(max(0, index - half), max(0, count - 1 - 2 * half))
        high = min(count, low + 2 * half + 1)
        xs, window = steps[low:high], ys[low:high]
        x_mean, y_mean = sum(xs) / len(xs), sum(window) / len(window)
        spread = sum((x - x_mean) ** 2 for x in xs)
        slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, window, strict=True)) / spread if spread else 0.0
        fitted = y_mean + slope * (steps[index] - x_mean)
        result.append(math.exp(fitted) if logs else fitted)
    return result


def loss_figure(entries: list[dict[str, Any]], title: str) -> Figure:
    """The loss of each logged step, and past ten points its smoothed line (labelled ``smoothed``)."""
    from matplotlib.figure import Figure

    steps = [entry["step"] for entry in entries]
    losses = [entry["loss"] for entry in entries]
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#1f77b4", alpha=0.4 if len(losses) > 10 else 1.0, label="loss")
    if len(losses) > 10:
        axes.plot(steps, smoothed(steps, losses), color="#1f77b4", label="smoothed")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_losses(output_dir: Path) -> Path | None:
    """Draw the loss log as ``training_loss.png``; None when nothing was logged."""
    entries = read_loss_log(output_dir / LOG_NAME)
    if not entries:
        return None
    path = output_dir / PLOT_NAME
    loss_figure(entries, f"training loss of {output_dir.name}").savefig(path, format="png")
    return path
