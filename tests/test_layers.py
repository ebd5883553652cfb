"""The layers, held (issue 26): every import of ours, read from the source with ``ast``, must run
downwards.

    errors                  imports nothing of ours
    models, pipeline        errors, and themselves
    train                   errors, models, pipeline, itself; benchmarks only in the CLI's
                            dispatch (train/cli.py: cmd_bench, cmd_ablate)
    benchmarks              anything but the CLI (no re-entry through train/cli.py)

and inside pipeline, only the Loader and the engines themselves import ``pipeline.engines``
(storage, stages and ops know no engine)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("errors", "models", "pipeline", "train", "benchmarks")
ALLOWED = {
    "errors": set(),
    "models": {"errors", "models"},
    "pipeline": {"errors", "pipeline"},
    "train": {"errors", "models", "pipeline", "train"},
    "benchmarks": {"errors", "models", "pipeline", "train", "benchmarks"},
}
CLI_DISPATCH = {("train/cli.py", "cmd_bench"), ("train/cli.py", "cmd_ablate")}


def _module(path: Path) -> list[str]:
    """``tricks.<package>.<…>`` name parts of a source file."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ["tricks", *parts]


def imports_of(path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, enclosing function or None, line) for every import of ours."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Import):
                found.extend((a.name, func, child.lineno) for a in child.names
                             if a.name.startswith("tricks"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[:len(package) - child.level + 1]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                if name.startswith("tricks"):
                    # `from tricks.pipeline import engines` names a module too
                    found.append((name, func, child.lineno))
            visit(child, f)

    visit(tree, None)
    return found


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def test_the_walk_sees_relative_and_absolute_imports():
    found = {name for name, _, _ in imports_of(ROOT / "pipeline" / "loader.py")}
    assert {"tricks.errors", "tricks.pipeline.engines.base", "tricks.pipeline.stages"} <= found
    cli = imports_of(ROOT / "train" / "cli.py")
    assert any(n.startswith("tricks.benchmarks") and f == "cmd_ablate" for n, f, _ in cli)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_downwards(package):
    wrong = []
    for pkg, path in _sources():
        if pkg != package:
            continue
        rel = str(path.relative_to(ROOT))
        for name, func, line in imports_of(path):
            target = name.split(".")[1] if "." in name else ""
            if target in ALLOWED[package]:
                if package == "benchmarks" and name.startswith("tricks.train.cli"):
                    wrong.append(f"{rel}:{line} imports {name} (re-enters through the CLI)")
                continue
            if target == "benchmarks" and (rel, func) in CLI_DISPATCH:
                continue
            wrong.append(f"{rel}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_only_the_loader_and_the_engines_know_the_engines():
    wrong = []
    for pkg, path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if pkg != "pipeline" or rel.startswith("pipeline/engines/") or rel == "pipeline/loader.py":
            continue
        wrong += [f"{rel}:{line} imports {name}" for name, _, line in imports_of(path)
                  if name.startswith("tricks.pipeline.engines")]
    assert not wrong, "\n".join(wrong)
