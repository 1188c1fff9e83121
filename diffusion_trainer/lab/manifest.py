"""index.json's `model_architectures`, `parameters`, `parameters_ui` and `files`, task.yaml (the
current Lab's task), and the parameter sections of info.md and README.md, generated from the schema so that they
cannot disagree with it.

    python -m diffusion_trainer.lab.manifest           rewrite them
    python -m diffusion_trainer.lab.manifest --check   exit 1 if any is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt

from ..params import FIELDS

ROOT = Path(__file__).resolve().parents[2]
INDEX = ROOT / "index.json"
TASK_YAML = ROOT / "task.yaml"
TOP_LEVEL_FILES = ("main.py", "setup.sh", "requirements.txt", "info.md", "index.json")
PACKAGE_SUFFIXES = {".py", ".json", ".safetensors", ".txt"}
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
LIMIT_KEYS = {Ge: ("minimum", "ge"), Le: ("maximum", "le"), Gt: ("exclusiveMinimum", "gt"),
              Lt: ("exclusiveMaximum", "lt")}


def lab_parameters() -> tuple[dict[str, Any], dict[str, Any]]:
    parameters: dict[str, Any] = {}
    ui: dict[str, Any] = {}
    for name, field in FIELDS.items():
        extra = field.json_schema_extra or {}
        if not extra.get("lab_form", True):
            continue
        annotation = field.annotation
        entry: dict[str, Any] = {"title": field.title}
        if get_origin(annotation) is Literal:
            entry["type"] = "string"
            entry["enum"] = list(get_args(annotation))
        else:
            entry["type"] = JSON_TYPES[annotation]
        if field.is_required():  # the form insists on it; starts empty, as in task.yaml
            entry["required"] = True
        entry["default"] = "" if field.is_required() else field.default
        for constraint in field.metadata:
            for kind, (key, attr) in LIMIT_KEYS.items():
                if isinstance(constraint, kind):
                    entry[key] = getattr(constraint, attr)
        parameters[name] = entry
        ui[name] = {"ui:help": field.description}
        if extra.get("widget"):
            ui[name]["ui:widget"] = extra["widget"]
    return parameters, ui


def plugin_files() -> list[str]:
    package = ROOT / "diffusion_trainer"
    inside = sorted(p.relative_to(ROOT).as_posix() for p in package.rglob("*")
                    if p.is_file() and p.suffix in PACKAGE_SUFFIXES and "__pycache__" not in p.parts)
    return [*TOP_LEVEL_FILES, *inside]


def generated_index() -> dict[str, Any]:
    index = json.loads(INDEX.read_text())
    from ..run.train import trained_pipeline_classes

    index["model_architectures"] = trained_pipeline_classes()
    index["parameters"], index["parameters_ui"] = lab_parameters()
    index["files"] = plugin_files()
    return index


def render(index: dict[str, Any]) -> str:
    return json.dumps(index, indent=2, ensure_ascii=False) + "\n"


# --- task.yaml (the current Lab's tasks) ----------------------------------------------------

TASK_NAME = "diffusion-trainer-lora"
TASK_ACCELERATORS = "L4:1"  # 24 GB: the memory plan fits FLUX.1-dev at 1024 px (fp8 + checkpointing), and all smaller models
# setup.sh installs requirements.txt on top of the Lab's torch without replacing it.
TASK_SETUP = "bash setup.sh"
TASK_ENVS = {"HF_TOKEN": "{{secret._HF_TOKEN}}", "WANDB_API_KEY": "{{secret._WANDB_API_KEY}}",
             "PYTHONUNBUFFERED": "1"}


def task_run_command() -> str:
    """The task's `run` line: how the Lab starts a training process."""
    return "python -m diffusion_trainer.launch"  # main.py on every visible GPU (see run/launch.py)


def task_parameters() -> dict[str, Any]:
    """Every parameter with its default; a required one starts empty (the run names it if left so)."""
    return {name: "" if field.is_required() else field.default
            for name, field in FIELDS.items()}


def generated_task() -> dict[str, Any]:
    return {
        "name": TASK_NAME,
        "resources": {"accelerators": TASK_ACCELERATORS},
        "envs": TASK_ENVS,
        "setup": TASK_SETUP,
        "run": task_run_command(),
        "parameters": task_parameters(),
    }


def _yaml_scalar(value: Any) -> str:
    # JSON's strings, integers and booleans are valid YAML scalars; a float needs a '.' in its
    # mantissa for YAML 1.1 readers (PyYAML reads 1e-08 as a string).
    text = json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and "e" in text and "." not in text.split("e")[0]:
        text = text.replace("e", ".0e", 1)
    return text


def render_task(task: dict[str, Any]) -> str:
    required = ", ".join(n for n, f in FIELDS.items() if f.is_required())
    lines = ["# Transformer Lab task (the current Lab): import this repository as a task.",
             "# Generated from diffusion_trainer/params.py by `python -m diffusion_trainer.lab.manifest`;",
             f"# do not edit by hand. Fill in {required} before the first run.",
             "# Parameters are documented in info.md."]
    for key, value in task.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


# --- docs ------------------------------------------------------------------------------------

START, END = "<!-- parameters:start (generated by python -m diffusion_trainer.lab.manifest) -->", "<!-- parameters:end -->"


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, field in FIELDS.items():
        groups.setdefault((field.json_schema_extra or {})["group"], []).append(name)
    return groups


def _allowed(name: str) -> str:
    field = FIELDS[name]
    if get_origin(field.annotation) is Literal:
        return " \\| ".join(f"`{v}`" for v in get_args(field.annotation))
    bounds = {key: getattr(c, attr) for c in field.metadata for kind, (key, attr) in LIMIT_KEYS.items()
              if isinstance(c, kind)}
    low = f"{bounds['minimum']} ≤ " if "minimum" in bounds else f"{bounds['exclusiveMinimum']} < " if "exclusiveMinimum" in bounds else ""
    high = f" ≤ {bounds['maximum']}" if "maximum" in bounds else f" < {bounds['exclusiveMaximum']}" if "exclusiveMaximum" in bounds else ""
    kind = JSON_TYPES[field.annotation]
    return f"{low}{kind}{high}" if (low or high) else kind


def _default(name: str) -> str:
    field = FIELDS[name]
    return "*required*" if field.is_required() else f"`{json.dumps(field.default)}`"


def info_section() -> str:
    lines = []
    for group, names in _groups().items():
        lines += [f"### {group}", "", "| Parameter | Default | Allowed | What it does |", "|---|---|---|---|"]
        for name in names:
            lab_only = "" if (FIELDS[name].json_schema_extra or {}).get("lab_form", True) else " (standalone; the Lab fills it in)"
            lines.append(f"| `{name}` | {_default(name)} | {_allowed(name)} | {FIELDS[name].description}{lab_only} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def readme_section() -> str:
    return "\n".join(f"- **{group}**: " + ", ".join(f"`{n}`" for n in names) for group, names in _groups().items())


def with_section(text: str, section: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{section}\n{END}{tail}"


def outputs() -> dict[Path, str]:
    return {
        INDEX: render(generated_index()),
        TASK_YAML: render_task(generated_task()),
        ROOT / "info.md": with_section((ROOT / "info.md").read_text(), info_section()),
        ROOT / "README.md": with_section((ROOT / "README.md").read_text(), readme_section()),
    }


def main(argv: list[str]) -> int:
    stale = [path for path, text in outputs().items() if not path.is_file() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.name} is out of date: run `python -m diffusion_trainer.lab.manifest`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs().items():
        path.write_text(text)
    print("wrote " + ", ".join(p.name for p in outputs()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
