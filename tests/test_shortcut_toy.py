"""A new evaluation shortcut is one rule object: a toy rule defined here (the package is not edited) is
asked by the scheduler through the ``Shortcut`` interface, no Ray (``next_wave``) and on Ray actors
(``run_certification(..., shortcuts=...)``). The toy stops every image after its first two main shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from calibrated_model import calibrated_small_cnn

from adre_ray.analysis.metrics import summarize
from adre_ray.analysis.results import read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.data import load_images
from adre_ray.distributed.certify import (
    ImageInFlight,
    make_pool,
    next_wave,
    run_certification,
    shortcut_rules,
)
from adre_ray.models import build_model
from adre_ray.smoothing import MAIN_STREAM, certify_counts, sample_counts
from adre_ray.smoothing.shortcuts import ImageDraws, Shortcut

SIGMA = 0.25
SHARD = 100


@dataclass(frozen=True)
class TwoShards(Shortcut):
    """Look after every main shard; stop once ``shards`` of them are summed (a toy, not a valid rule)."""

    shard_size: int
    shards: int = 2
    name = "toy_two_shards"

    def next_look(self, image: ImageDraws) -> int:
        return min(image.n, image.made + self.shard_size)

    def after_look(self, image: ImageDraws) -> bool:
        if image.made < self.shards * self.shard_size or image.made >= image.n:
            return False
        image.shortcut = self.name
        return True

    def row_fields(self, image: ImageDraws) -> dict:
        return {"level": 0.01}  # rows computed at another level than alpha: shows the rule's row fields


def test_the_scheduler_asks_a_toy_rule_shard_by_shard():
    image = ImageInFlight(0, np.array([30, 20]), np.zeros(2, np.int64), n=1_000)
    rules = [TwoShards(SHARD)]
    waves = []
    while wave := next_wave(image, rules, SHARD):
        waves.append([task.num for task in wave])
        image.made += sum(task.num for task in wave)
    assert waves == [[SHARD], [SHARD]] and image.shortcut == "toy_two_shards" and image.made == 2 * SHARD


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cifar10_dir):
    return calibrated_small_cnn(tmp_path_factory.mktemp("ckpt") / "model.pt", cifar10_dir, SIGMA, seed=1,
                                first_image=5, extra={"sigma": SIGMA})


def test_a_toy_shortcut_certifies_through_the_scheduler(ray_cluster, checkpoint, cifar10_dir, tmp_path):
    cfg = CertifyConfig(checkpoint=str(checkpoint), dataset="cifar10", data_dir=str(cifar10_dir),
                        sigma=SIGMA, n0=50, n=800, alpha=0.001, skip=2_500, max_images=3, shard_size=SHARD,
                        batch_size=SHARD, num_actors=1, seed=7, output_dir=str(tmp_path / "toy"),
                        tracking_uri="none", progress=False)
    cfg.validate()
    pool = make_pool(cfg)
    try:
        rules = [*shortcut_rules(cfg), TwoShards(SHARD)]  # cfg asks for none: the toy alone
        result = run_certification(cfg, pool=pool, shortcuts=rules)
    finally:
        pool.shutdown()
    rows = read_results(result.output_dir).to_pylist()
    assert [row["idx"] for row in rows] == [0, 2_500, 5_000]
    assert {row["shortcut"] for row in rows} == {"toy_two_shards"}
    assert {row["n"] for row in rows} == {2 * SHARD}
    assert {row["samples_used"] for row in rows} == {50 + 2 * SHARD}
    for row in rows:
        certified = certify_counts(np.array(row["pilot_counts"]), np.array(row["counts"]), SIGMA, 0.01)
        assert row["certify_level"] == 0.01 and row["radius_certify"] == float(certified.radius)
    assert summarize(read_results(result.output_dir))["shortcut/toy_two_shards_rate"] == 1.0
    model = build_model("small_cnn", 10, "cifar10")  # the draws made are the full run's first two shards
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    x, _ = load_images("cifar10", cifar10_dir, "test", [0])
    torch.set_num_threads(1)
    first_two = sum(sample_counts(model.eval(), x[0], SHARD, 10, SIGMA, batch_size=SHARD, seed=7, idx=0,
                                  shard=s, stream=MAIN_STREAM) for s in range(2))
    assert rows[0]["counts"] == first_two.tolist()
