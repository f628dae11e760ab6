"""Issue 26: one rule per quantity (config and library alike), constraints declared on the fields,
the core importable without the configs, MODEL_NAMES asked of the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adre_ray.config.base import load_config
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.demo import DemoConfig
from adre_ray.smoothing.params import MAX_SIGMA, check_alpha, check_draws, check_sigma


@pytest.mark.parametrize("sigma", [0, -0.25, float("inf"), float("nan"), 1e308, MAX_SIGMA * 1.01, True])
def test_one_sigma_rule_for_configs_and_library_calls(sigma):
    from adre_ray.smoothing.certify import certify_counts

    with pytest.raises(ValueError, match=r"sigma=.*: must be a finite number in \(0, 100\]"):
        check_sigma(sigma)
    with pytest.raises(ValueError, match=r"sigma=.*: must be a finite number in \(0, 100\]"):
        certify_counts([10, 0], [10, 0], sigma, 0.001)
    if not isinstance(sigma, bool):
        with pytest.raises(ValueError, match=r"sigma=.*: must be a finite number in \(0, 100\]"):
            load_config(DemoConfig, None, values={"sigma": repr(sigma)})


def test_sampler_takes_the_same_sigma_rule():
    import torch

    from adre_ray.smoothing.sampler import sample_counts

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    for sigma in (float("inf"), 1e3):
        with pytest.raises(ValueError, match=r"sigma=.*: must be a finite number in \(0, 100\]"):
            sample_counts(model, torch.zeros(4), num=4, sigma=sigma, num_classes=2, batch_size=4)


def test_alpha_and_draws_rules_name_the_field():
    with pytest.raises(ValueError, match=r"^validation.alpha=1.0: must lie in the open interval \(0, 1\)$"):
        check_alpha(1.0, "validation.alpha")
    with pytest.raises(ValueError, match=r"^n0=True: must be an integer >= 1"):
        check_draws(True, "n0")
    with pytest.raises(ValueError, match=r"^alpha=0.0: must lie in the open interval"):
        load_config(CertifyConfig, None, ["checkpoint=m.pt", "alpha=0"])


def test_declared_constraints_name_field_and_value():
    cases = {"n=0": "n=0: must be an integer >= 1 (at most 2**63 - 1)",
             "tcertify_mode=best": "tcertify_mode='best': must be one of paper, bonferroni, pilot",
             "flush_seconds=-1": "flush_seconds=-1.0: must be a finite number >= 0",
             "stall_timeout_s=0": "stall_timeout_s=0.0: must be a finite number of seconds > 0",
             "output_dir=''": "output_dir='': must name the result folder"}
    for override, message in cases.items():
        with pytest.raises(ValueError) as err:
            load_config(CertifyConfig, None, ["checkpoint=m.pt", override])
        assert str(err.value) == message


def test_configs_and_vocabulary_import_without_torch():
    code = ("import sys, adre_ray.parsers, adre_ray.config.train, adre_ray.config.tune, "
            "adre_ray.smoothing.params, adre_ray.data.info, adre_ray.models.formats; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_model_names_are_asked_of_the_registry(monkeypatch):
    from torch import nn

    import adre_ray.models as models
    from adre_ray.models import registry

    registry.available_models()  # the built-ins register in the real registry first, not in the copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model("tiny_identity")(lambda num_classes, dataset: nn.Identity())
    assert "tiny_identity" in models.MODEL_NAMES and isinstance(models.MODEL_NAMES, tuple)
