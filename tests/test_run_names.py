"""MLflow run names of certification runs tell checkpoints, sigmas and dates apart (issue 17)."""

from __future__ import annotations

import calendar

import pytest

from adre_ray.distributed.certify import certify_run_name, checkpoint_label


@pytest.mark.parametrize("checkpoint, label", [
    ("runs/cifar10_adre_reg/checkpoint_epoch_000149", "cifar10_adre_reg-checkpoint_epoch_000149"),
    ("runs/cifar10_adre_reg/checkpoint_epoch_000149/model.pt", "cifar10_adre_reg-checkpoint_epoch_000149"),
    ("s3://bucket/adre-runs/basic/checkpoint_epoch_000010", "basic-checkpoint_epoch_000010"),
    ("/tmp/x/basic_sigma025.pt", "basic_sigma025"),
    ("/tmp/adre_reg_run/model.pt", "adre_reg_run"),
    ("/tmp/exp7/best.pt", "exp7-best"),
    ("model.pt", "checkpoint"),
])
def test_checkpoint_label(checkpoint, label):
    assert checkpoint_label(checkpoint) == label


def test_run_names_differ_by_checkpoint_sigma_and_date():
    when = calendar.timegm((2026, 11, 25, 21, 5, 9, 0, 0, 0))
    name = certify_run_name("runs/a/checkpoint_epoch_000149", 0.25, when)
    assert name == "certify-a-checkpoint_epoch_000149-sigma0.25-20261125-210509"
    others = {certify_run_name("runs/b/checkpoint_epoch_000149", 0.25, when),
              certify_run_name("runs/a/checkpoint_epoch_000149", 0.5, when),
              certify_run_name("runs/a/checkpoint_epoch_000149", 0.25, when + 1)}
    assert name not in others and len(others) == 3
