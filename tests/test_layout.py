"""The house by role: each part imports only the parts below it (README, "How the code is laid out").

Read from the source (every import, at module level or inside a function), so a new module that
reaches across the house fails here, naming the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_trainer"
GROUND = {"atomic", "errors", "hub_ids", "lora", "objectives", "params", "reporting", "seeds"}
ENTRY = {"cli", "launch", "__init__"}  # the command line and the public launcher may start anything
# part -> the parts it may import (itself always)
ALLOWED = {
    "ground": {"ground"},
    "families": {"ground"},
    "data": {"ground"},
    "outputs": {"ground", "data", "families"},
    "memory": {"ground", "families"},
    "run": {"ground", "families", "data", "outputs", "memory"},
    "lab": {"ground", "outputs", "run"},
    "demo": {"ground", "run"},
}
EXCEPTIONS = {("params", "outputs.layout")}  # the reserved adapter names are the layout's folder names


def part_of(module: str) -> str:
    head = module.split(".")[0]
    if head in GROUND:
        return "ground"
    if head in ENTRY:
        return "entry"
    return head


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, int]]:
    """(imported module inside the package, line) for every import in the file."""
    here = path.relative_to(root).with_suffix("").parts
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
                found += [(name, node.lineno) for name in names if name]
            elif node.module and node.module.startswith("diffusion_trainer"):
                found.append((node.module.removeprefix("diffusion_trainer").lstrip("."), node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("diffusion_trainer").lstrip("."), node.lineno) for a in node.names
                      if a.name.startswith("diffusion_trainer.")]
    return found


def sdk_imports(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "lab":
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "lab" for a in node.names):
            lines.append(node.lineno)
    return lines


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_each_part_imports_only_the_parts_below_it():
    crossings = []
    for path in modules():
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        mine = part_of(name)
        if mine == "entry":
            continue
        for target, line in imports(path):
            theirs = part_of(target)
            if theirs != mine and theirs not in ALLOWED[mine] and (name, target) not in EXCEPTIONS:
                crossings.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({mine}) imports {target} ({theirs})")
    assert crossings == []


def test_only_the_lab_part_imports_the_lab_sdk():
    outside = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in modules() if p.parent.name != "lab"
               for line in sdk_imports(p)]
    assert outside == []
    assert sdk_imports(PACKAGE / "lab" / "launch.py")  # the check reads the imports it is meant to


def test_the_checker_reads_relative_and_absolute_imports(tmp_path):
    module = tmp_path / "data" / "x.py"
    module.parent.mkdir()
    module.write_text("from ..run.train import run_training\nfrom . import images\n\n\ndef f():\n"
                      "    from diffusion_trainer.outputs import layout\n")
    assert sorted(imports(module, tmp_path)) == [("data.images", 2), ("outputs", 6), ("run.train", 1)]
    found = {target for path in modules() for target, _ in imports(path)}
    assert {"run.job", "outputs.layout", "data.sources", "errors"} <= found


def test_every_part_says_what_it_owns_and_may_import():
    for part in ("data", "run", "outputs", "lab", "demo", "families", "memory"):
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())) or ""
        assert "Owns:" in doc and "May import:" in doc, part
