"""A search space on a training config: the Tune domain of each distribution, the overrides of one trial,
the config every trial starts from, and the checks that every trial config the space can draw is valid."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adre_ray.config.train import TrainConfig
from adre_ray.config.tune import Distribution, TuneSpace
from adre_ray.distributed.train_report import EPOCH_METRICS
from adre_ray.training.certified_validation import metric_names


def tune_domain(dist: Distribution) -> Any:
    """The Ray Tune object of one distribution (grid_search, choice, uniform, loguniform, randint)."""
    from ray import tune

    if dist.kind == "grid":
        return tune.grid_search(list(dist.values))
    if dist.kind == "choice":
        return tune.choice(list(dist.values))
    lo, hi = dist.bounds
    if dist.kind == "uniform":
        return tune.uniform(float(lo), float(hi))
    if dist.kind == "loguniform":
        return tune.loguniform(float(lo), float(hi))
    return tune.randint(int(lo), int(hi))


def param_space(space: TuneSpace) -> dict[str, Any]:
    """``{dotted key: Tune domain}``: a trial's config holds the drawn value of every searched key."""
    return {dist.key: tune_domain(dist) for dist in space.distributions()}


def plain(value: Any) -> Any:
    """NumPy scalars (Tune samples them) as Python numbers, so configs validate and YAML stays plain."""
    return value.item() if hasattr(value, "item") and getattr(value, "shape", None) == () else value


def trial_overrides(sampled: Mapping[str, Any], dists: Sequence[Distribution], base: TrainConfig
                    ) -> dict[str, Any]:
    """The dotted overrides of one trial: drawn values, scaled by their ``scale_by`` key's trial value
    (searched, else the base config's)."""
    flat = base.flat_dict()
    values = {d.key: plain(sampled[d.key]) for d in dists}
    out: dict[str, Any] = {}
    for d in dists:
        value = values[d.key]
        if d.scale_by is not None:
            value = float(value) * float(values.get(d.scale_by, flat[d.scale_by]))
        out[d.key] = value
    return out


def check_space_against(space: TuneSpace, base: TrainConfig) -> None:
    """Validate every grid / choice value and range end of the space on ``base`` (ValueError naming
    ``search.<key>`` and the offending value), and the objective and ASHA settings."""
    dists = space.distributions()
    flat = base.flat_dict()
    for d in dists:
        scales = [1.0]
        if d.scale_by is not None:
            scaler = next((s for s in dists if s.key == d.scale_by), None)
            scales = [float(v) for v in (scaler.endpoints if scaler else (flat[d.scale_by],))]
        for value in d.endpoints:
            for scale in scales:
                effective = value if d.scale_by is None else float(value) * scale
                try:
                    base.replace(**{d.key: effective})
                except ValueError as err:
                    raise ValueError(f"search.{d.key}: value {effective!r} is invalid ({err})") from None
    known = set(EPOCH_METRICS) | set(metric_names(space.validation.radius))
    if space.metric not in known:
        raise ValueError(f"metric={space.metric!r}: not a reported metric (known with validation.radius="
                         f"{list(space.validation.radius)}: {', '.join(sorted(known))})")
    if space.scheduler.name == "asha" and space.scheduler.metric not in EPOCH_METRICS:
        raise ValueError(f"scheduler.metric={space.scheduler.metric!r}: ASHA needs a metric reported every "
                         f"epoch ({', '.join(EPOCH_METRICS)})")
    epochs = max_epochs(space, base)
    if space.scheduler.max_t is not None and space.scheduler.max_t < epochs:
        raise ValueError(f"scheduler.max_t={space.scheduler.max_t}: must be >= schedule.epochs={epochs}, "
                         f"else ASHA stops every trial before its final epoch and none reports "
                         f"{space.metric!r}")


def max_epochs(space: TuneSpace, base: TrainConfig) -> int:
    """The largest ``schedule.epochs`` any trial can have (searched or the base config's)."""
    for d in space.distributions():
        if d.key == "schedule.epochs":
            return int(max(d.endpoints))
    return base.schedule.epochs


def trial_base_config(train: TrainConfig, space: TuneSpace, cli_overrides: Mapping[str, Any] | None = None
                      ) -> TrainConfig:
    """The config every trial starts from: ``train`` + space ``overrides`` + ``resources`` + ``validation``
    (enabled as in the space) + command-line ``--set`` values (last, so they win). Local paths are made
    absolute (trials run in other working directories)."""
    cli = dict(cli_overrides or {})
    searched = [key for key in cli if key in space.search]
    if searched:
        raise ValueError(f"--set {searched[0]}={cli[searched[0]]!r}: this key is searched by the space")
    validation = {f"validation.{k}": v for k, v in dataclasses.asdict(space.validation).items()}
    # one replace, validated once: later sources win, checks see the combination
    cfg = train.replace(**{**space.overrides, **space.resources.overrides(), **validation, **cli})
    data_dir = Path(cfg.data.data_dir).expanduser()
    if data_dir.exists():
        cfg = cfg.replace(**{"data.data_dir": str(data_dir.resolve())})
    return cfg


__all__ = ["check_space_against", "max_epochs", "param_space", "plain", "trial_base_config",
           "trial_overrides", "tune_domain"]
