"""Where progress goes and where a stop request comes from.

The loop talks to a Reporter: `advance` every optimizer step (cheap), `report` when it has
read the loss, `stop_requested` to learn whether to end early. The terminal reporter draws a
tqdm bar; the Lab reporter (lab/reporter.py) also writes the job through the `transformerlab` SDK.

Stopping: while a run is under `catching_stop_signals()`, SIGINT (Ctrl-C) and SIGTERM (what
Transformer Lab's Stop sends, SIGKILL following 3 s later) only set `stop_reason`; the loop
ends at the next step boundary and the adapter is saved. A second Ctrl-C aborts. A standalone
run that was stopped exits 130 (SIGINT) or 143 (SIGTERM), as a shell expects of a killed job.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

# Why a run stopped early, as recorded on the run result.
INTERRUPT, TERMINATE, LAB_STOP = "interrupted (SIGINT)", "terminated (SIGTERM)", "stopped from the Lab"
STOP_SIGNALS = {signal.SIGINT: INTERRUPT, signal.SIGTERM: TERMINATE}
EXIT_STATUS = {INTERRUPT: 128 + signal.SIGINT, TERMINATE: 128 + signal.SIGTERM}


class Reporter:
    """Terminal reporting: messages on stderr, a progress bar when stderr is a terminal."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._last_line = 0.0
        self.stop_reason: str | None = None
        self.sigterm_received = False  # SIGKILL follows within seconds: leave as soon as all is saved

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

    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def stop_asked_here(self) -> bool:
        """This process's own answer, no collective: for work one process does alone (eval images)."""
        return self.stop_reason is not None

    # --- outputs and endings -------------------------------------------------------------
    def record_outputs(self, *, eval_images_dir: Path | None, tensorboard_dir: Path) -> None:
        pass

    def adapter_saved(self, folder: Path, name: str) -> None:
        """The adapter is complete at `folder`: hand it over first (a stop has seconds left)."""

    def publish(self, result: Any, params: Any) -> None:
        """Hand the finished (or stopped) run's other files to wherever they are shown."""

    def completed(self, message: str, score: dict[str, float]) -> None:
        pass

    def stopped(self, message: str) -> None:
        pass

    def failed(self, message: str) -> None:
        pass

    def stop_exit_status(self) -> int:
        return EXIT_STATUS.get(self.stop_reason or "", 0)

    # --- checkpoints (the Lab keeps them; a terminal run keeps its own files) ----------------
    def save_checkpoint(self, path: Path, name: str, keep: int = 0) -> None:
        """Offer a checkpoint folder already written at `path` to the job, which keeps the newest
        `keep` of those offered (0: all)."""

    def checkpoint_to_resume(self) -> Path | None:
        """A local checkpoint folder the job asks to resume from, if any."""
        return None

    # --- SIGINT / SIGTERM: the first asks for a clean stop (adapter saved) ------------------
    @contextmanager
    def catching_stop_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.sigterm_received = self.sigterm_received or signum == signal.SIGTERM
        if self.stop_reason is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # stopping already (the Lab's flag, or a repeated SIGTERM)
        self.stop_reason = STOP_SIGNALS[signal.Signals(signum)]
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        # Only the terminal here: a handler must not re-enter the SDK's file writes.
        Reporter.warn(self, f"{self.stop_reason}: stopping after this step and saving the adapter{again}.")


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For data-loader workers (worker_init_fn): Ctrl-C and the Lab's Stop signal the whole
    process group, and a worker killed mid-epoch fails the run before the adapter is saved. The
    main process decides when to stop; its workers end with the loader (or with SIGKILL)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def quiet_libraries() -> None:
    """Library chatter (load bars, deprecation notes) buries our own messages."""
    import logging
    import os
    import warnings

    # Said on import by torchao and bitsandbytes (base_precision int8/nf4), whatever the run's settings.
    for name in ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
