"""Import checkpoints written by other code into the adre-ray format (pure PyTorch, no Ray).

``smoothing``: the original randomized-smoothing code (Cohen et al. 2019) and the codes built on it
(SmoothAdv, Consistency, MACER, SmoothMix) save ``{"arch", "state_dict", "epoch", "optimizer"}`` where
``state_dict`` is that of ``Sequential(NormalizeLayer, net)``: network keys are ``1.<key>``, or
``1.module.<key>`` for the ImageNet ResNet-50 inside ``DataParallel``. Their ``NormalizeLayer`` keeps
its statistics as plain attributes (not in the state dict) in the original code and as ``means`` /
``sds`` buffers (keys ``0.means``, ``0.sds``) in some derived codes; both are read. Their statistics
differ from adre-ray's (``SMOOTHING_NORMALIZATION``), so the imported checkpoint stores them: the model
computes exactly f(x) = net((x - mean) / std) as theirs did.

``torchvision``: a plain ``state_dict`` of a torchvision ResNet-50 (the published ImageNet models), with
torchvision's ImageNet statistics.

Files are read with ``torch.load(weights_only=True)`` (old and zip file formats): a file that would
run code when unpickled is refused. Keys or shapes that do not fit the architecture are refused with a
``ValueError`` naming the first bad key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adre_ray.data.info import dataset_info
from adre_ray.models.checkpoint import save_model_checkpoint, save_model_fn_checkpoint, strip_wrapper_prefixes
from adre_ray.models.formats import IMPORT_FORMATS
from adre_ray.models.model_fn import build_model_fn, check_model_fn_spec
from adre_ray.models.normalize import NormalizedModel, NormalizeLayer
from adre_ray.models.registry import build_model
from adre_ray.smoothing.params import check_sigma

SMOOTHING_ARCHS = ("cifar_resnet20", "cifar_resnet110", "resnet50")
"""``arch`` values of the randomized-smoothing code; each is the adre-ray model of the same name."""

SMOOTHING_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""(mean, std) of the randomized-smoothing code's ``datasets.py`` per dataset."""

TORCHVISION_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""(mean, std) that torchvision's ImageNet models were trained with."""

_NORMALIZE_BUFFERS = (("0.means", "0.sds"), ("0.mu", "0.sigma"))
"""(mean key, std key) of the NormalizeLayer buffers found in derived codes' state dicts."""


def load_weights_only(path: str | Path, what: str = "source") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``ValueError`` naming ``path`` when the file is
    missing, corrupt, or holds anything but tensors and primitives (pickled code is never run)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}={str(path)!r}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code, RuntimeError / EOFError for corrupt files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what}={str(path)!r}: not loadable with torch.load(weights_only=True) (a file "
                         f"holding code or foreign objects is refused; {first})") from err


def fit_state_dict(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """``state_dict`` checked key by key against ``model.state_dict()``; ``ValueError`` naming the first
    unexpected key, shape mismatch (in the file's key order) or missing key (in the model's order).
    BatchNorm's ``num_batches_tracked`` counters (not used in eval mode) may be missing: they are zeroed."""
    expected = model.state_dict()
    for key, value in state_dict.items():
        if key not in expected:
            raise ValueError(f"{source}: key {key!r} does not exist in the model (first unexpected key; "
                             f"model keys look like {next(iter(expected))!r})")
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{source}: key {key!r} has shape {shape}, the model expects "
                             f"{tuple(expected[key].shape)}")
    fitted = dict(state_dict)
    for key, value in expected.items():
        if key not in state_dict:
            if key.endswith("num_batches_tracked"):  # absent in files of PyTorch < 0.4.1; unused in eval
                fitted[key] = torch.zeros_like(value)
                continue
            raise ValueError(f"{source}: key {key!r} of the model is missing from the file "
                             "(first missing key)")
    return fitted


