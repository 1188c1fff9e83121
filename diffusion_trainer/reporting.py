"""Where progress goes and where a stop request comes from.

The loop talks to a Reporter: `advance` every optimizer step (cheap), `report` when it has
read the loss, `stop_requested` to learn whether to end early. The terminal reporter draws a
tqdm bar; the Lab reporter also writes the job through the `transformerlab` SDK, at most
about once a second, and reads the job's `stop` flag at the same pace.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class Reporter:
    """Terminal reporting: messages on stderr, a progress bar when stderr is a terminal."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._last_line = 0.0
        self._interrupted = False
        self._previous_sigint: Any = None

    # --- messages ------------------------------------------------------------------------
    def info(self, message: str) -> None:
        self._write(message)

    def warn(self, message: str) -> None:
        self._write(f"WARNING: {message}")

    def _write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    # --- progress ------------------------------------------------------------------------
    def begin(self, total_steps: int) -> None:
        self._bar = tqdm(total=total_steps, unit="step", desc="training", dynamic_ncols=True,
                         disable=None, file=sys.stderr)
        self._catch_ctrl_c()

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def report(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            if self._bar.disable:  # not a terminal (a log file): one plain line per report
                self._maybe_print_line(step, total, metrics)

    def _maybe_print_line(self, step: int, total: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if now - self._last_line >= 10 or step == total:
            self._last_line = now
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            print(f"step {step}/{total} {shown}", file=sys.stderr, flush=True)

    def end_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._release_ctrl_c()

    def stop_requested(self) -> bool:
        return self._interrupted

    # --- outputs and endings -------------------------------------------------------------
    def record_outputs(self, *, eval_images_dir: Path | None, tensorboard_dir: Path) -> None:
        pass

    def completed(self, message: str, score: dict[str, float]) -> None:
        pass

    # --- checkpoints (the Lab's Checkpoints panel and resume action) ----------------------
    def save_checkpoint(self, path: Path, name: str) -> None:
        """A checkpoint was written at `path`."""

    def checkpoint_to_resume(self) -> Path | None:
        """A checkpoint the launcher asks this run to continue from, if any."""
        return None

    def stopped(self, message: str) -> None:
        pass

    def failed(self, message: str) -> None:
        pass

    # --- Ctrl-C: the first asks for a clean stop (adapter saved), the second aborts -------
    def _catch_ctrl_c(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigint(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            self.warn("Stopping after this step and saving the adapter (Ctrl-C again to abort).")

        self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)

    def _release_ctrl_c(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


class LabReporter(Reporter):
    """Also reports to a Transformer Lab job through the `transformerlab` SDK."""

    def __init__(self, lab: Any, min_interval_s: float = 1.0) -> None:
        super().__init__()
        self.lab = lab
        self.min_interval_s = min_interval_s
        self._last_write = float("-inf")
        self._stop_flag = False

    def info(self, message: str) -> None:
        super().info(message)
        self._quietly(self.lab.log, message)

    def warn(self, message: str) -> None:
        super().warn(message)
        self._quietly(self.lab.log, f"WARNING: {message}")

    def report(self, step: int, total: int, metrics: dict[str, float]) -> None:
        super().report(step, total, metrics)
        now = time.monotonic()
        if now - self._last_write < self.min_interval_s and step < total:
            return
        self._last_write = now
        percent = min(99, int(100 * step / max(total, 1)))  # 100 only once the adapter is saved
        self._quietly(self.lab.update_progress, percent, metrics, step)
        self._stop_flag = self._read_stop_flag()

    def _read_stop_flag(self) -> bool:
        try:
            return bool(self.lab.get_job_data().get("stop"))
        except Exception:  # a job file caught mid-write reads as "not stopped"; checked again soon
            return self._stop_flag

    def stop_requested(self) -> bool:
        return self._stop_flag or super().stop_requested()

    def record_outputs(self, *, eval_images_dir: Path | None, tensorboard_dir: Path) -> None:
        if eval_images_dir is not None:
            self.lab.set_job_data_field("eval_images_dir", str(eval_images_dir))
        self.lab.set_job_data_field("tensorboard_output_dir", str(tensorboard_dir))

    def completed(self, message: str, score: dict[str, float]) -> None:
        self.lab.finish(message, score=score)

    def stopped(self, message: str) -> None:
        from lab import JobStatus

        asyncio.run(self.lab.job.update_job_data_fields({
            "completion_status": "stopped",
            "completion_details": message,
            "end_time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }))
        asyncio.run(self.lab.job.update_status(JobStatus.STOPPED))

    def failed(self, message: str) -> None:
        self.lab.error(message)

    def _quietly(self, call: Any, *args: Any) -> None:
        """Progress and log lines are best-effort: a busy job file must not kill a run."""
        try:
            call(*args)
        except Exception as exc:
            super().warn(f"could not update the Lab job ({type(exc).__name__}: {exc})")
