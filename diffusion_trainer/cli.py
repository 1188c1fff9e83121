"""The command line: which kind of run this is, from its arguments and environment.

    python main.py                                  the built-in demo run
    python main.py --config run.json [--set k=v …]  standalone
    python main.py --input_file plugin_input.json   Transformer Lab's plugin harness
    python main.py export <adapter_dir> [--format kohya|diffusers]   the adapter in another form
    python main.py plan --config run.json [--gpu-memory-gb 16] [--json]   the memory plan (no GPU, no weights)
    _TFL_JOB_ID=… python main.py                    a Transformer Lab task (the `transformerlab` SDK)

The Lab launches live in lab/launch.py; running one configuration, in run/job.py.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from .reporting import quiet_libraries
from .run.job import EXIT_BAD_INPUT, parse_overrides, read_config, run_standalone


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
    if unknown and args.input_file is None and not os.environ.get("_TFL_JOB_ID"):
        parser.error(unknown_arguments(unknown, parser))  # exit 2, before anything runs
    if unknown:  # the Lab's launchers may pass arguments of their own
        print(f"WARNING: ignoring unknown command-line arguments: {' '.join(unknown)}", file=sys.stderr)
    return args


def unknown_arguments(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    known = [option for action in parser._actions if action.help != argparse.SUPPRESS
             for option in action.option_strings]
    close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown argument(s) {' '.join(unknown)}{hint}; see --help"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # python main.py export <adapter_dir> [--format …]: see export.py
        from .outputs.export import main as export_main

        quiet_libraries()
        return export_main(argv[1:])
    if argv[:1] == ["plan"]:
        quiet_libraries()
        return plan_main(argv[1:])
    args = parse_args(argv)
    quiet_libraries()
    if args.input_file is not None:
        from .lab.launch import run_lab_plugin

        return run_lab_plugin(args.input_file, args.experiment_name, args.job_id, args.workspace_dir)
    if os.environ.get("_TFL_JOB_ID"):
        from .lab.launch import run_lab_task

        return run_lab_task(args.config, args.set)
    if args.config is None and not args.set:
        from .demo.star_demo import run_demo

        return run_demo()
    try:
        raw = read_config(args.config) if args.config else {}
        raw.update(parse_overrides(args.set))
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .lab.keys import is_bookkeeping  # a config the Lab wrote (a job's, a plugin input file) works too

    return run_standalone(raw, is_bookkeeping)


def plan_main(argv: list[str]) -> int:
    """`main.py plan`: print the run's memory plan; exit 0 when it fits, 2 naming what to change."""
    import json

    from .errors import InputError
    from .params import ParamsError, parse_params

    parser = argparse.ArgumentParser(prog="main.py plan", description="Print the memory plan of a run "
                                     "(from the model's config files; no GPU and no weights needed).")
    parser.add_argument("--config", type=Path, help="JSON file of parameters")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpu-memory-gb", type=float, help="GPU memory to plan for (default: gpu_memory_gb, "
                        "else this GPU's free memory)")
    parser.add_argument("--host-memory-gb", type=float, help="host RAM to plan for (default: not checked; a run "
                        "checks this machine's)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (peak_gb, settings, stages)")
    args = parser.parse_args(argv)
    try:
        raw = read_config(args.config) if args.config else {}
        raw.update(parse_overrides(args.set))
        if args.gpu_memory_gb is not None:
            raw["gpu_memory_gb"] = args.gpu_memory_gb
        params, _ = parse_params(raw, lambda key: True)
        from .memory.plan import plan_for

        if args.host_memory_gb is not None and args.host_memory_gb <= 0:
            raise InputError(f"--host-memory-gb: must be greater than 0 (got {args.host_memory_gb:g}); leave it out "
                             "to not check host RAM.")
        plan = plan_for(params, host_budget_gb=args.host_memory_gb)
    except (ValueError, ParamsError, InputError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(plan.as_json(), indent=2) if args.json else "\n".join(plan.lines()))
    return 0
