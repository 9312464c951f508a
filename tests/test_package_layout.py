"""The package's stages stay apart: calibration and surgery never import each other, and
surgery (like the shared model of a checkpoint) runs without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reapsurgery"


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every reapsurgery module each file of `package` imports, lazy (in-function) imports included."""
    found: dict[str, set[str]] = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        here = ["reapsurgery", *path.relative_to(PACKAGE).with_suffix("").parts]
        if here[-1] == "__init__":
            here.pop()
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level] if path.name != "__init__.py" else here[: len(here) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                names.add(mod)
                names.update(f"{mod}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        found[str(path.relative_to(PACKAGE))] = {n for n in names if n.startswith("reapsurgery")}
    return found


@pytest.mark.parametrize("package, forbidden", [("calibration", "reapsurgery.surgery"),
                                                ("surgery", "reapsurgery.calibration"),
                                                ("common", "reapsurgery.surgery"),
                                                ("common", "reapsurgery.calibration"),
                                                ("calibration", "reapsurgery.evaluation"),
                                                ("surgery", "reapsurgery.evaluation")])
def test_stage_does_not_import_the_other(package, forbidden):
    offenders = {f: sorted(m for m in mods if m == forbidden or m.startswith(forbidden + "."))
                 for f, mods in imported_modules(package).items()}
    assert not {f: m for f, m in offenders.items() if m}


def test_the_import_scan_sees_lazy_and_relative_imports():
    mods = imported_modules("cli")
    # cli/calibrate.py imports the calibration engine inside the command function
    assert "reapsurgery.calibration.calibrate" in mods["cli/calibrate.py"]
    assert "reapsurgery.surgery.apply" in mods["cli/apply.py"]


@pytest.mark.parametrize("module", ["reapsurgery.surgery", "reapsurgery.surgery.apply", "reapsurgery.surgery.verify",
                                    "reapsurgery.surgery.preview", "reapsurgery.common.checkpoint",
                                    "reapsurgery.plan", "reapsurgery.inspect", "reapsurgery.cli", "reapsurgery.common"])
def test_surgery_side_imports_without_torch(module):
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_import_cycles_inside_a_stage():
    """Modules of one stage import each other in one direction only (lazy imports included): a cycle
    means a module cannot be read, tested or reused without the one that imports it."""
    graph: dict[str, set[str]] = {}
    for package in ("surgery", "common", "calibration", "evaluation", "cli"):
        for path, mods in imported_modules(package).items():
            here = "reapsurgery." + path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            graph[here] = {m for m in mods if m != here}
    modules = set(graph)
    graph = {m: {d if d in modules else d.rsplit(".", 1)[0] for d in deps} & modules - {m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack + [m, d]
            if d not in state and (cycle := visit(d, stack + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle)
