"""Config of the hyper-parameter search (``adre-ray tune --space FILE --config FILE``), read from a YAML
"space file" (format in docs/tune.md; examples in tune_spaces/).

The space file holds WHAT to search (``search``: dotted ``TrainConfig`` keys -> a distribution) and HOW
(trials, scheduler, resources per trial, the certified-validation objective); the ``--config`` train
config holds everything that stays fixed. Distributions, one key per entry::

    {grid: [v1, v2, ...]}     every value, crossed with the other grids (Tune grid_search)
    {choice: [v1, v2, ...]}   one value drawn uniformly per sample
    {uniform: [lo, hi]}       float drawn uniformly from [lo, hi]
    {loguniform: [lo, hi]}    float whose log is uniform on [log lo, log hi] (0 < lo < hi)
    {randint: [lo, hi]}       integer drawn uniformly from lo, ..., hi - 1 (Ray's convention: hi excluded)

optionally with ``scale_by: other.key``: the trial's value is the drawn value times the trial's value of
``other.key`` (e.g. SmoothAdv-style epsilon = factor * sigma). Unknown keys, malformed distributions and
keys that are not ``TrainConfig`` fields raise ``ValueError`` naming them.

Pure Python (``TrainConfig`` asks the model registry only when it validates).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from adre_ray.checks import check, is_number
from adre_ray.config.base import (
    JobConfig,
    _field_paths,
    config_dataclass,
    config_field,
    parse_number,
    read_yaml_mapping,
)
from adre_ray.config.fields import Count, PositiveNumber, Rule, Seed, named, non_empty
from adre_ray.config.train import TrainConfig
from adre_ray.config.validation import ValidationSection

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
MODES = ("min", "max")
SCALE_BY = "scale_by"

SearchName = Annotated[str, Field(pattern=r"^[^/]*\S[^/]*$"),
                      Rule("must be a non-empty name without a slash")]
RankMetric = named("must name the reported metric to rank trials by")
EpochMetric = named("must name a metric reported every epoch (e.g. test_acc_noise)")
ReductionFactor = Annotated[float, Field(gt=1, allow_inf_nan=False), Rule("must be a number > 1")]
NonEmptyText = non_empty("string")
MlflowUri = named("must be an MLflow URI or 'none'")


@config_dataclass
class SearchValidationSection(ValidationSection):
    """The space file's ``validation`` section: as ``ValidationSection`` but enabled unless it says not."""

    enabled: bool = config_field(True, "run it after each trial's final epoch (the search ranks by it)")


@config_dataclass
class SchedulerSection:
    """name             asha (AsyncHyperBand: stop the worse trials at rungs) | fifo (every trial to the end)
    metric, mode     per-epoch metric ASHA compares at each rung (reported by every epoch), min | max
    max_t            last rung, in epochs (ASHA's clock is training_iteration = epochs reported so far);
                     null = the trials' schedule.epochs (every trial that survives finishes)
    grace_period     epochs every trial runs before it can be stopped
    reduction_factor keep the best 1 / reduction_factor at each rung
    brackets         ASHA brackets
    """

    name: Literal[SCHEDULERS] = config_field(
        "asha", "asha (stop the worse trials at rungs) | fifo (every trial to the end)")
    metric: EpochMetric = config_field("test_acc_noise", "per-epoch metric ASHA compares at each rung")
    mode: Literal[MODES] = config_field("max", "min | max")
    max_t: Count | None = config_field(None, "last rung in epochs; null = the trials' schedule.epochs")
    grace_period: Count = config_field(1, "epochs every trial runs before it can be stopped")
    reduction_factor: ReductionFactor = config_field(3.0, "keep the best 1 / reduction_factor at each rung")
    brackets: Count = config_field(1, "ASHA brackets")


