"""Distributed certification on Ray actors: determinism across actor counts, exact bounds, fault tolerance,
resume, and refusal to mix runs. Ten CIFAR-10 test images (one per class), n0 = 100, n = 2,000."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import torch
from calibrated_model import calibrated_small_cnn
from conftest import fresh_mlflow_db
from scipy import special, stats

from adre_ray.analysis.results import MANIFEST_NAME, RESULT_SCHEMA, part_files, read_manifest, read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.data import load_images
from adre_ray.distributed.certify import CertifyHooks, main, make_pool, run_certification
from adre_ray.models import build_model
from adre_ray.smoothing import MAIN_STREAM, pA_lower, pB_upper_max, sample_counts

SIGMA = 0.25
TRAIN_RUN_ID = "0123456789abcdef0123456789abcdef"


def comparable(table) -> list[dict]:
    """Rows without the wall-time column (the only one allowed to differ between runs)."""
    return table.drop_columns(["time_s"]).to_pylist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cifar10_dir) -> Path:
    """A seeded small_cnn whose BatchNorm statistics are set from 250 noisy test images (counts split
    between classes, so some images certify while others abstain, which the radius checks below need)."""
    return calibrated_small_cnn(tmp_path_factory.mktemp("ckpt") / "model.pt", cifar10_dir, SIGMA, seed=1,
                                first_image=5, extra={"sigma": SIGMA, "mlflow_run_id": TRAIN_RUN_ID})


def make_cfg(checkpoint: Path, data_dir: Path, out: Path, **changes) -> CertifyConfig:
    settings = dict(checkpoint=str(checkpoint), dataset="cifar10", data_dir=str(data_dir), split="test",
                    sigma=None, n0=100, n=2_000, alpha=0.001, start=0, skip=1_000, max_images=10,
                    tcertify_mode="pilot", shard_size=500, batch_size=250, num_actors=1, seed=7,
                    output_dir=str(out), tracking_uri="none", flush_images=3, progress=False)
    settings.update(changes)
    cfg = CertifyConfig(**settings)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def pool(ray_cluster, checkpoint, cifar10_dir, tmp_path_factory):
    """Two warm actors (one per core) shared by the runs below: actor start-up dominates on 2 busy cores.

    A run with num_actors=1 uses the first slot only; a run without a pool makes and ends its own.
    """
    warm = make_pool(make_cfg(checkpoint, cifar10_dir, tmp_path_factory.mktemp("unused"), num_actors=2))
    yield warm
    warm.shutdown()


@pytest.fixture(scope="module")
def reference(pool, checkpoint, cifar10_dir, tmp_path_factory):
    """The undisturbed single-actor run every other run is compared with (MLflow on)."""
    root = tmp_path_factory.mktemp("reference")
    uri = fresh_mlflow_db(root / "mlflow.db")
    cfg = make_cfg(checkpoint, cifar10_dir, root / "out", tracking_uri=uri)
    result = run_certification(cfg, pool=pool)
    return cfg, result, read_results(result.output_dir), uri


def test_one_and_two_actors_give_identical_rows(reference, pool, checkpoint, cifar10_dir, tmp_path,
                                                mlflow_uri):
    cfg, result, ref_table, _ = reference
    assert ref_table.column("idx").to_pylist() == list(range(0, 10_000, 1_000))
    assert ref_table.schema.names == RESULT_SCHEMA.names
    assert result.images_certified == 10 and len(part_files(result.output_dir)) == 4  # flush every 3

    two = run_certification(make_cfg(checkpoint, cifar10_dir, tmp_path / "two", num_actors=2,
                                     tracking_uri=mlflow_uri, batch_size=96, flush_images=4), pool=pool)
    assert comparable(read_results(two.output_dir)) == comparable(ref_table)
    assert two.summary == {**result.summary, "samples_per_s": two.summary["samples_per_s"]}


def test_counts_equal_a_single_process_sum_of_shards(reference, checkpoint, cifar10_dir):
    """The actors' summed counts for image 0 equal sample_counts run here, shard by shard (main stream)."""
    cfg, _, ref_table, _ = reference
    model = build_model("small_cnn", 10, "cifar10")
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    x, _ = load_images("cifar10", cifar10_dir, "test", [0])
    torch.set_num_threads(1)
    total = sum(sample_counts(model, x[0], 500, 10, SIGMA, batch_size=500, seed=cfg.seed, idx=0, shard=s,
                              stream=MAIN_STREAM) for s in range(4))
    assert ref_table.to_pylist()[0]["counts"] == total.tolist()


