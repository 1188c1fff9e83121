"""Where parameters come from, and how the run ends.

    python main.py                                  the built-in demo run
    python main.py --config run.json [--set k=v …]  standalone
    python main.py --input_file plugin_input.json   Transformer Lab's plugin harness
    python main.py export <adapter_dir> [--format kohya|diffusers]   the adapter in another form
    _TFL_JOB_ID=… python main.py                    a Transformer Lab task (the `transformerlab` SDK)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="main.py", description="Fine-tune a diffusion model with a LoRA adapter. With no "
        "arguments, runs the built-in demo. Parameters are documented in README.md and info.md.")
    parser.add_argument("--config", type=Path, help="JSON file of parameters")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter (repeatable)")
    parser.add_argument("--input_file", type=Path, help="Transformer Lab plugin input (config + experiment)")
    parser.add_argument("--experiment_name", help="Transformer Lab experiment (with --input_file)")
    parser.add_argument("--job_id", help="Transformer Lab job id (with --input_file)")
    parser.add_argument("--plugin_dir", help=argparse.SUPPRESS)
    parser.add_argument("--workspace_dir", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"WARNING: ignoring unknown command-line arguments: {' '.join(unknown)}", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # python main.py export <adapter_dir> [--format …]: see export.py
        from .export import main as export_main

        quiet_libraries()
        return export_main(argv[1:])
    args = parse_args(argv)
    quiet_libraries()
    if args.input_file is not None:
        return run_lab_plugin(args)
    if os.environ.get("_TFL_JOB_ID"):
        return run_lab_task(args)
    if args.config is None and not args.set:
        from .demo import run_demo

        return run_demo()
    try:
        raw = read_config(args.config) if args.config else {}
        raw.update(parse_overrides(args.set))
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_standalone(raw)


# --- standalone ------------------------------------------------------------------------------

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


def run_standalone(raw: dict[str, Any]) -> int:
    from .reporting import Reporter
    from .train import RunPaths

    reporter = Reporter()
    params = validated(raw, reporter)
    if params is None:
        return EXIT_BAD_INPUT
    return execute(params, RunPaths.standalone(params), reporter)


def validated(raw: dict[str, Any], reporter: Any):
    from .params import ParamsError, parse_params

    try:
        params, warnings = parse_params(raw)
    except ParamsError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        reporter.failed(str(exc))
        return None
    for warning in warnings:
        reporter.warn(warning)
    return params


def execute(params: Any, paths: Any, reporter: Any, lab_datasets_dir: Path | None = None) -> int:
    """Run training and end the job: COMPLETE, STOPPED (adapter saved) or FAILED (message)."""
    from .errors import InputError
    from .train import run_training

    try:
        result = run_training(params, paths, reporter, lab_datasets_dir)
    except InputError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        reporter.failed(str(exc))
        return EXIT_BAD_INPUT
    except Exception as exc:
        traceback.print_exc()
        reporter.failed(f"Training failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    print(summary(result), flush=True)
    if result.status == "stopped":
        reporter.stopped(f"Stopped at step {result.steps}; adapter saved to {paths.adapter_dir}")
    else:
        score = {"final_loss": result.final_loss} if result.final_loss is not None else {}
        reporter.completed(f"Adapter saved to {paths.adapter_dir}", score)
    return EXIT_OK


def summary(result: Any) -> str:
    loss = f", last loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    head = "Stopped early" if result.status == "stopped" else "Done"
    lines = [f"{head} in {result.seconds:.1f} s: {result.steps} optimizer steps, {result.epochs} epochs{loss}.",
             f"  adapter:     {result.paths.adapter_dir}"]
    if result.eval_images:
        lines.append(f"  eval images: {result.paths.eval_images_dir} ({len(result.eval_images)} PNG)")
    lines.append(f"  logs:        {result.paths.logs_dir}  (tensorboard --logdir {result.paths.logs_dir})")
    return "\n".join(lines)


# --- Transformer Lab -------------------------------------------------------------------------

def run_lab_plugin(args: argparse.Namespace) -> int:
    """The plugin-harness launch: --input_file {"experiment": …, "config": …}."""
    try:
        data = json.loads(args.input_file.read_text())
        config = dict(data["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"ERROR: --input_file {args.input_file}: cannot read its 'config' ({exc})", file=sys.stderr)
        return EXIT_BAD_INPUT
    experiment = (args.experiment_name or (data.get("experiment") or {}).get("name")
                  or config.get("experiment_name") or "alpha")
    job_id = str(config.get("job_id") or args.job_id or "")
    if args.workspace_dir:
        os.environ.setdefault("TFL_WORKSPACE_DIR", args.workspace_dir)
    if job_id:
        os.environ["_TFL_JOB_ID"] = job_id
    os.environ["_TFL_EXPERIMENT_ID"] = str(experiment)
    lab = connect_lab()
    return run_in_lab(config, lab)


def run_lab_task(args: argparse.Namespace) -> int:
    """The task launch: _TFL_JOB_ID set, parameters in the job (the `transformerlab` SDK)."""
    lab = connect_lab()
    if lab is None:
        return EXIT_FAILED
    config = dict(lab.get_config())
    try:
        if args.config:
            config = {**read_config(args.config), **config}
        config.update(parse_overrides(args.set))
    except ValueError as exc:
        lab.error(str(exc))
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_in_lab(config, lab)


def connect_lab():
    """The SDK's `lab`, initialised on the job named by _TFL_JOB_ID; None if that fails."""
    home = os.environ.get("TFL_HOME_DIR")
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)  # `import lab` exits the process otherwise
    try:
        from lab import lab

        lab.init()
        return lab
    except Exception as exc:
        print(f"WARNING: could not attach to the Transformer Lab job ({type(exc).__name__}: {exc}); "
              "training anyway, reporting to this terminal only.", file=sys.stderr)
        return None