@config_dataclass
class ResourcesSection:
    """Resources of ONE trial (its Ray Train workers); null keeps the train config's ``scaling.*`` value.
    Trials run concurrently as far as the cluster holds them (or ``max_concurrent``)."""

    num_workers: Count | None = config_field(None, "Ray Train workers per trial (null = scaling.num_workers)")
    use_gpu: bool | None = config_field(None, "GPUs for the trial's workers (null = scaling.use_gpu)")
    cpus_per_worker: Count | None = config_field(None, "CPUs per worker (null = scaling.cpus_per_worker)")
    gpus_per_worker: PositiveNumber | None = config_field(
        None, "GPUs per worker (null = scaling.gpus_per_worker)")

    def overrides(self) -> dict[str, Any]:
        """The non-null fields as dotted ``scaling.*`` overrides of the train config."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {f"scaling.{name}": value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class Distribution:
    """One parsed search entry: ``kind`` in DISTRIBUTIONS, its ``values`` (grid / choice) or ``bounds``
    (lo, hi), and the optional ``scale_by`` key whose trial value multiplies the drawn value."""

    key: str
    kind: str
    values: tuple[Any, ...] = ()
    bounds: tuple[float, float] = (math.nan, math.nan)
    scale_by: str | None = None

    @property
    def endpoints(self) -> tuple[Any, ...]:
        """Values to validate against the train config: every grid / choice value, or the two bounds
        (randint: lo and hi - 1, the largest value it draws)."""
        if self.kind in ("grid", "choice"):
            return self.values
        lo, hi = self.bounds
        return (int(lo), int(hi) - 1) if self.kind == "randint" else (lo, hi)


def _is_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def parse_distribution(key: str, spec: Any) -> Distribution:
    """``search.<key>`` -> :class:`Distribution`; ValueError naming ``search.<key>`` if malformed."""
    name = f"search.{key}"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{name}={spec!r}: must be a mapping with one of {', '.join(DISTRIBUTIONS)} "
                         f"(e.g. {{grid: [0.1, 0.2]}})")
    unknown = sorted(set(spec) - set(DISTRIBUTIONS) - {SCALE_BY})
    if unknown:
        raise ValueError(f"{name}.{unknown[0]}={spec[unknown[0]]!r}: unknown distribution "
                         f"(known: {', '.join(DISTRIBUTIONS)}; optional {SCALE_BY})")
    kinds = [k for k in DISTRIBUTIONS if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"{name}={dict(spec)!r}: needs exactly one of {', '.join(DISTRIBUTIONS)}, "
                         f"got {len(kinds)}")
    kind, args = kinds[0], spec[kinds[0]]
    if isinstance(args, (list, tuple)) and (kind not in ("grid", "choice") or spec.get(SCALE_BY)):
        # numbers as typed: YAML 1.1 reads 1e-5 as text; randint needs integers, the rest any number
        args = [parse_number(str(v), int) if kind == "randint" and isinstance(v, (str, float))
                else parse_number(v, float) if isinstance(v, str) else v for v in args]
    scale_by = spec.get(SCALE_BY)
    if scale_by is not None:
        check(isinstance(scale_by, str) and scale_by != "" and scale_by != key, f"{name}.{SCALE_BY}",
              scale_by, "must name another config key (e.g. loss.sigma)")
    if kind in ("grid", "choice"):
        check(isinstance(args, (list, tuple)) and len(args) > 0, f"{name}.{kind}", args,
              "must be a non-empty list of values")
        if scale_by is not None:
            for v in args:
                check(_is_number(v), f"{name}.{kind}", args, f"value {v!r}: {SCALE_BY} needs numbers")
        return Distribution(key, kind, values=tuple(args), scale_by=scale_by)
    check(isinstance(args, (list, tuple)) and len(args) == 2 and all(_is_number(v) for v in args),
          f"{name}.{kind}", args, "must be [lo, hi], two finite numbers")
    lo, hi = args
    check(lo < hi, f"{name}.{kind}", args, "needs lo < hi")
    if kind == "loguniform":
        check(lo > 0, f"{name}.{kind}", args, "needs 0 < lo < hi")
    if kind == "randint":
        check(all(isinstance(v, numbers.Integral) for v in args), f"{name}.{kind}", args,
              "must be [lo, hi], two integers (hi excluded)")
    return Distribution(key, kind, bounds=(lo, hi), scale_by=scale_by)


def train_config_keys() -> list[str]:
    """Every dotted ``TrainConfig`` field (the keys a search may vary)."""
    return _field_paths(TrainConfig)


@config_dataclass
class TuneSpace(JobConfig):
    """A search space file (see the module docstring and docs/tune.md).

    name            search name (MLflow parent run, Tune experiment folder); null = tune_<timestamp>
    search          dotted TrainConfig key -> distribution
    num_samples     samples drawn from the space (grids are crossed, then repeated num_samples times)
    metric, mode    the objective each finished trial is ranked by (reported with its final epoch):
                    an approx_* certified-validation metric (e.g. approx_acr, approx_cert_acc_at_0.50)
                    or a per-epoch metric such as test_acc_noise
    max_concurrent  trials at once; null = as many as the cluster's CPUs / GPUs hold
    seed            seed of Tune's random sampler (null = unseeded)
    overrides       dotted TrainConfig keys applied to every trial (after --config, before --set)
    scheduler, resources, validation   sections (see their classes)
    output_dir      outputs go to <output_dir>/<name>/: best_config.yaml, trials.csv, Tune state, Train runs
    experiment      MLflow experiment of the parent run and its trial (child) runs
    tracking_uri    MLflow store; null = the train config's run.tracking_uri / $MLFLOW_TRACKING_URI
    """

    name: SearchName | None = config_field(None, "search name (MLflow parent run, output subfolder); null = "
                                                 "tune_<timestamp>")
    search: dict[str, Any] = config_field({}, "dotted TrainConfig key -> distribution")
    num_samples: Count = config_field(1, "samples drawn from the space (grids crossed, then repeated)")
    metric: RankMetric = config_field("approx_acr", "objective each finished trial is ranked by")
    mode: Literal[MODES] = config_field("max", "min | max")
    max_concurrent: Count | None = config_field(None, "trials at once; null = as many as the cluster holds")
    seed: Seed | None = config_field(0, "seed of Tune's sampler (null = unseeded)")
    overrides: dict[str, Any] = config_field({}, "dotted TrainConfig keys applied to every trial")
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    validation: SearchValidationSection = field(default_factory=SearchValidationSection)
    output_dir: NonEmptyText = config_field("results/tune", "outputs go to <output_dir>/<name>/")
    experiment: NonEmptyText = config_field(
        "adre-tune", "MLflow experiment of the parent run and its trial runs")
    tracking_uri: MlflowUri | None = config_field(
        None, "MLflow store; null = the train config's run.tracking_uri")

    def distributions(self) -> list[Distribution]:
        return [parse_distribution(str(key), spec) for key, spec in self.search.items()]

    def check_together(self) -> None:
        """The search keys and the rules between fields (each field's own constraint is declared on it)."""
        check(isinstance(self.search, Mapping) and len(self.search) > 0, "search", self.search,
              "must map at least one dotted config key to a distribution")
        known = set(train_config_keys())
        dists = self.distributions()
        for dist in dists:
            check(dist.key in known, f"search.{dist.key}", self.search[dist.key],
                  "not a TrainConfig field (e.g. loss.lam, loss.sigma, loss.k, loss.epsilon, optim.lr)")
            if dist.scale_by is not None:
                check(dist.scale_by in known, f"search.{dist.key}.{SCALE_BY}", dist.scale_by,
                      "not a TrainConfig field")
                scaler = next((d for d in dists if d.key == dist.scale_by), None)
                check(scaler is None or scaler.scale_by is None, f"search.{dist.key}.{SCALE_BY}",
                      dist.scale_by, "must not itself be scaled (no chains)")
        check(isinstance(self.overrides, Mapping), "overrides", self.overrides, "must be a mapping")
        for key in self.overrides:
            check(key in known, f"overrides.{key}", self.overrides[key], "not a TrainConfig field")
            check(key not in self.search, f"overrides.{key}", self.overrides[key], "is also searched")
        s = self.scheduler
        if s.max_t is not None:
            check(s.grace_period <= s.max_t, "scheduler.grace_period", s.grace_period,
                  f"must be <= scheduler.max_t={s.max_t}")
        self.validation.validate()
        check(not self.metric.startswith("approx_") or self.validation.enabled, "metric", self.metric,
              "is a certified-validation metric: needs validation.enabled=true")

def load_space(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TuneSpace:
    """Read and validate a space file; ``overrides`` replace top-level fields (e.g. ``num_samples``)."""
    data = read_yaml_mapping(path, "space", empty_ok=False)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TuneSpace.from_dict(data)
