"""``adre-ray certify`` reads the checkpoint once, each result part once, and the manifest once under the
folder's lock (plus once in the refusal check before Ray starts); a resumed run reads the earlier parts
once each and never reads back the parts it wrote."""

from __future__ import annotations

import collections

from calibrated_model import calibrated_small_cnn

from adre_ray.analysis import devices, results
from adre_ray.analysis.results import part_files
from adre_ray.distributed import certify, certify_settings

SIGMA = 0.25


def test_a_run_and_its_resume_read_each_file_once(ray_cluster, cifar10_dir, tmp_path, monkeypatch):
    checkpoint = calibrated_small_cnn(tmp_path / "model.pt", cifar10_dir, SIGMA, seed=1, first_image=5,
                                      extra={"sigma": SIGMA})
    reads: collections.Counter = collections.Counter()

    def counted(name, function):
        def wrapper(*args, **kwargs):
            reads[name if name != "part" else str(args[0])] += 1
            return function(*args, **kwargs)
        return wrapper

    read_checkpoint = counted("checkpoint", certify_settings.read_checkpoint)
    monkeypatch.setattr(certify_settings, "read_checkpoint", read_checkpoint)
    manifest = counted("manifest", results.read_manifest)
    for module in (results, certify, certify_settings, devices):
        monkeypatch.setattr(module, "read_manifest", manifest)
    monkeypatch.setattr(results, "_read_file", counted("part", results._read_file))
    out = tmp_path / "out"

    def run(max_images: int) -> None:
        reads.clear()
        settings = {"checkpoint": checkpoint, "data_dir": cifar10_dir, "output_dir": out, "n0": 20, "n": 100,
                    "shard_size": 50, "skip": 2_500, "max_images": max_images, "num_actors": 1,
                    "flush_images": 1, "tracking_uri": "none", "progress": "false"}
        argv = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
        assert certify.main(argv) == 0

    run(2)
    assert reads.pop("checkpoint") == 1 and reads.pop("manifest") == 2  # check_resume, then under the lock
    assert not reads  # no part read: the new run's two parts are summarized from memory
    earlier = {str(p) for p in part_files(out)}
    run(3)
    assert reads.pop("checkpoint") == 1 and reads.pop("manifest") == 2
    assert reads == dict.fromkeys(earlier, 1)  # each earlier part once; the new one never read back
