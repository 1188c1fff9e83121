"""Reporting to a Transformer Lab job through whichever `transformerlab` SDK is installed.

Two generations are in users' hands and differ where it matters (see TRANSFORMERLAB.md): the
plugin Lab's 0.0.8x (update_progress takes only a percent, no JobStatus, no
update_job_data_fields, error() leaves the job COMPLETE) and the task Lab's 0.1.x. What the SDK
offers is detected by looking at its functions, never by its version number.

Launch kinds:
  "task"    the current Lab: files reach the job only through the SDK (save_model for the
            adapter, save_artifact for eval images and figures); the workspace may be remote.
  "plugin"  the plugin Lab: it reads the adapter from adaptor_output_dir and the eval images
            from the job's eval_images_dir itself; sweeps read <output_dir>/metrics.json.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import adapter, figures
from .reporting import LAB_STOP, TERMINATE, Reporter

TASK, PLUGIN = "task", "plugin"


def resolved(value: Any) -> Any:
    """The SDK's Job methods are coroutines; its `lab` facade methods are not."""
    if inspect.isawaitable(value):
        import asyncio

        return asyncio.run(value)
    return value


def accepts(function: Any, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


class LabReporter(Reporter):
    """Terminal reporting, and the job: progress (about once a second), its stop flag, its
    outputs, and how it ends."""

    def __init__(self, lab: Any, launch: str, *, parent_model: str = "", min_interval_s: float = 1.0) -> None:
        super().__init__()
        self.lab = lab
        self.launch = launch
        self.parent_model = parent_model
        self.min_interval_s = min_interval_s
        self._last_write = float("-inf")
        self._progress_takes_metrics = accepts(lab.update_progress, "metrics")

    # --- messages and progress ------------------------------------------------------------
    def info(self, message: str) -> None:
        super().info(message)
        self._quietly(self.lab.log, message)

    def warn(self, message: str) -> None:
        super().warn(message)
        self._quietly(self.lab.log, f"WARNING: {message}")

    def report(self, step: int, total: int, metrics: dict[str, float]) -> None:
        super().report(step, total, metrics)
        moment = time.monotonic()
        if moment - self._last_write < self.min_interval_s and step < total:
            return
        self._last_write = moment
        percent = min(99, int(100 * step / max(total, 1)))  # 100 only once the adapter is saved
        if self._progress_takes_metrics:
            self._quietly(self.lab.update_progress, percent, metrics, step)
        else:  # 0.0.8x: a percent only; the metrics still reach TensorBoard / W&B
            self._quietly(self.lab.update_progress, percent)
        if self.stop_reason is None and self._stop_flag():
            self.stop_reason = LAB_STOP

    def stop_asked_here(self) -> bool:
        if self.stop_reason is None and self._stop_flag():
            self.stop_reason = LAB_STOP
        return self.stop_reason is not None

    def _stop_flag(self) -> bool:
        try:
            if hasattr(self.lab, "get_job_data"):
                return bool(self.lab.get_job_data().get("stop"))
            return bool(resolved(self.lab.job.get_job_data()).get("stop"))  # before 0.0.6x
        except Exception:  # a job file caught mid-write reads as "not stopped"; read again soon
            return False

    # --- outputs ----------------------------------------------------------------------------
    def record_outputs(self, *, eval_images_dir: Path | None, tensorboard_dir: Path) -> None:
        if self.launch != PLUGIN:
            return  # the task Lab shows files it was handed (publish), not local folders
        fields: dict[str, Any] = {"tensorboard_output_dir": str(tensorboard_dir)}
        if eval_images_dir is not None:
            fields["eval_images_dir"] = str(eval_images_dir)
        self._set_fields(fields)

    def publish(self, result: Any, params: Any) -> None:
        if self.launch == PLUGIN:
            write_sweep_metrics(Path(params.output_dir), result)
            return
        # The adapter first: it is what a stop has seconds to save. Extras after.
        info = json.loads((result.paths.adapter_dir / adapter.INFO_NAME).read_text())
        self._save_model(result.paths.adapter_dir, params.adaptor_name, info)
        for name, path in artifacts(result).items():
            self._quietly(self.lab.save_artifact, str(path), name)

    def _save_model(self, folder: Path, name: str, info: dict[str, Any]) -> None:
        options = {"name": name, "architecture": info.get("model_architecture"),
                   "parent_model": self.parent_model or info.get("base_model"),
                   # given, so the SDK does not ask the hub for the parent's tag
                   "pipeline_tag": "text-to-image"}
        self.lab.save_model(str(folder), **{k: v for k, v in options.items() if accepts(self.lab.save_model, k)})

    # --- endings ----------------------------------------------------------------------------
    def completed(self, message: str, score: dict[str, float]) -> None:
        if accepts(self.lab.finish, "score"):
            self.lab.finish(message, score=score)
        else:
            self.lab.finish(message)

    def stopped(self, message: str) -> None:
        self._set_fields({"completion_status": "stopped", "completion_details": message,
                          "stop_reason": self.stop_reason or "", "end_time": now()})
        resolved(self.lab.job.update_status("STOPPED"))  # JobStatus.STOPPED, where it exists

    def failed(self, message: str) -> None:
        self.lab.error(message)
        # 0.0.8x's error() leaves the job COMPLETE (completion_status=failed): make it FAILED.
        resolved(self.lab.job.update_status("FAILED"))

    def stop_exit_status(self) -> int:
        if self.stop_reason in (LAB_STOP, TERMINATE):
            return 0  # the Lab asked (its flag, or the SIGTERM of its Stop): a clean, wanted end
        return super().stop_exit_status()

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: Path, name: str) -> None:
        if hasattr(self.lab, "save_checkpoint"):
            self.lab.save_checkpoint(str(path), name)

    def checkpoint_to_resume(self) -> Path | None:
        if not hasattr(self.lab, "get_checkpoint_to_resume"):
            return None
        found = self.lab.get_checkpoint_to_resume()
        if not found:
            return None
        if "://" not in str(found):
            return Path(found)
        from lab import storage  # a remote workspace: bring the checkpoint to this machine

        local = Path(tempfile.mkdtemp(prefix="resume_")) / Path(str(found).rstrip("/")).name
        resolved(storage.copy_dir(str(found), str(local)))
        return local

    # --- the job file -------------------------------------------------------------------------
    def _set_fields(self, fields: dict[str, Any]) -> None:
        job = self.lab.job
        if hasattr(job, "update_job_data_fields"):
            resolved(job.update_job_data_fields(fields))
        else:
            for key, value in fields.items():
                resolved(job.update_job_data_field(key, value))

    def _quietly(self, call: Any, *args: Any) -> None:
        """Progress, log lines and extras are best-effort: a busy job file must not kill a run."""
        try:
            call(*args)
        except Exception as exc:
            Reporter.warn(self, f"could not update the Lab job ({type(exc).__name__}: {exc})")


def artifacts(result: Any) -> dict[str, Path]:
    """The eval images, the before-vs-after grid and the loss curve, by artifact name."""
    out: dict[str, Path] = {f"eval_{p.name}": p for p in result.eval_images}
    figures_dir = result.paths.logs_dir
    if len(result.eval_images) > 1 and result.eval_images[0].stem == figures.BEFORE:
        grid = figures.before_after(result.eval_images[0], result.eval_images[-1], figures_dir / "before_after.png")
        out["before_after.png"] = grid
    if result.losses:
        out["loss.png"] = figures.loss_curve(result.losses, figures_dir / "loss.png")
    return out


def write_sweep_metrics(output_dir: Path, result: Any) -> Path:
    """<output_dir>/metrics.json: what the plugin Lab's sweeps rank runs by (set sweep_metric
    to "train/loss"; lower is better)."""
    metrics: dict[str, Any] = {"steps": result.steps, "epochs": result.epochs}
    if result.final_loss is not None:
        metrics.update({"train/loss": result.final_loss, "loss": result.final_loss})
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / "metrics.json"
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(partial, target)
    return target
