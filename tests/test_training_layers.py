"""The training package owns its rules (no import of adre_ray.config), and the training job's modules
import each other without a circle (before: train.py <-> faults.py <-> ingest.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import adre_ray

PACKAGE = Path(adre_ray.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every adre_ray module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adre_ray"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("adre_ray")}
    return found


def test_the_training_package_imports_no_config():
    offenders = {str(path.relative_to(PACKAGE)): sorted(module for module in _imports(path)
                                                        if module.startswith("adre_ray.config"))
                 for path in (PACKAGE / "training").rglob("*.py")}
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_training_jobs_modules_form_no_import_circle():
    names = ["train", "train_worker", "train_checkpoint", "train_report", "faults", "ingest", "tune",
             "tune_space", "tune_results"]
    graph = {f"adre_ray.distributed.{name}": _imports(PACKAGE / "distributed" / f"{name}.py")
             for name in names}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for module in graph.get(start, ()):
            if module == goal or (module not in seen and reaches(module, goal, seen | {module})):
                return True
        return False

    assert [module for module in graph if reaches(module, module, set())] == []
