"""metrics.json: a run's numbers for people and for sweeps (the plugin Lab's rank runs by one of its keys)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import atomic


def run_metrics(steps: int, epochs: int, final_loss: float | None,
                validation: list[tuple[int, dict[str, float]]]) -> dict:
    """steps, epochs, the last training loss (train/loss, loss), the last validation losses (val/loss,
    also as eval/loss, and val/loss_t<a>-<b>) and every eval's, by step."""
    metrics: dict = {"steps": steps, "epochs": epochs}
    if final_loss is not None:
        metrics.update({"train/loss": final_loss, "loss": final_loss})
    if validation:
        last = validation[-1][1]
        metrics.update({**last, "eval/loss": last["val/loss"], "val/step": validation[-1][0]})
        metrics["validation"] = [{"step": step, **losses} for step, losses in validation]
    return metrics


def write_metrics(path: Path, metrics: dict) -> Path:
    return atomic.write_text(path, json.dumps(metrics, indent=2) + "\n")