def _normalization_from_buffers(state_dict: dict[str, Any], source: str,
                                default: tuple[tuple[float, ...], tuple[float, ...]]
                                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The NormalizeLayer statistics stored in ``state_dict`` (removing those keys), else ``default``."""
    for mean_key, std_key in _NORMALIZE_BUFFERS:
        if mean_key in state_dict or std_key in state_dict:
            if mean_key not in state_dict or std_key not in state_dict:
                raise ValueError(f"{source}: has {mean_key if mean_key in state_dict else std_key!r} "
                                 f"but not its partner ({mean_key!r} and {std_key!r} go together)")
            mean = state_dict.pop(mean_key).flatten().tolist()
            std = state_dict.pop(std_key).flatten().tolist()
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return default


def _check_dataset(dataset: str) -> int:
    return dataset_info(dataset).num_classes


def import_smoothing(record: Any, dataset: str, source: str = "source") -> tuple[NormalizedModel, dict]:
    """The model of a randomized-smoothing checkpoint ``record`` (already loaded), and facts about it.

    Returns ``(model, info)``: ``model = NormalizedModel(NormalizeLayer(their mean, std), net)`` in eval
    mode, ``info = {"model_name", "num_classes", "epoch", "normalization"}``.
    """
    num_classes = _check_dataset(dataset)
    if not isinstance(record, dict) or "state_dict" not in record or "arch" not in record:
        keys = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{source}: not a randomized-smoothing checkpoint (expected a dict with 'arch' "
                         f"and 'state_dict', found {keys})")
    arch = record["arch"]
    if arch not in SMOOTHING_ARCHS:
        raise ValueError(f"{source}: arch={arch!r} is not one of {', '.join(SMOOTHING_ARCHS)}")
    state_dict = record["state_dict"]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{source}: 'state_dict' is empty or not a dict")
    state_dict = dict(state_dict)
    mean, std = _normalization_from_buffers(state_dict, source, SMOOTHING_NORMALIZATION[dataset])
    net_state: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not key.startswith("1."):
            raise ValueError(f"{source}: key {key!r} is not a network key of Sequential(NormalizeLayer, "
                             "net) (expected '1.<key>' or '1.module.<key>')")
        net_state[key[2:]] = value
    net_state = strip_wrapper_prefixes(net_state)  # DataParallel's "module."
    model = build_model(arch, num_classes, dataset)
    model[0] = NormalizeLayer(mean, std)
    fitted = fit_state_dict(model.net, net_state, source)
    model.net.load_state_dict(fitted, strict=True)
    epoch = record.get("epoch")
    info = {"model_name": arch, "num_classes": num_classes,
            "epoch": int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
            "normalization": {"mean": list(mean), "std": list(std)}}
    return model.eval(), info


def import_torchvision(record: Any, dataset: str, arch: str = "resnet50",
                       source: str = "source") -> tuple[NormalizedModel, dict]:
    """The model of a plain torchvision state dict (``{"state_dict": ...}`` / ``{"model": ...}`` wrappers
    and DataParallel's ``module.`` accepted), normalizing with torchvision's ImageNet statistics."""
    num_classes = _check_dataset(dataset)
    if isinstance(record, dict) and not any(isinstance(v, torch.Tensor) for v in record.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(record.get(wrapper), dict):
                record = record[wrapper]
                break
    if not isinstance(record, dict) or not record:
        raise ValueError(f"{source}: not a state dict (expected a dict of tensors)")
    mean, std = TORCHVISION_NORMALIZATION
    model = build_model(arch, num_classes, dataset)
    model[0] = NormalizeLayer(mean, std)
    fitted = fit_state_dict(model.net, strip_wrapper_prefixes(record), source)
    model.net.load_state_dict(fitted, strict=True)
    info = {"model_name": arch, "num_classes": num_classes, "epoch": None,
            "normalization": {"mean": list(mean), "std": list(std)}}
    return model.eval(), info


def import_smoothing_model_fn(record: Any, spec: str, source: str = "source") -> tuple[nn.Module, dict]:
    """The module ``spec`` builds (the user's whole ``Sequential(normalize, net)``, on inputs in the data's
    space) with the randomized-smoothing checkpoint ``record``'s state dict loaded strictly: every key
    of the file must exist in the module with the same shape, and every key of the module in the file
    (``ValueError`` naming the first that does not)."""
    state_dict = record.get("state_dict") if isinstance(record, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        keys = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{source}: not a randomized-smoothing checkpoint (expected a dict with a non-empty "
                         f"'state_dict', found {keys})")
    model = build_model_fn(spec)
    fitted = fit_state_dict(model, strip_wrapper_prefixes(state_dict), source)
    model.load_state_dict(fitted, strict=True)
    epoch = record.get("epoch")
    info = {"arch": record.get("arch") if isinstance(record.get("arch"), str) else None,
            "epoch": int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None}
    return model.eval(), info


def import_checkpoint(src: str | Path, output: str | Path, *, source_format: str, dataset: str | None,
                      arch: str = "resnet50", sigma: float | None = None, model_fn: str | None = None,
                      num_classes: int | None = None) -> Path:
    """Convert ``src`` (``source_format`` in ``IMPORT_FORMATS``) into an adre-ray checkpoint at ``output``.

    ``sigma``: the noise level the model was trained with, if known (the original files do not record
    it); stored as ``extra["sigma"]`` so that certification defaults to it and warns on a different one.
    ``model_fn`` (``--format smoothing`` only): the ``module:function`` building the whole module; the
    checkpoint then records the spec (``certify --checkpoint`` rebuilds it on every actor), ``dataset``
    is optional (default "arrays") and ``num_classes`` too (else read from the model's output at certify
    time). Returns the file written. Nothing is written when the source is refused.
    """
    if source_format not in IMPORT_FORMATS:
        raise ValueError(f"format={source_format!r}: must be one of {', '.join(IMPORT_FORMATS)}")
    if sigma is not None:
        check_sigma(sigma)
    if model_fn is not None:
        check_model_fn_spec(model_fn)
        if source_format != "smoothing":
            raise ValueError(f"model_fn={model_fn!r}: only with format='smoothing'")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 2")
    else:
        if dataset is None:
            raise ValueError("dataset=None: give --dataset (or --model-fn for an architecture of your own)")
        _check_dataset(dataset)
    out = Path(output).expanduser()
    if out.is_file() or (out.is_dir() and (out / "model.pt").exists()):
        raise ValueError(f"output={str(output)!r}: already exists (nothing is overwritten; remove it first)")
    name = f"source={str(src)!r}"
    record = load_weights_only(src)
    if model_fn is not None:
        model, facts = import_smoothing_model_fn(record, model_fn, name)
        extra = {"imported_from": str(Path(src).expanduser().resolve()), "source_format": source_format,
                 **{key: value for key, value in facts.items() if value is not None}}
        if sigma is not None:
            extra["sigma"] = float(sigma)
        return save_model_fn_checkpoint(output, model, model_fn, num_classes=num_classes,
                                        dataset=dataset or "arrays", extra=extra)
    if source_format == "smoothing":
        model, info = import_smoothing(record, dataset, name)
    else:
        model, info = import_torchvision(record, dataset, arch, name)
    extra: dict[str, Any] = {"imported_from": str(Path(src).expanduser().resolve()),
                             "source_format": source_format}
    if info["epoch"] is not None:
        extra["epoch"] = info["epoch"]
    if sigma is not None:
        extra["sigma"] = float(sigma)
    return save_model_checkpoint(output, model, model_name=info["model_name"],
                                 num_classes=info["num_classes"], dataset=dataset, extra=extra)


__all__ = ["IMPORT_FORMATS", "SMOOTHING_ARCHS", "SMOOTHING_NORMALIZATION", "TORCHVISION_NORMALIZATION",
           "fit_state_dict", "import_checkpoint", "import_smoothing", "import_smoothing_model_fn",
           "import_torchvision", "load_weights_only"]