def test_stored_radii_follow_from_stored_counts(reference):
    """Every radius and bound recomputed from the row's counts with the bound functions matches."""
    cfg, _, table, _ = reference
    rows = table.to_pylist()
    grid = set(cfg.grid)
    for row in rows:
        counts, pilot = np.array(row["counts"]), np.array(row["pilot_counts"])
        assert counts.sum() == row["n"] == 2_000 and pilot.sum() == row["n0"] == 100
        assert row["sigma"] == SIGMA and row["alpha"] == 0.001 and row["tcertify_mode"] == "pilot"
        assert row["train_run_id"] == TRAIN_RUN_ID
        c_a = int(np.argmax(pilot))
        # CERTIFY: Clopper-Pearson lower bound at alpha on counts[cA]; radius sigma * Phi^-1(pA_lower)
        pa = pA_lower(int(counts[c_a]), 2_000, 0.001)
        assert row["pA_lower_certify"] == pa
        certified = pa >= 0.5
        assert row["certify_predict"] == (c_a if certified else -1)
        assert row["radius_certify"] == (SIGMA * special.ndtri(pa) if certified else 0.0)
        assert row["correct"] == (certified and c_a == row["label"])
        # T-CERTIFY at the stored split a' = t * alpha: pA_lower(a'), pB_upper(alpha - a') clipped
        a_prime = row["alpha_prime"]
        assert any(np.isclose(a_prime, t * 0.001, rtol=1e-12, atol=0) for t in grid)
        pa_t = pA_lower(int(counts[c_a]), 2_000, a_prime)
        assert row["pb_bound"] == cfg.pb_bound == "max" and row["shortcut"] == "none"
        assert row["samples_used"] == 2_100
        pb_t = min(pB_upper_max(np.delete(counts, c_a), 2_000, 0.001 - a_prime), 1.0 - pa_t)
        assert row["pA_lower"] == pa_t and row["pB_upper"] == pb_t
        if pa_t <= 0.5:
            expected = 0.0
        elif pb_t >= 1.0 - pa_t:
            expected = SIGMA * special.ndtri(pa_t)
        else:
            expected = SIGMA / 2 * (special.ndtri(pa_t) - special.ndtri(pb_t))
        assert row["radius_tcertify"] == pytest.approx(expected, rel=1e-12, abs=0)
        assert row["tcertify_predict"] == (c_a if expected > 0 else -1)
        # PREDICT: two-sided binomial test of the top two main counts at alpha
        top = np.sort(counts)[::-1]
        p_value = stats.binomtest(int(top[0]), int(top[0] + top[1]), 0.5).pvalue
        assert row["predict"] == (int(np.argmax(counts)) if p_value <= 0.001 else -1)
    # the checks above are only meaningful if the model gives non-trivial outcomes
    assert any(r["radius_certify"] > 0 for r in rows) and any(r["certify_predict"] == -1 for r in rows)
    assert any(np.count_nonzero(r["counts"]) >= 2 for r in rows)


def test_skip_misclassified_keeps_the_table_with_fewer_samples(reference, pool, checkpoint, cifar10_dir,
                                                                tmp_path):
    """Same seed, --skip-misclassified: certified accuracy at every radius and ACR equal the plain run's;
    images whose pilot class is the label get identical rows; the others make no main draws."""
    cfg, result, ref_table, _ = reference
    out = run_certification(make_cfg(checkpoint, cifar10_dir, tmp_path / "skip", num_actors=2,
                                     skip_misclassified=True), pool=pool)
    table = read_results(out.output_dir)
    ref_rows = {r["idx"]: r for r in comparable(ref_table)}
    skipped = 0
    for row in comparable(table):
        ref = ref_rows[row["idx"]]
        assert row["pilot_counts"] == ref["pilot_counts"]
        if int(np.argmax(row["pilot_counts"])) != row["label"]:
            skipped += 1
            assert row["shortcut"] == "skipped_misclassified" and row["n"] == 0 and row["samples_used"] == 100
            assert not row["correct"] and not row["correct_tcertify"] and row["radius_certify"] == 0.0
            assert not ref["correct"] and not ref["correct_tcertify"]  # the full run's row is not correct
        else:
            assert row == ref
    assert 0 < skipped < 10, "the fixture model must have both kinds of image for this test to bite"
    for key, value in result.summary.items():
        if "cert_acc" in key or key.endswith("/acr"):
            assert out.summary[key] == value, key
    assert out.summary["samples/per_image"] < result.summary["samples/per_image"] == 2_100
    assert out.summary["shortcut/skipped_misclassified_rate"] == skipped / 10


