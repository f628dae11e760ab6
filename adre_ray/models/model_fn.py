"""Any model as a Python callable: ``"package.module:function"`` returning an ``nn.Module``.

The module must take a batch of inputs (N, *sample shape) in the data's space ([0, 1] images (N, C, H, W),
or any fixed-shape samples of an arrays dataset) and return logits (N, num_classes), e.g. a denoiser
followed by a pretrained classifier with its own normalization inside. The callable is called
with no arguments, once per process that needs the model (each certification actor), so it must be
importable there: an installed package, or a module in the Ray job's working directory / on PYTHONPATH.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence

from torch import nn

MODEL_FN_PREFIX = "model_fn:"
"""Prefix of a model_fn's identity in result rows and manifests (``model_fn:pkg.mod:build``)."""

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def check_model_fn_spec(spec: str) -> None:
    """``ValueError`` naming ``spec`` unless it reads ``module.path:function`` (dotted names only)."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ValueError(f"model_fn={spec!r}: expected 'package.module:function' (a callable returning an "
                         "nn.Module that takes [0, 1] images)")


def add_import_paths(paths: Sequence[str]) -> None:
    """Append the folders ``paths`` to ``sys.path`` (once each), after what is already there: the job's
    working directory on the driver and on every actor, as ``python -m`` and ``ray job submit`` do."""
    for path in paths:
        if path and path not in sys.path:
            sys.path.append(path)


def import_paths() -> list[str]:
    """The folders a model_fn spec is looked up in beyond ``sys.path``: the current working directory."""
    return [os.getcwd()]


def resolve_model_fn(spec: str, search_paths: Sequence[str] | None = None) -> Callable[[], nn.Module]:
    """The callable named by ``spec``; ``ValueError`` naming it when the module or attribute is missing.

    ``search_paths``: folders added to ``sys.path`` first (default: the current working directory)."""
    check_model_fn_spec(spec)
    add_import_paths(import_paths() if search_paths is None else search_paths)
    module_name, attr_path = spec.split(":", 1)
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model_fn={spec!r}: cannot import module {module_name!r} ({err}); it must be "
                         "installed, on PYTHONPATH, or in the job's working directory") from err
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model_fn={spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model_fn={spec!r}: {attr_path!r} is not callable")
    return target


def build_model_fn(spec: str, search_paths: Sequence[str] | None = None) -> nn.Module:
    """Call the ``spec`` callable and return its module in eval mode; ``ValueError`` if it is no module."""
    model = resolve_model_fn(spec, search_paths)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model_fn={spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def model_fn_identity(spec: str) -> str:
    """``model_fn:<spec>``: what result rows and manifests record as the model of a model_fn run."""
    return MODEL_FN_PREFIX + spec


__all__ = ["MODEL_FN_PREFIX", "add_import_paths", "build_model_fn", "check_model_fn_spec", "import_paths",
           "model_fn_identity", "resolve_model_fn"]
