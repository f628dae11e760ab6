"""Numeric precision of the base classifier, one setting for both jobs: ``auto | fp32 | bf16``.

``auto`` = bf16 autocast on a GPU, fp32 on a CPU. ``bf16`` also on a CPU: fast where the CPU has
AVX512-BF16 or AMX (``fast_bf16_available``), emulated (and usually slower than fp32) elsewhere. A bf16
classifier is a different, deterministic base classifier: its certificates hold for it, so results record
the RESOLVED precision (``fp32`` or ``bf16``, never ``auto``) and never mix the two. Losses, the ADRE terms
and the bounds are always computed in fp32 (adre_ray.training.losses cast the logits).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adre_ray.checks import check, check_choice

if TYPE_CHECKING:  # torch is imported where a dtype is needed: the Ray driver resolves without it
    import torch

PRECISIONS = ("auto", "fp32", "bf16")
"""auto = bf16 autocast on GPU, fp32 on CPU."""
RESOLVED = ("fp32", "bf16")


def effective_precision(precision: str, amp: bool | None) -> str:
    """``precision``, or what the deprecated ``amp`` meant: true = auto, false = fp32."""
    return precision if amp is None else ("auto" if amp else "fp32")


def check_precision(prefix: str, precision: str, amp: bool | None) -> str:
    """The precision setting of a job, after checking it with the deprecated ``amp`` (None = not given).

    ``amp`` (before ``precision`` existed: bf16 autocast on GPU, CPU always fp32) maps to ``auto`` (true)
    or ``fp32`` (false), with a ``FutureWarning``; ``amp`` and a non-auto ``precision`` together are
    refused, naming both.
    """
    check_choice(f"{prefix}precision", precision, PRECISIONS)
    if amp is None:
        return precision
    check(isinstance(amp, bool), f"{prefix}amp", amp, "must be true or false (deprecated: use precision)")
    if precision != "auto":
        raise ValueError(f"{prefix}amp={amp!r} and {prefix}precision={precision!r}: both given; {prefix}amp "
                         f"is deprecated, set only {prefix}precision (auto | fp32 | bf16)")
    warnings.warn(f"{prefix}amp={amp!r} is deprecated: read as {prefix}precision="
                  f"{effective_precision(precision, amp)!r}; set {prefix}precision (auto | fp32 | bf16) "
                  "instead", FutureWarning, stacklevel=3)
    return effective_precision(precision, amp)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16``: ``auto`` -> bf16 on CUDA, fp32 elsewhere; the others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device_type = getattr(device, "type", str(device).split(":")[0])
    return "bf16" if device_type == "cuda" else "fp32"


def autocast_dtype(resolved: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None = plain fp32)."""
    import torch

    if resolved not in RESOLVED:
        raise ValueError(f"precision={resolved!r}: a resolved precision is one of {', '.join(RESOLVED)}")
    return torch.bfloat16 if resolved == "bf16" else None


def precision_params(flat: Mapping[str, Any], resolved: str, prefix: str = "") -> dict[str, Any]:
    """Flat config params as MLflow records them: ``<prefix>precision`` = the resolved precision (never
    auto), the deprecated ``<prefix>amp`` left out."""
    params = {key: value for key, value in flat.items() if key != f"{prefix}amp"}
    params[f"{prefix}precision"] = resolved
    return params


def bf16_capability(device: torch.device | str = "cpu") -> dict[str, object]:
    """What a run reports about the device's bf16: native or emulated, and (CPU) the vector ISA in use."""
    import torch

    from adre_ray.smoothing.sampler import fast_bf16_available

    device = torch.device(device)
    facts: dict[str, object] = {"native_bf16": fast_bf16_available(device)}
    if device.type == "cpu":
        facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return facts


def warn_if_emulated(resolved: str, device: torch.device | str, where: str) -> None:
    """``UserWarning`` when ``resolved`` is bf16 on a CPU without native bf16 (emulated: usually slower than
    fp32, ~10x for a CIFAR ResNet on an AVX2 CPU)."""
    if resolved == "bf16" and getattr(device, "type", str(device)) == "cpu" and \
            not bf16_capability("cpu")["native_bf16"]:
        import warnings

        warnings.warn(f"precision='bf16' on {where}: this CPU has no native bf16 (AVX512-BF16 / AMX), so "
                      "bf16 is emulated and usually slower than fp32 here", UserWarning, stacklevel=3)


def refuse_mixed_precision(stored: str | None, resolved: str, where: str) -> None:
    """``ValueError`` when resuming ``where`` (made in ``stored``) in another precision."""
    if stored is not None and stored != resolved:
        raise ValueError(f"precision={resolved!r} differs from the run being resumed ({where} was made in "
                         f"precision={stored!r}); a bf16 and an fp32 classifier are different classifiers "
                         "and never mix: resume with the same precision or start a new run")
