"""Several shards per Ray call: ~1 call per image, and rows that do not depend on the grouping.

Stub actors (no torch, no model) return counts that are a function of the shard's key (idx, stream,
shard, num) alone, as the real actors' are; the real scheduler drives them. Rows (all columns but
``time_s``) must equal those of one shard per call, with and without the shortcuts that decide at wave
boundaries, and after an actor is killed while holding a call of several shards.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import ray

from adre_ray.analysis.results import read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.distributed import certify_scheduler
from adre_ray.distributed.certify import CertifyHooks, CertifyPool, run_certification
from adre_ray.models import build_model, save_model_checkpoint

IMAGES = 24
N0, N, SHARD_SIZE = 100, 100_000, 10_000  # the default shard size: 1 + 10 shards per image
SHARDS_PER_IMAGE = 11


@ray.remote(num_cpus=0.25)
class KeyedCountsActor:
    """``CertifyWorker``'s interface; a shard's counts are drawn from a generator seeded by its key, with a
    top-class share that depends on the image (some certify, some abstain, some are misclassified)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def configure(self, *, sigma: float, seed: int, batch_size: int) -> None:
        return None

    def device_facts(self) -> dict[str, Any]:
        return {"type": "stub", "model": "keyed", "noise": "torch", "noise_scheme": 2}

    def count_shards(self, shards: list[tuple[int, int, int, int]],
                     *images: Any) -> tuple[np.ndarray, list[float]]:
        assert len(images) == len(dict.fromkeys(spec[0] for spec in shards))  # one ref per distinct image
        counts = np.zeros((len(shards), self.num_classes), np.int64)
        for row, (idx, stream, shard, num) in enumerate(shards):
            top = (0.995, 0.7, 0.52, 0.35)[idx % 4]
            share = np.full(self.num_classes, (1 - top) / (self.num_classes - 1))
            share[(idx // 4) % self.num_classes] = top
            counts[row] = np.random.default_rng([idx, stream, shard, num]).multinomial(num, share)
        return counts, [0.0] * len(shards)


class CountingPool(CertifyPool):
    """The real pool with ``KeyedCountsActor`` actors; counts its Ray calls and the shards they carry."""

    def __init__(self, checkpoint: str, **kwargs: Any) -> None:
        self.calls: list[int] = []
        super().__init__(checkpoint, **kwargs)

    def _new_actor(self) -> Any:
        actor = KeyedCountsActor.remote(self.num_classes)
        self._facts[actor] = actor.device_facts.remote()
        return actor

    def submit(self, slot: int, tasks: Any, image_refs: dict[int, Any]) -> Any:
        self.calls.append(len(tasks))
        return super().submit(slot, tasks, image_refs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    return str(save_model_checkpoint(path, build_model("small_cnn", 10, "cifar10"), model_name="small_cnn",
                                     num_classes=10, dataset="cifar10", extra={"sigma": 0.25}))


@pytest.fixture()
def stub_pool(ray_cluster, checkpoint):
    pool = CountingPool(checkpoint, num_actors=2, num_classes=10, use_gpu=False, sigma=0.25)
    yield pool
    pool.shutdown()


def certify(pool: CountingPool, checkpoint: str, data_dir: Any, out: Any,
            hooks: CertifyHooks | None = None, **changes: Any) -> list[dict]:
    cfg = CertifyConfig(checkpoint=checkpoint, dataset="cifar10", data_dir=str(data_dir), split="test",
                        sigma=0.25, n0=N0, n=N, shard_size=SHARD_SIZE, skip=1, max_images=IMAGES, seed=3,
                        alpha=0.001, output_dir=str(out), tracking_uri="none", progress=False,
                        flush_images=5, **changes)
    run_certification(cfg, pool=pool, hooks=hooks)
    rows = read_results(out).drop_columns(["time_s"]).sort_by("idx").to_pylist()
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in rows]


SHORTCUTS = [{}, {"early_abstain": True, "skip_misclassified": True, "early_abstain_wave": 2},
             {"stop_when_decided": True}]


@pytest.mark.parametrize("shortcuts", SHORTCUTS, ids=["plain", "early_abstain", "decided"])
def test_grouped_calls_give_the_rows_of_one_shard_per_call(stub_pool, checkpoint, cifar10_dir, tmp_path,
                                                           monkeypatch, shortcuts):
    grouped = certify(stub_pool, checkpoint, cifar10_dir, tmp_path / "grouped", **shortcuts)
    assert max(stub_pool.calls) > 1  # shards were grouped
    monkeypatch.setattr(certify_scheduler, "SHARDS_PER_CALL", 1)
    stub_pool.calls.clear()
    single = certify(stub_pool, checkpoint, cifar10_dir, tmp_path / "single", **shortcuts)
    assert max(stub_pool.calls) == 1
    assert [r["idx"] for r in grouped] == list(range(IMAGES))
    assert grouped == single
    if shortcuts:  # the rules stopped some images early (at the same wave boundaries in both runs)
        assert any(r["shortcut"] != "none" for r in grouped)


def test_the_driver_makes_few_calls_per_image(stub_pool, checkpoint, cifar10_dir, tmp_path):
    """One call per shard (11 per image here) would cost the driver 11x more: at most 2 per image."""
    certify(stub_pool, checkpoint, cifar10_dir, tmp_path / "out")
    assert sum(stub_pool.calls) == IMAGES * SHARDS_PER_IMAGE
    assert len(stub_pool.calls) <= 2 * IMAGES, stub_pool.calls


def test_a_killed_actors_grouped_call_is_recomputed(stub_pool, checkpoint, cifar10_dir, tmp_path):
    undisturbed = certify(stub_pool, checkpoint, cifar10_dir, tmp_path / "undisturbed")
    seen: dict[str, Any] = {}

    def kill_once(pool: CertifyPool, task: Any) -> None:
        if not seen:
            seen["victim"] = pool.actors[0]
            ray.kill(pool.actors[0])  # its queued calls, several shards each, are lost

    before = stub_pool.replacements
    got = certify(stub_pool, checkpoint, cifar10_dir, tmp_path / "killed",
                  hooks=CertifyHooks(on_shard_done=kill_once))
    assert stub_pool.replacements == before + 1 and stub_pool.actors[0] is not seen["victim"]
    assert got == undisturbed


def test_a_small_in_flight_limit_gives_the_same_rows(stub_pool, checkpoint, cifar10_dir, tmp_path):
    """Images still waiting while the queue holds fewer shards than a full call: calls take what is there."""
    full = certify(stub_pool, checkpoint, cifar10_dir, tmp_path / "full")
    assert certify(stub_pool, checkpoint, cifar10_dir, tmp_path / "two", images_in_flight=2) == full