def test_early_abstain_keeps_the_table_and_iss_stays_on_the_shard_grid(reference, pool, checkpoint,
                                                                        cifar10_dir, tmp_path):
    """Early abstain (delta = 1e-3, one 500-draw shard per wave): stopped images abstained in the plain run
    too (a change has probability <= 1e-3 per image; the seed is fixed), the others' rows are identical,
    so the table is exact. ISS: n a multiple of shard_size, <= n."""
    cfg, result, ref_table, _ = reference
    ref_rows = {r["idx"]: r for r in comparable(ref_table)}
    early = run_certification(make_cfg(checkpoint, cifar10_dir, tmp_path / "early", num_actors=2,
                                       early_abstain=True, early_abstain_delta=1e-3), pool=pool)
    rows = comparable(read_results(early.output_dir))
    assert any(r["shortcut"] == "early_abstain" for r in rows)
    for row in rows:
        ref = ref_rows[row["idx"]]
        if row["shortcut"] == "early_abstain":
            assert ref["certify_predict"] == -1 and ref["tcertify_predict"] == -1  # it abstained anyway
            assert row["n"] < 2_000 and row["samples_used"] == 100 + row["n"]
        else:
            assert row == ref
    for key, value in result.summary.items():
        if "cert_acc" in key or key.endswith("/acr"):
            assert early.summary[key] == value, key
    iss = run_certification(make_cfg(checkpoint, cifar10_dir, tmp_path / "iss", num_actors=2,
                                     n_policy="iss", iss_max_radius_loss=0.05), pool=pool)
    for row in comparable(read_results(iss.output_dir)):
        ref = ref_rows[row["idx"]]
        assert row["n"] % 500 == 0 and row["n"] <= 2_000
        assert (row["shortcut"] == "iss") == (row["n"] < 2_000)
        assert row["counts"] == ref["counts"] or row["n"] < 2_000


def test_mlflow_run_has_params_metrics_artifacts_and_training_link(reference):
    cfg, result, table, uri = reference
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(result.mlflow_run_id)
    assert run.data.params["n"] == "2000" and run.data.params["sigma"] == str(SIGMA)
    assert run.data.tags["train_run_id"] == TRAIN_RUN_ID
    acc0 = sum(r["correct"] for r in table.to_pylist()) / 10
    assert run.data.metrics["certify/cert_acc_at_0.00"] == pytest.approx(acc0)
    artifacts = {a.path for a in mlflow.MlflowClient(tracking_uri=uri).list_artifacts(result.mlflow_run_id,
                                                                                        "results")}
    assert {f"results/{p.name}" for p in part_files(result.output_dir)} <= artifacts


def test_killed_actor_gives_the_same_output(reference, pool, checkpoint, cifar10_dir, tmp_path):
    _, _, ref_table, _ = reference
    seen = {}
    replacements_before = pool.replacements

    def kill_first_actor_once(running_pool, task):
        if not seen:
            seen["victim"] = running_pool.actors[0]
            ray.kill(running_pool.actors[0])  # no restart: the driver must re-run its shards elsewhere

    cfg = make_cfg(checkpoint, cifar10_dir, tmp_path / "killed", num_actors=2, max_images=3)
    result = run_certification(cfg, hooks=CertifyHooks(on_shard_done=kill_first_actor_once), pool=pool)
    assert pool.replacements == replacements_before + 1 and pool.actors[0] is not seen["victim"]
    assert comparable(read_results(result.output_dir)) == comparable(ref_table)[:3]


class StopRunError(Exception):
    pass


def test_interrupted_run_resumes_with_every_image_once(reference, pool, checkpoint, cifar10_dir, tmp_path):
    _, _, ref_table, _ = reference
    out = tmp_path / "resumed"
    cfg = make_cfg(checkpoint, cifar10_dir, out, num_actors=2, max_images=4, flush_images=1)

    def stop(path):
        raise StopRunError(path)

    with pytest.raises(StopRunError):
        run_certification(cfg, hooks=CertifyHooks(on_part_written=stop), pool=pool)
    first = read_results(out).column("idx").to_pylist()
    assert 1 <= len(first) < 4  # the first part, plus whatever had finished when it stopped
    result = run_certification(cfg, pool=pool)
    assert result.images_certified == 4 - len(first)
    table = read_results(out)  # strict: would raise on an idx written twice
    assert comparable(table) == comparable(ref_table)[:4]


