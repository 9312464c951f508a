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
