"""Model checkpoints: one ``torch.save`` file holding only tensors and primitives.

Format ``adre-ray-model/2``::

    {"format": "adre-ray-model/2", "model_name": str, "num_classes": int, "dataset": str,
     "normalization": {"mean": [float, ...], "std": [float, ...]},
     "state_dict": {key: Tensor}, "extra": {str: primitive | list | dict | Tensor}}

The state dict is the bare ``NormalizedModel``'s (``"1.<net key>"``; the normalization buffers are not
in it), with DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes removed. ``normalization``
holds the per-channel statistics the model was trained with (an imported model keeps its own, e.g. the
randomized-smoothing code's CIFAR-10 std 0.2023, 0.1994, 0.2010). Format ``adre-ray-model/1`` files
(no ``normalization``) still load, with the dataset's statistics. Files are written atomically
(temporary file in the same directory, then ``os.replace``), so a reader never sees half a checkpoint.
Loading uses ``torch.load(weights_only=True)``: no code is run. A Ray Train checkpoint directory holding
``model.pt`` can be passed wherever a file can.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from adre_ray import storage
from adre_ray.data.info import dataset_info
from adre_ray.models.normalize import NormalizedModel, NormalizeLayer
from adre_ray.models.registry import build_model, check_model_name

FORMAT = "adre-ray-model/2"
"""The format written; ``READABLE_FORMATS`` are read."""
FORMAT_V1 = "adre-ray-model/1"
READABLE_FORMATS = (FORMAT_V1, FORMAT)
CHECKPOINT_FILENAME = "model.pt"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, any nesting."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without leading ``module.`` / ``_orig_mod.`` (repeatedly, any order)."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _primitive(value: Any, where: str) -> Any:
    """``value`` as weights-only-loadable data (numpy scalars -> Python, Path -> str, tuple kept)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, str | os.PathLike):
        return str(os.fspath(value))
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalar
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise ValueError(f"{where}: key {key!r} must be a str or int")
            key = str(key) if isinstance(key, str) else int(key)
            out[key] = _primitive(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        items = [_primitive(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise ValueError(f"{where}={value!r}: type {type(value).__name__} cannot be stored "
                     f"(allowed: None, bool, int, float, str, path, tensor, list, tuple, dict)")


def _fit_problems(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, Any]) -> list[str]:
    """Why ``state_dict`` does not load strictly into a model whose state dict is ``expected`` (or [])."""
    expected = {k: v for k, v in expected.items()  # lazy modules' unmaterialized weights have no shape
                if not isinstance(v, nn.parameter.UninitializedTensorMixin)}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: {tuple(getattr(state_dict[k], 'shape', ()))} vs {tuple(v.shape)}"
                  for k, v in expected.items()
                  if k in state_dict and (not isinstance(state_dict[k], torch.Tensor)
                                          or state_dict[k].shape != v.shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches (checkpoint vs model)", mismatched)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    return problems


def model_normalization(model: nn.Module, dataset: str) -> dict[str, list[float]]:
    """``{"mean": [...], "std": [...]}`` of ``model[0]`` if it is a ``NormalizeLayer``, else the dataset's."""
    first = model[0] if isinstance(model, nn.Sequential) and len(model) > 0 else None
    if isinstance(first, NormalizeLayer):
        return {"mean": [float(v) for v in first.mean.flatten().tolist()],
                "std": [float(v) for v in first.std.flatten().tolist()]}
    info = dataset_info(dataset)
    return {"mean": list(info.mean), "std": list(info.std)}


def _check_normalization(value: Any, name: str) -> tuple[list[float], list[float]]:
    """(mean, std) of a record's ``normalization`` field; ``ValueError`` naming the file if malformed."""
    ok = isinstance(value, dict) and all(
        isinstance(value.get(k), list | tuple) and len(value[k]) > 0
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value[k])
        for k in ("mean", "std"))
    if not ok or len(value["mean"]) != len(value["std"]) or not all(s > 0 for s in value["std"]):
        raise ValueError(f"checkpoint={name!r}: field 'normalization'={value!r} must be "
                         "{'mean': [...], 'std': [...]} with one value per channel, std > 0")
    return [float(v) for v in value["mean"]], [float(v) for v in value["std"]]


def save_model_checkpoint(path: str | Path, model: nn.Module, *, model_name: str, num_classes: int,
                          dataset: str, extra: dict | None = None) -> Path:
    """Write ``model``'s weights with its identity to ``path`` atomically; returns the file written.

    ``path`` may be an existing directory (a Ray Train checkpoint dir): the file is then
    ``path/model.pt``. ``extra`` holds primitives only (epoch, sigma, metrics, config dict, ...).
    The normalization stored is ``model[0]``'s mean / std (the model's own, whatever the dataset's are).
    The weights are checked against ``build_model(model_name, num_classes, dataset)`` (built on the
    meta device: no memory, no compute) so that a file which could not be loaded is never written.
    """
    check_model_name(model_name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 2")
    dataset_info(dataset)
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    state_dict = {key: tensor.detach().cpu()
                  for key, tensor in strip_wrapper_prefixes(unwrap_model(model).state_dict()).items()}
    with torch.device("meta"):
        reference = build_model(model_name, num_classes, dataset).state_dict()
    problems = _fit_problems(reference, state_dict)
    if problems:
        raise ValueError(f"model: weights do not fit model_name={model_name!r} with "
                         f"num_classes={num_classes}: {'; '.join(problems)}")
    record = {"format": FORMAT, "model_name": model_name, "num_classes": num_classes, "dataset": dataset,
              "normalization": model_normalization(unwrap_model(model), dataset),
              "state_dict": state_dict, "extra": _primitive(dict(extra or {}), "extra")}
    _write_atomically(path, record)
    return path


def _write_atomically(path: Path, record: dict[str, Any]) -> None:
    """``torch.save(record)`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_file(path: str | Path) -> Path:
    """The local checkpoint file for ``path`` (a file, or a directory holding ``model.pt``). ``path`` may
    be a URI pyarrow opens (``s3://``, ``gs://``, ``file://``; see ``adre_ray.storage``): the file is then
    downloaded to a local cache file first, and loaded from there as any other."""
    if storage.is_uri(path):
        return _remote_checkpoint_file(str(path))
    path = Path(path).expanduser()
    if path.is_dir():
        inner = path / CHECKPOINT_FILENAME
        if not inner.is_file():
            raise ValueError(f"checkpoint={str(path)!r}: directory has no {CHECKPOINT_FILENAME}")
        return inner
    if not path.is_file():
        raise ValueError(f"checkpoint={str(path)!r}: no such file or directory")
    return path


def _remote_checkpoint_file(uri: str) -> Path:
    try:
        kind = storage.file_type(uri)
        if kind == pafs.FileType.Directory:
            inner = storage.join(uri, CHECKPOINT_FILENAME)
            if storage.file_type(inner) != pafs.FileType.File:
                raise ValueError(f"checkpoint={uri!r}: directory has no {CHECKPOINT_FILENAME}")
            return storage.local_copy(inner)
        if kind != pafs.FileType.File:
            raise ValueError(f"checkpoint={uri!r}: no such file or directory")
        return storage.local_copy(uri)
    except OSError as err:
        raise ValueError(f"checkpoint={uri!r}: cannot be read ({err})") from err


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The validated checkpoint record (tensors on CPU), without building the model."""
    file = checkpoint_file(path)
    name = str(file)
    try:
        record = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip / torch errors of a foreign or corrupt file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint={name!r}: not a readable adre-ray model checkpoint "
                         f"(torch.load(weights_only=True) failed: {first_line})") from err
    if not isinstance(record, dict) or "format" not in record:
        raise ValueError(f"checkpoint={name!r}: not an adre-ray model checkpoint (no 'format' field)")
    if record["format"] not in READABLE_FORMATS:
        raise ValueError(f"checkpoint={name!r}: format={record['format']!r} is not supported "
                         f"(expected one of {', '.join(READABLE_FORMATS)})")
    if "model_fn" in record:
        return _check_model_fn_record(record, name)
    for key, kind in (("model_name", str), ("num_classes", int), ("dataset", str), ("state_dict", dict)):
        if not isinstance(record.get(key), kind):
            raise ValueError(f"checkpoint={name!r}: field {key!r}={record.get(key)!r} missing or not a "
                             f"{kind.__name__}")
    if not isinstance(record.get("extra", {}), dict):
        raise ValueError(f"checkpoint={name!r}: field 'extra' is not a dict")
    if record["format"] == FORMAT_V1:  # written before the format stored it: the dataset's statistics
        try:
            info = dataset_info(record["dataset"])
        except ValueError as err:
            raise ValueError(f"checkpoint={name!r}: {err}") from err
        record["normalization"] = {"mean": list(info.mean), "std": list(info.std)}
    mean, std = _check_normalization(record.get("normalization"), name)
    record["normalization"] = {"mean": mean, "std": std}
    return record


def _check_model_fn_record(record: dict[str, Any], name: str) -> dict[str, Any]:
    """A model_fn checkpoint record, checked (``num_classes`` may be None: read from the model's output)."""
    from adre_ray.models.model_fn import check_model_fn_spec, model_fn_identity

    try:
        check_model_fn_spec(record["model_fn"])
    except ValueError as err:
        raise ValueError(f"checkpoint={name!r}: {err}") from None
    num_classes = record.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f"checkpoint={name!r}: field 'num_classes'={num_classes!r} must be null or an "
                         "integer >= 2")
    if not isinstance(record.get("state_dict"), dict) or not isinstance(record.get("extra", {}), dict):
        raise ValueError(f"checkpoint={name!r}: fields 'state_dict' and 'extra' must be dicts")
    record["model_name"] = model_fn_identity(record["model_fn"])
    record.setdefault("dataset", "arrays")
    record["normalization"] = None  # the module normalizes inside, as its code says
    return record


def save_model_fn_checkpoint(path: str | Path, model: nn.Module, spec: str, *, num_classes: int | None,
                             dataset: str, extra: dict | None = None) -> Path:
    """Write the weights of ``model`` (built by the model_fn ``spec``) as an adre-ray checkpoint that
    ``load_model_checkpoint`` rebuilds by calling ``spec`` and loading the weights strictly."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    state_dict = {key: tensor.detach().cpu()
                  for key, tensor in strip_wrapper_prefixes(unwrap_model(model).state_dict()).items()}
    record = {"format": FORMAT, "model_fn": spec, "num_classes": num_classes, "dataset": dataset,
              "state_dict": state_dict, "extra": _primitive(dict(extra or {}), "extra")}
    _write_atomically(path, record)
    return path


def _fitting_state_dict(model: nn.Module, record: dict[str, Any], what: str) -> dict[str, Any]:
    """The record's state dict (wrapper prefixes removed); ``ValueError("<what>: <problems>")`` unless it
    loads strictly into ``model``."""
    state_dict = strip_wrapper_prefixes(record["state_dict"])
    problems = _fit_problems(model.state_dict(), state_dict)
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}")
    return state_dict


def _load_model_fn_checkpoint(record: dict[str, Any], name: str) -> nn.Module:
    """The module of a model_fn record: ``spec()`` with the file's weights loaded strictly."""
    from adre_ray.models.model_fn import build_model_fn

    try:
        model = build_model_fn(record["model_fn"])
    except ValueError as err:
        raise ValueError(f"checkpoint={name!r}: {err}") from None
    state_dict = _fitting_state_dict(model, record, f"checkpoint={name!r}: weights do not fit "
                                                    f"model_fn={record['model_fn']!r}")
    model.load_state_dict(state_dict, strict=True)
    return model


def load_model_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu",
                          expected_model: str | None = None,
                          expected_num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the registry and load the weights strictly; the model is in eval mode.

    Returns ``(model, meta)`` with ``meta = {"format", "model_name", "num_classes", "dataset",
    "normalization", "extra", "path"}``; the model normalizes with the file's statistics. ``ValueError``
    naming the value for a missing or foreign file, an architecture or class
    count other than ``expected_*``, or weights that do not fit the architecture.
    """
    record = read_checkpoint(path)
    name = str(checkpoint_file(path))
    model_name, num_classes = record["model_name"], record["num_classes"]
    if expected_model is not None and model_name != expected_model:
        raise ValueError(f"checkpoint={name!r}: model_name={model_name!r}, expected_model={expected_model!r}")
    if expected_num_classes is not None and num_classes is not None and num_classes != expected_num_classes:
        raise ValueError(f"checkpoint={name!r}: num_classes={num_classes!r}, "
                         f"expected_num_classes={expected_num_classes!r}")
    if "model_fn" in record:
        model = _load_model_fn_checkpoint(record, name)
        meta = {key: record[key] for key in ("format", "model_name", "num_classes", "dataset",
                                             "normalization", "model_fn")}
        meta.update(extra=record.get("extra", {}), path=name)
        return model.to(map_location).eval(), meta
    try:
        with torch.device("meta"):  # skip random initialization: the weights are replaced anyway
            model = build_model(model_name, num_classes, record["dataset"])
    except ValueError as err:
        raise ValueError(f"checkpoint={name!r}: {err}") from err
    state_dict = _fitting_state_dict(model, record, f"checkpoint={name!r}: weights do not fit model_name="
                                                    f"{model_name!r} with num_classes={num_classes}")
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
        if isinstance(model, NormalizedModel):  # non-persistent statistics: the file's, on the CPU
            norm = record["normalization"]
            model[0] = NormalizeLayer(norm["mean"], norm["std"])
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            # a registered model with other non-persistent state: build it for real and copy into it
            model = build_model(model_name, num_classes, record["dataset"])
            model.load_state_dict(state_dict, strict=True)
            if isinstance(model, NormalizedModel):
                model[0] = NormalizeLayer(record["normalization"]["mean"], record["normalization"]["std"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint={name!r}: weights do not load into {model_name!r} ({err})") from err
    model.to(map_location).eval()
    meta = {key: record[key] for key in ("format", "model_name", "num_classes", "dataset", "normalization")}
    meta["extra"] = record.get("extra", {})
    meta["path"] = name
    return model, meta
