"""Transformer Lab launches: where the parameters come from and where the files go.

    python main.py --input_file plugin_input.json    the plugin Lab's harness (app <= v0.30.3)
    _TFL_JOB_ID=… python main.py                     a task of the current Lab (task.yaml)
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from ..outputs.layout import RunPaths
from ..run.job import EXIT_BAD_INPUT, EXIT_FAILED, execute, parse_overrides, read_config, validated
from .datasets import resolve_dataset_name
from .keys import is_bookkeeping
from .reporter import PLUGIN, TASK, LabReporter, resolved


def run_lab_plugin(input_file: Path, experiment_name: str | None, job_id: str | None,
                   workspace_dir: str | None) -> int:
    """The plugin-harness launch: --input_file {"experiment": …, "config": …}."""
    try:
        data = json.loads(Path(input_file).read_text())
        config = dict(data["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"ERROR: --input_file {input_file}: cannot read its 'config' ({exc})", file=sys.stderr)
        return EXIT_BAD_INPUT
    experiment = (experiment_name or (data.get("experiment") or {}).get("name")
                  or config.get("experiment_name") or "alpha")
    job_id = str(config.get("job_id") or job_id or "")
    if workspace_dir:
        os.environ.setdefault("TFL_WORKSPACE_DIR", workspace_dir)
    if job_id:
        os.environ["_TFL_JOB_ID"] = job_id
    os.environ["_TFL_EXPERIMENT_ID"] = str(experiment)
    return run_in_lab(config, connect_lab(), PLUGIN)


def run_lab_task(config_file: Path | None, overrides: list[str]) -> int:
    """The task launch: _TFL_JOB_ID set, parameters in the job (defaults merged with the user's
    values by the Lab). A --config file on the run line fills gaps; --set flags win."""
    drop_unresolved_secrets()
    lab = connect_lab()
    if lab is None:
        return EXIT_FAILED
    config = job_parameters(lab)
    try:
        if config_file:
            config = {**read_config(config_file), **config}
        config.update(parse_overrides(overrides))
    except ValueError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        from ..run.processes import reporter_for_this_process

        reporter_for_this_process(LabReporter(lab, TASK)).failed(str(exc))
        return EXIT_BAD_INPUT
    return run_in_lab(config, lab, TASK)


def job_parameters(lab: Any, wait_s: float = 20.0) -> dict[str, Any]:
    """The job's parameters. The SDK rewrites the job's file in place (truncate, then write), and
    the main process does so as it starts (lab.init), so another process can read it empty: those
    read again until the parameters appear."""
    from ..run.processes import is_main_process

    deadline = time.monotonic() + (0.0 if is_main_process() else wait_s)
    while True:
        config = dict(lab.get_config() or {})
        if config or time.monotonic() >= deadline:
            return config
        time.sleep(0.1)


def drop_unresolved_secrets() -> None:
    """The Lab leaves `{{secret._NAME}}` as it is when the user has no such secret; sent as a
    token it would make even public hub downloads fail (401), so treat it as unset."""
    for key in [k for k, v in os.environ.items() if re.fullmatch(r"\{\{\s*secret\.[^}]*\}\}", v.strip())]:
        print(f"{key}: no such secret in the Lab; left unset.", file=sys.stderr)
        del os.environ[key]


def connect_lab():
    """The SDK's `lab`, initialised on the job named by _TFL_JOB_ID; None if that fails."""
    home = os.environ.get("TFL_HOME_DIR")
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)  # `import lab` exits the process otherwise
    try:
        from lab import lab

        from ..run.processes import is_main_process

        if not is_main_process():
            return attach_lab_read_only(lab)  # one of several processes: only the main one writes the job
        lab.init()
        return lab
    except Exception as exc:
        print(f"WARNING: could not attach to the Transformer Lab job ({type(exc).__name__}: {exc}); "
              "training anyway, reporting to this terminal only.", file=sys.stderr)
        return None


def run_in_lab(config: dict[str, Any], lab: Any, launch: str) -> int:
    from ..reporting import Reporter
    from ..run.processes import reporter_for_this_process

    hub_id = str(config.get("model_name") or "")
    if str(config.get("model_path") or "").strip():
        config["model_name"] = config["model_path"]  # the Lab's local copy, when it has one
    reporter = reporter_for_this_process(LabReporter(lab, launch, parent_model=hub_id) if lab is not None
                                         else Reporter())
    params = validated(config, reporter, is_bookkeeping)
    if params is None:
        return EXIT_BAD_INPUT
    workspace = local_workspace() if lab is not None else None
    if workspace is not None:  # a dataset the Lab knows by name: its folder in the workspace, or its hub id
        params = params.model_copy(update={"dataset_name": resolve_dataset_name(params.dataset_name,
                                                                                workspace / "datasets")})
    paths = plugin_paths(params, config, hub_id, workspace, lab) if launch == PLUGIN else task_paths(params, lab)
    return execute(params, paths, reporter)