def test_rerun_with_other_settings_is_refused(reference, checkpoint, cifar10_dir):
    cfg, _, _, _ = reference
    for field, value in (("sigma", 0.5), ("n", 4_000), ("tcertify_mode", "paper"), ("seed", 8)):
        name = "mode" if field == "tcertify_mode" else field
        with pytest.raises(ValueError, match=rf"{name}=.*differs"):
            run_certification(make_cfg(checkpoint, cifar10_dir, cfg.output_dir, **{field: value}))


def test_corrupt_part_is_named(reference, tmp_path):
    cfg, _, _, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(cfg.output_dir, out)
    victim = part_files(out)[1]
    victim.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=victim.name):
        run_certification(CertifyConfig(**{**cfg.to_dict(), "output_dir": str(out)}))


def test_manifest_records_the_devices_and_refuses_a_mix(reference, pool, checkpoint, cifar10_dir, tmp_path):
    """The manifest lists the actors' device facts; a folder made on another device model is not resumed
    unless allow_mixed_devices, which then lists both."""
    cfg, result, ref_table, _ = reference
    manifest = read_manifest(result.output_dir)
    [facts] = manifest["devices"]
    assert facts["type"] == "cpu" and facts["noise"] == "torch" and facts["deterministic"] is False
    schemes = set(ref_table.column("noise_scheme").to_pylist())
    assert schemes == {facts["noise_scheme"], manifest["noise_scheme"]}
    out = tmp_path / "other_gpu"
    shutil.copytree(cfg.output_dir, out)
    record = json.loads((out / MANIFEST_NAME).read_text())
    record["devices"][0]["model"] = "NVIDIA H100 80GB HBM3"
    (out / MANIFEST_NAME).write_text(json.dumps(record))
    more = make_cfg(checkpoint, cifar10_dir, out, start=500, max_images=1)  # one image not done yet
    with pytest.raises(ValueError, match=r"model=.* not model='NVIDIA H100 80GB HBM3'.*allow_mixed_devices"):
        run_certification(more, pool=pool)
    assert len(read_results(out)) == len(ref_table)  # nothing added on a refusal
    run_certification(dataclasses.replace(more, allow_mixed_devices=True), pool=pool)
    assert len(read_results(out)) == len(ref_table) + 1
    assert [d["model"] for d in read_manifest(out)["devices"]] == ["NVIDIA H100 80GB HBM3", facts["model"]]


def test_cli_bad_values_exit_2_and_a_lost_part_is_recomputed(reference, pool, tmp_path, capsys):
    """Runs last: it ends the shared pool so that the CLI run can start its own actors (one per CPU)."""
    cfg, result, ref_table, _ = reference
    out = tmp_path / "cli"
    shutil.copytree(cfg.output_dir, out)
    argv = ["--checkpoint", cfg.checkpoint, "--data-dir", cfg.data_dir, "--n0", "100", "--n", "2000",
            "--skip", "1000", "--max-images", "10", "--seed", "7", "--output-dir", str(out),
            "--set", "shard_size=500", "--set", "tracking_uri=none", "--no-progress"]
    assert main([*argv, "--n0", "0"]) == 2
    assert "n0=0" in capsys.readouterr().err
    assert main([*argv, "--sigma", "0.5"]) == 2
    assert "sigma=0.5 differs" in capsys.readouterr().err
    assert main([*argv, "--grid", "0.5,x"]) == 2
    assert "grid='0.5,x'" in capsys.readouterr().err
    assert main(argv) == 0  # every image is there: nothing to sample, the summary is printed
    assert "tcertify" in capsys.readouterr().out

    pool.shutdown()
    lost = part_files(out)[-1]  # parts of 3, 3, 3 and 1 images (flush_images=3): the last one
    lost_idx = set(read_results(lost).column("idx").to_pylist())
    lost.unlink()
    kept = set(part_files(out))
    assert main([*argv, "--actors", "1"]) == 0
    new_parts = set(part_files(out)) - kept
    assert {i for p in new_parts for i in read_results(p).column("idx").to_pylist()} == lost_idx
    assert comparable(read_results(out)) == comparable(ref_table)

