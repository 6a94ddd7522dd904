"""The loss log (``trainer_log.jsonl``, one JSON object per logged step) and its plot (``training_loss.png``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

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


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with bias correction, as TensorBoard draws it."""
    result, average = [], 0.0
    for count, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        result.append(average / (1 - weight**count))
    return result


def plot_losses(output_dir: Path) -> Path | None:
    """Draw the loss log as ``training_loss.png``; None when nothing was logged."""
    from matplotlib.figure import Figure

    entries = read_loss_log(output_dir / LOG_NAME)
    if not entries:
        return None
    steps = [entry["step"] for entry in entries]
    losses = [entry["loss"] for entry in entries]
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#1f77b4", alpha=0.4 if len(losses) > 10 else 1.0, label="loss")
    if len(losses) > 10:
        axes.plot(steps, smoothed(losses), color="#1f77b4", label="smoothed")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title(f"training loss of {output_dir.name}")
    axes.legend()
    figure.tight_layout()
    path = output_dir / PLOT_NAME
    figure.savefig(path, format="png")
    return path
