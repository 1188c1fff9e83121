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
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import atomic
from ..outputs import figures
from ..outputs.layout import BEFORE, INFO_NAME
from ..outputs.metrics import run_metrics, write_metrics
from ..reporting import LAB_STOP, TERMINATE, Reporter

TASK, PLUGIN = "task", "plugin"
STOP_READ_INTERVAL_S = 0.5
OTHER_PROCESS_GRACE_S = 2.0


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
        self._adapter_handed = False
        self._last_stop_read = float("-inf")

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
        """Asked per image of the data check and per denoising step: the job is read at most every
        STOP_READ_INTERVAL_S."""
        moment = time.monotonic()
        if self.stop_reason is None and moment - self._last_stop_read >= STOP_READ_INTERVAL_S:
            self._last_stop_read = moment
            if self._stop_flag():
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
        if not self._adapter_handed:
            info = json.loads((result.paths.adapter_dir / INFO_NAME).read_text())
            self._save_model(result.paths.adapter_dir, params.adaptor_name, info)
        offered = self._job_folder("get_artifacts_dir")
        for name, path in artifacts(result).items():
            if offered is None or path.parent.resolve() != offered:  # not written there already
                self._quietly(self.lab.save_artifact, str(path), name)

    def adapter_saved(self, folder: Path, name: str) -> None:
        """The task Lab's Models get the adapter as soon as it is written, before the last checkpoint
        (a stop has 3 s before SIGKILL, and the adapter is what the user wants)."""
        if self.launch != TASK:
            return  # the plugin Lab reads adaptor_output_dir itself
        try:
            self._save_model(folder, name, json.loads((folder / INFO_NAME).read_text()))
        except Exception as exc:  # tried again by publish(), which fails the job if it fails again
            Reporter.warn(self, f"could not hand the adapter to the Lab yet ({type(exc).__name__}: {exc})")
            return
        self._adapter_handed = True

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
        if self._job_failed():
            return  # another process failed (and its launcher then terminated this one): keep that
        self._set_fields({"completion_status": "stopped", "completion_details": message,
                          "stop_reason": self.stop_reason or "", "end_time": now()})
        resolved(self.lab.job.update_status("STOPPED"))  # JobStatus.STOPPED, where it exists

    def failed(self, message: str) -> None:
        if self._job_failed():
            return  # the first failure's message is the one worth reading (another process's, say)
        self.lab.error(message)
        # 0.0.8x's error() leaves the job COMPLETE (completion_status=failed): make it FAILED.
        resolved(self.lab.job.update_status("FAILED"))

    def failed_in_another_process(self, message: str) -> None:
        """A failure in one of the other processes of a multi-GPU job: the main process may never say
        it (it waits in a collective, or fails on the broken connection). After a moment, so that a
        main process failing alike (bad input) writes its own message, the job is failed with this
        one unless it has ended already."""
        time.sleep(OTHER_PROCESS_GRACE_S)
        if self._job_status() in ("COMPLETE", "STOPPED", "FAILED"):
            return
        self.failed(message)

    def _job_status(self) -> str:
        try:
            return str(resolved(self.lab.job.get_status()) or "")
        except Exception:
            return ""

    def _job_failed(self) -> bool:
        return self._job_status() == "FAILED"

    def stop_exit_status(self) -> int:
        if self.stop_reason in (LAB_STOP, TERMINATE):
            return 0  # the Lab asked (its flag, or the SIGTERM of its Stop): a clean, wanted end
        return super().stop_exit_status()

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: Path, name: str, keep: int = 0) -> None:
        if not hasattr(self.lab, "save_checkpoint"):
            return
        if path.parent.resolve() == self._job_folder("get_checkpoints_dir"):
            # written in the job's own folder (task_paths): listed, not copied (the SDK's copy
            # would remove its destination, here the checkpoint itself, first)
            listed = self._listed_checkpoints()
            self._set_fields({"checkpoints": [*listed, str(path)], "latest_checkpoint": str(path)})
        else:
            self.lab.save_checkpoint(str(path), name)
        if keep:
            self._quietly(self._prune_checkpoints, keep)

    def _job_folder(self, getter: str) -> Path | None:
        """One of the job's folders (the SDK's get_artifacts_dir / get_checkpoints_dir) when it is
        on this machine."""
        try:
            folder = str(resolved(getattr(self.lab, getter)()))
        except Exception:
            return None
        return None if "://" in folder else Path(folder).resolve()

    def _listed_checkpoints(self) -> list:
        listed = self.lab.get_job_data().get("checkpoints") if hasattr(self.lab, "get_job_data") else None
        return listed if isinstance(listed, list) else []

    def _prune_checkpoints(self, keep: int) -> None:
        """The job's checkpoints beyond the newest `keep` (checkpoints_total_limit), removed from its
        checkpoints folder (which may be remote) and from its list."""
        from lab import storage

        from ..run.checkpoint import PREFIX

        def name_of(item: Any) -> str:
            return str(item).rstrip("/").rsplit("/", 1)[-1]

        folder = resolved(self.lab.job.get_checkpoints_dir())
        ours = sorted((int(name_of(item)[len(PREFIX):]), str(item))
                      for item in resolved(storage.ls(folder, detail=False))
                      if name_of(item).startswith(PREFIX) and name_of(item)[len(PREFIX):].isdigit())
        for _, item in ours[:-keep]:
            resolved(storage.rm_tree(item))
        kept = {name_of(item) for _, item in ours[-keep:]}
        listed = self._listed_checkpoints()
        still = [c for c in listed if not name_of(c).startswith(PREFIX) or name_of(c) in kept]
        if still != listed:
            self._set_fields({"checkpoints": still})

    def checkpoint_to_resume(self) -> Path | None:
        if not hasattr(self.lab, "get_checkpoint_to_resume"):
            return None
        found = self.lab.get_checkpoint_to_resume()
        if not found:
            return None
        if "://" not in str(found):
            return Path(found)
        return self._fetched(str(found))

    def _fetched(self, remote: str) -> Path:
        """A remote workspace's checkpoint, copied to this machine once: one folder per job and
        checkpoint, which every process of the machine (and a later attempt of the job) reuses."""
        from lab import storage

        name = Path(remote.rstrip("/")).name
        job = re.sub(r"[^\w.-]", "_", str(getattr(self.lab.job, "id", "") or os.environ.get("_TFL_JOB_ID", "job")))
        local = Path(tempfile.gettempdir()) / "diffusion_trainer_resume" / job / name
        if local.is_dir():
            return local
        def copy(staging: Path) -> None:
            staging.rmdir()  # the SDK's copy_dir makes the folder itself
            resolved(storage.copy_dir(remote, str(staging)))

        return atomic.write_folder(local, copy, keep_existing=True)  # another process may finish first

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
    """Each eval's grid (the image itself for one prompt at one seed), the before-vs-after grid and the
    loss curve, by artifact name."""
    grids = [*result.eval_images, *getattr(result, "extra_grids", [])]  # the EMA grids first, then those without
    out: dict[str, Path] = {f"eval_{p.name}": p for p in grids}
    figures_dir = result.paths.logs_dir
    if len(result.eval_images) > 1 and result.eval_images[0].stem == BEFORE:
        grid = figures.before_after(result.eval_images[0], result.eval_images[-1], figures_dir / "before_after.png")
        out["before_after.png"] = grid
    if result.losses:
        out["loss.png"] = figures.loss_curve(result.losses, figures_dir / "loss.png")
    return out


def write_sweep_metrics(output_dir: Path, result: Any) -> Path:
    """<output_dir>/metrics.json: what the plugin Lab's sweeps rank runs by (sweep_metric "val/loss" with a
    validation_split, else "train/loss"; lower is better)."""
    return write_metrics(output_dir / "metrics.json",
                         run_metrics(result.steps, result.epochs, result.final_loss, result.validation))
