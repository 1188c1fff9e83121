"""Run one validated configuration and end it: the piece the command line, the demo and the
Lab launches share.

    parameters -> validated() -> execute(): train under the reporter's signal handling, then
    end the job COMPLETE, STOPPED (adapter saved) or FAILED (message), and return the exit status.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config: no such file '{path}'") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config: '{path}' is not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a Lab plugin input file works too
    if not isinstance(data, dict):
        raise ValueError(f"--config: '{path}' must hold a JSON object of parameters")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got '{pair}'")
        overrides[key.strip()] = value
    return overrides


def run_standalone(raw: dict[str, Any], also_accepted: Any = lambda key: False) -> int:
    """A run from a JSON config / --set flags (or the demo): terminal progress, Ctrl-C stops."""
    from ..outputs.layout import RunPaths
    from ..reporting import Reporter
    from .processes import reporter_for_this_process

    reporter = reporter_for_this_process(Reporter())
    params = validated(raw, reporter, also_accepted)
    if params is None:
        return EXIT_BAD_INPUT
    return execute(params, RunPaths.under(params.output_dir, params.adaptor_name), reporter)


def validated(raw: dict[str, Any], reporter: Any, also_accepted: Any = lambda key: False):
    """The parameters, or None after telling the user (and the job) every problem; keys
    `also_accepted` says are expected (the Lab's bookkeeping) are not warned about."""
    from ..params import ParamsError, parse_params

    try:
        params, warnings = parse_params(raw, also_accepted)
    except ParamsError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        reporter.failed(str(exc))
        return None
    for warning in warnings:
        reporter.warn(warning)
    return params


def execute(params: Any, paths: Any, reporter: Any) -> int:
    """Train, hand the outputs to the reporter, end the job; the process's exit status."""
    from ..errors import InputError, Stopped
    from ..outputs.adapter import RunFailed
    from .processes import is_main_process
    from .train import run_training

    with reporter.catching_stop_signals():
        try:
            result = run_training(params, paths, reporter)
        except InputError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            reporter.failed(str(exc))
            return EXIT_BAD_INPUT
        except Stopped as exc:  # during the data check, caching or loading
            print(str(exc), file=sys.stderr)
            reporter.stopped(str(exc))
            if reporter.sigterm_received:
                exit_now(reporter.stop_exit_status())
            return reporter.stop_exit_status()
        except KeyboardInterrupt:  # the second Ctrl-C: abort without saving
            reporter.stopped("Aborted by a second Ctrl-C before the adapter was saved.")
            print("Aborted: nothing was saved.", file=sys.stderr)
            return reporter.stop_exit_status()
        except RunFailed as exc:  # the message says where the trained weights are
            print(f"ERROR: {exc}", file=sys.stderr)
            reporter.failed(str(exc))
            return EXIT_FAILED
        except Exception as exc:
            traceback.print_exc()
            reporter.failed(f"Training failed: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        result.stop_reason = reporter.stop_reason if result.status == "stopped" else None
        try:
            reporter.publish(result, params)
        except Exception as exc:  # the adapter is on disk; say where, and fail the job
            traceback.print_exc()
            reporter.failed(f"Training finished but its outputs could not be handed over "
                            f"({type(exc).__name__}: {exc}); the adapter is at {paths.adapter_dir}")
            return EXIT_FAILED
        if is_main_process():
            print(summary(result), flush=True)
        if result.status == "stopped":
            reporter.stopped(f"Stopped at step {result.steps} ({result.stop_reason}); "
                             f"adapter saved to {result.paths.adapter_dir}")
            if reporter.sigterm_received:
                exit_now(reporter.stop_exit_status())
            return reporter.stop_exit_status()
        score = {"final_loss": result.final_loss} if result.final_loss is not None else {}
        if result.validation:  # the held-out loss: what the job is judged by (lower is better)
            last = result.validation[-1][1]["val/loss"]
            score.update({"val/loss": last, "eval/loss": last})
        reporter.completed(f"Adapter saved to {result.paths.adapter_dir}", score)
        return EXIT_OK


def exit_now(status: int) -> None:
    """End the process with everything written: after SIGTERM, SIGKILL follows within seconds
    (3 s in the Lab), and the interpreter's teardown of torch alone can take longer than that."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def summary(result: Any) -> str:
    loss = f", last loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    head = "Stopped early" if result.status == "stopped" else "Done"
    lines = [f"{head} in {result.seconds:.1f} s: {plural(result.steps, 'optimizer step')}, {plural(result.epochs, 'epoch')}{loss}.",
             f"  adapter:     {result.paths.adapter_dir}"]
    if result.eval_images:
        lines.append(f"  eval images: {result.paths.eval_images_dir} ({len(result.eval_images)} PNG)")
    lines.append(f"  logs:        {result.paths.logs_dir}  (tensorboard --logdir {result.paths.logs_dir})")
    return "\n".join(lines)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
