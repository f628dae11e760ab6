"""The layers of ARCHITECTURE.md, checked on the code itself (docs/design.md): the core (smoothing,
training, models, data) imports no Ray and nothing above it (config, distributed, jobs, analysis,
tracking), neither at import time nor inside a function, and no module of the package takes part in an
import circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adre_ray"
CORE = ("smoothing", "training", "models", "data")
CORE_MAY_USE = ("adre_ray.lazy", "adre_ray.checks", "adre_ray.storage", "adre_ray.precision",
                "adre_ray.device")
"""Plain helpers below the core: lazy package exports, the field=value checks, paths and URIs, precision,
the device's facts."""
RAY_FREE = [*(f"adre_ray.{name}" for name in CORE), "adre_ray.distributed.worker"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside a function (absolute names; ``from package
    import submodule`` counts as the submodule too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
    return found


def _is_core(module: str) -> bool:
    return any(module == f"adre_ray.{name}" or module.startswith(f"adre_ray.{name}.") for name in CORE)


def test_core_and_worker_import_no_ray_in_a_fresh_interpreter():
    """One interpreter imports all of them and touches a lazily exported name of each: any one pulling in
    Ray, even through a third-party module, leaves ``ray`` in ``sys.modules``."""
    touch = ("adre_ray.smoothing.sample_counts", "adre_ray.training.build_loss",
             "adre_ray.models.build_model", "adre_ray.data.build_dataset")
    code = (f"import sys; import {', '.join(RAY_FREE)}; {'; '.join(touch)}; "
            "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
            "assert not leaked, leaked")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_no_core_module_imports_ray_or_a_layer_above_even_lazily():
    files = {module: path for module, path in MODULES.items() if _is_core(module)}
    files["adre_ray.distributed.worker"] = PACKAGE / "distributed" / "worker.py"
    assert len(files) > 20
    offenders = {}
    for module, path in files.items():
        bad = sorted(name for name in _imports(path) if name == "ray" or name.startswith("ray.")
                     or (name.startswith("adre_ray.") and not _is_core(name) and name not in CORE_MAY_USE))
        if bad:
            offenders[module] = bad
    assert offenders == {}


def test_no_import_circle_in_the_package():
    """Strongly connected components of the import graph (every import, top level or in a function)."""
    graph = {module: {name for name in _imports(path) if name in MODULES and name != module}
             for module, path in MODULES.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan
        order[module] = low[module] = len(order)
        stack.append(module)
        for used in graph[module]:
            if used not in order:
                visit(used)
                low[module] = min(low[module], low[used])
            elif used in stack:
                low[module] = min(low[module], order[used])
        if low[module] == order[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in order:
            visit(module)
    assert circles == []