def run_in_lab(config: dict[str, Any], lab: Any) -> int:
    import asyncio

    from .reporting import LabReporter, Reporter

    reporter = LabReporter(lab) if lab is not None else Reporter()
    hub_id = str(config.get("model_name") or "")
    if str(config.get("model_path") or "").strip():
        config["model_name"] = config["model_path"]  # the Lab's local copy, when it has one
    params = validated(config, reporter)
    if params is None:
        return EXIT_BAD_INPUT
    workspace, job_dir = None, None
    if lab is not None:
        from lab import dirs

        workspace = Path(asyncio.run(dirs.get_workspace_dir()))
        job_dir = Path(asyncio.run(lab.job.get_dir()))
    paths = lab_paths(params, config, hub_id, workspace, job_dir)
    return execute(params, paths, reporter, workspace / "datasets" if workspace else None)


def lab_paths(params: Any, config: dict[str, Any], hub_id: str, workspace: Path | None,
              job_dir: Path | None):
    """Where the Lab looks: adaptor_output_dir, <output_dir>/job_<id> for TensorBoard, and the
    job's own folder for eval images."""
    from werkzeug.utils import secure_filename

    from .train import RunPaths

    fallback = RunPaths.standalone(params)
    adapter_dir = config.get("adaptor_output_dir")
    if not adapter_dir and workspace is not None:
        adapter_dir = workspace / "adaptors" / secure_filename(hub_id or params.model_name) / params.adaptor_name
    job_id = config.get("job_id") or os.environ.get("_TFL_JOB_ID") or "local"
    logs_dir = Path(params.output_dir) / f"job_{job_id}"
    return RunPaths(
        adapter_dir=Path(adapter_dir) if adapter_dir else fallback.adapter_dir,
        eval_images_dir=(job_dir / "eval_images") if job_dir else fallback.eval_images_dir,
        logs_dir=logs_dir,
    )


def quiet_libraries() -> None:
    """Library chatter (load bars, deprecation notes) buries our own messages."""
    import warnings

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
