"""Typed job configs (YAML + ``key=value`` overrides). One pydantic dataclass per job, in its own module."""

from adre_ray.config.base import (
    DATASETS,
    DEFAULT_GRID,
    LOSSES,
    TCERTIFY_MODES,
    JobConfig,
    check,
    check_choice,
    check_grid,
    check_int_at_least,
    check_nonnegative,
    check_open_unit,
    check_positive,
    config_dataclass,
    config_field,
    field_help,
    flatten,
    load_config,
    parse_overrides,
)

__all__ = [
    "DATASETS", "DEFAULT_GRID", "LOSSES", "TCERTIFY_MODES", "JobConfig", "check", "check_choice",
    "check_grid", "check_int_at_least", "check_nonnegative", "check_open_unit", "check_positive",
    "config_dataclass", "config_field", "field_help",
    "flatten", "load_config", "parse_overrides",
]