def local_workspace() -> Path | None:
    """The Lab's workspace when it is a folder on this machine; None for remote storage
    (s3://, gs://…), which is reached only through the SDK."""
    from lab import dirs

    workspace = str(resolved(dirs.get_workspace_dir()))
    return Path(workspace) if "://" not in workspace and Path(workspace).is_dir() else None


def task_paths(params: Any, lab: Any = None):
    """The job's own folders when they are on this machine: checkpoints into the job's checkpoints
    folder and eval images into its artifacts folder (the Lab shows both as they are written, and
    nothing is copied), the adapter and the logs in <job folder>/output, from where the adapter is
    handed to the SDK; output_dir keeps only the latent cache, which later jobs reuse. With a remote
    workspace (s3://, gs://…) everything is written under output_dir and handed to the SDK."""
    folders = job_folders(lab) if lab is not None else None
    if folders is None:
        return RunPaths.under(params.output_dir, params.adaptor_name)
    job_dir, artifacts, checkpoints = folders
    return RunPaths(output_dir=Path(params.output_dir).expanduser(), adapter_dir=job_dir / "output" / params.adaptor_name,
                    eval_images_dir=artifacts, logs_dir=job_dir / "output" / "logs" / params.adaptor_name,
                    checkpoints_dir=checkpoints, own_checkpoints_dir=True)


def job_folders(lab: Any) -> tuple[Path, Path, Path] | None:
    """(job folder, artifacts folder, checkpoints folder) of the task's job, or None where the SDK
    offers none or they are not on this machine."""
    try:
        found = [str(resolved(lab.job.get_dir())), str(resolved(lab.get_artifacts_dir())),
                 str(resolved(lab.get_checkpoints_dir()))]
    except Exception:  # an SDK without them, or a job that cannot be read
        return None
    if any("://" in folder for folder in found):
        return None
    job_dir, artifacts, checkpoints = (Path(folder) for folder in found)
    return job_dir, artifacts, checkpoints


def plugin_paths(params: Any, config: dict[str, Any], hub_id: str, workspace: Path | None, lab: Any):
    """Where the plugin Lab looks: adaptor_output_dir, <output_dir>/job_<id> for TensorBoard,
    and the job's own folder for eval images."""
    from werkzeug.utils import secure_filename

    fallback = RunPaths.under(params.output_dir, params.adaptor_name)
    adapter_dir = config.get("adaptor_output_dir")
    if not adapter_dir and workspace is not None:
        adapter_dir = workspace / "adaptors" / secure_filename(hub_id or params.model_name) / params.adaptor_name
    job_id = config.get("job_id") or os.environ.get("_TFL_JOB_ID") or "local"
    job_dir = str(resolved(lab.job.get_dir())) if lab is not None else ""
    return RunPaths(
        output_dir=fallback.output_dir, checkpoints_dir=fallback.checkpoints_dir,
        adapter_dir=Path(adapter_dir) if adapter_dir else fallback.adapter_dir,
        eval_images_dir=Path(job_dir) / "eval_images" if job_dir and "://" not in job_dir else fallback.eval_images_dir,
        logs_dir=Path(params.output_dir) / f"job_{job_id}",
    )


def attach_lab_read_only(lab: Any) -> Any:
    """For the other processes of a multi-GPU Lab job: the SDK's `lab` attached to the job named
    by _TFL_JOB_ID without lab.init(), which writes the job (status, start time). They only read
    it (parameters, directories); the main process alone writes."""
    import asyncio

    from lab import Experiment, Job

    experiment_id = os.environ.get("_TFL_EXPERIMENT_ID") or "alpha"
    experiment = asyncio.run(Experiment.create_or_get(experiment_id, create_new=False))
    job = asyncio.run(Job.get(os.environ["_TFL_JOB_ID"], experiment.id))
    if job is None:
        raise RuntimeError(f"job {os.environ['_TFL_JOB_ID']} not found")
    lab._experiment, lab._job = experiment, job
    return lab
