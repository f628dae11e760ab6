"""The layers of ARCHITECTURE.md, checked on the code itself: the core (smoothing, training, models, data)
and the certification worker import no Ray, neither at import time nor inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adre_ray"
CORE = ("smoothing", "training", "models", "data")
RAY_FREE = [*(f"adre_ray.{name}" for name in CORE), "adre_ray.distributed.worker"]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside a function (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_core_and_worker_import_no_ray_in_a_fresh_interpreter():
    """One interpreter imports all of them: any one pulling in Ray, even through a third-party module,
    leaves ``ray`` in ``sys.modules``."""
    code = (f"import sys; import {', '.join(RAY_FREE)}; "
            "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
            "assert not leaked, leaked")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_no_core_module_imports_ray_even_lazily():
    files = [p for name in CORE for p in sorted((PACKAGE / name).rglob("*.py"))]
    files.append(PACKAGE / "distributed" / "worker.py")
    assert len(files) > 20
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p)
                                                     if m == "ray" or m.startswith("ray."))
                 for p in files}
    assert not {path: mods for path, mods in offenders.items() if mods}
