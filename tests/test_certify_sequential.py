"""Sequential certification on Ray actors (CI size): ``stop_when_decided`` keeps the plain run's table with
fewer draws, ``target_radius`` decides per image; every stored certificate recomputes from its counts at
its ``certify_level``. Ten CIFAR-10 test images, n0 = 100, n = 4,000 in shards of 250 (looks after 250,
500, 1,000, 2,000 and 4,000 draws)."""

from __future__ import annotations

import numpy as np
import pytest
from calibrated_model import calibrated_small_cnn

from adre_ray.analysis.metrics import certified_accuracy, summarize
from adre_ray.analysis.results import read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.distributed.certify import make_pool, run_certification
from adre_ray.smoothing import certify_counts
from adre_ray.smoothing.sequential import decide_plan

SIGMA = 0.25


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cifar10_dir):
    """A small_cnn with calibrated BatchNorm: counts split, some images certify, others abstain."""
    return calibrated_small_cnn(tmp_path_factory.mktemp("ckpt") / "model.pt", cifar10_dir, SIGMA, seed=3,
                                first_image=3, extra={"sigma": SIGMA})


def make_cfg(checkpoint, data_dir, out, **changes) -> CertifyConfig:
    settings = dict(checkpoint=str(checkpoint), dataset="cifar10", data_dir=str(data_dir), sigma=SIGMA,
                    n0=100, n=4_000, alpha=0.001, skip=1_000, max_images=10, shard_size=250, batch_size=250,
                    num_actors=1, seed=7, output_dir=str(out), tracking_uri="none", progress=False)
    cfg = CertifyConfig(**{**settings, **changes})
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def runs(ray_cluster, checkpoint, cifar10_dir, tmp_path_factory):
    """The plain run, the table-decided run (+ skip misclassified) and a target-radius run, one warm actor."""
    root = tmp_path_factory.mktemp("sequential")
    pool = make_pool(make_cfg(checkpoint, cifar10_dir, root / "unused"))
    try:
        out = {}
        variants = (("plain", {}), ("decided", {"stop_when_decided": True, "skip_misclassified": True}),
                    ("target", {"target_radius": 0.25}))
        for name, changes in variants:
            cfg = make_cfg(checkpoint, cifar10_dir, root / name, **changes)
            run_certification(cfg, pool=pool)
            out[name] = read_results(root / name)
        return out
    finally:
        pool.shutdown()


def test_decided_run_keeps_the_table_with_fewer_draws(runs):
    plain, decided = runs["plain"], runs["decided"]
    grid = decide_plan(4_000, 250, SIGMA, 0.001, None, 1e-4).grid
    assert grid == (0.0, 0.25, 0.5)
    tables = [certified_accuracy(np.array(t.column("radius_certify").to_pylist()),
                                 np.array(t.column("correct").to_pylist()), grid) for t in (plain, decided)]
    assert tables[0].tolist() == tables[1].tolist()
    assert 0 < tables[0][0] < 1  # some images certify, some do not: the comparison means something
    used = [sum(t.column("samples_used").to_pylist()) for t in (plain, decided)]
    assert used[1] < used[0]
    shortcuts = set(decided.column("shortcut").to_pylist())
    assert shortcuts & {"decided", "early_abstain", "skipped_misclassified"}
    for row, ref in zip(decided.to_pylist(), plain.to_pylist(), strict=True):
        skipped = row["shortcut"] == "skipped_misclassified"  # no main draws, no plan: level alpha
        assert row["alpha"] == 0.001 and (row["certify_level"] < 0.001 or skipped)
        if row["shortcut"] == "none":  # reached the last look: the plain run's draws, exactly
            assert row["counts"] == ref["counts"]
        if row["certify_predict"] >= 0:  # every certificate recomputes from the draws made
            again = certify_counts(row["pilot_counts"], row["counts"], SIGMA, row["certify_level"])
            assert again.radius == row["radius_certify"] and row["n"] == sum(row["counts"]) < 4_000 + 1


def test_target_radius_run_decides_each_image(runs):
    target = runs["target"]
    for row in target.to_pylist():
        assert row["target_radius"] == 0.25 and row["decision"] in ("certified", "not_certified", "abstain")
        assert (row["decision"] == "certified") == (row["certify_predict"] >= 0
                                                    and row["radius_certify"] >= 0.25 - 1e-9)
        again = certify_counts(row["pilot_counts"], row["counts"], SIGMA, row["certify_level"])
        assert again.radius == row["radius_certify"] and row["certify_level"] <= 0.001 / 2
    summary = summarize(target)
    assert summary["target/radius"] == 0.25
    certified = [r["decision"] == "certified" and r["correct"] for r in target.to_pylist()]
    assert summary["target/certified_fraction"] == pytest.approx(np.mean(certified))
    plain_used = sum(runs["plain"].column("samples_used").to_pylist())
    assert sum(target.column("samples_used").to_pylist()) < plain_used


@pytest.mark.parametrize("flags,named", [
    (["--target-radius", "-0.5"], "target_radius=-0.5"),
    (["--decide-grid", "0.25,inf"], "decide_grid=(0.25, inf)"),
    (["--decide-delta", "1.5"], "decide_delta=1.5"),
    (["--stop-when-decided", "--early-abstain"], "early_abstain=True"),
    (["--stop-when-decided", "--target-radius", "0.5"], "target_radius=0.5"),
    (["--early-abstain-rule", "strict"], "early_abstain_rule='strict'"),
])
def test_bad_sequential_settings_exit_2_before_ray(flags, named, capsys, tmp_path):
    from adre_ray.distributed.certify import main

    assert main(["--checkpoint", str(tmp_path / "model.pt"), "--sigma", "0.25", "--output-dir",
                 str(tmp_path / "out"), *flags]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_old_folder_resumes_with_the_schema_3_early_abstain_rule(tmp_path):
    """A manifest without the schema-4 keys means early_abstain_rule cp: an early-abstain folder of schema 3
    resumes only with that rule, a folder without early abstain with any."""
    from adre_ray.analysis.results import ensure_manifest
    from adre_ray.distributed.certify import manifest_settings

    base = dict(checkpoint="c", sigma=0.25, tracking_uri="none")
    settings = manifest_settings(CertifyConfig(**base, early_abstain=True, early_abstain_rule="cp"))
    old = {k: v for k, v in settings.items() if k not in ("early_abstain_rule", "stop_when_decided",
                                                          "decide_grid", "decide_delta", "target_radius")}
    (tmp_path / "run.json").write_text(__import__("json").dumps(old))
    assert ensure_manifest(tmp_path, settings) is True
    with pytest.raises(ValueError, match="early_abstain_rule='product' differs"):
        ensure_manifest(tmp_path, manifest_settings(CertifyConfig(**base, early_abstain=True)))
    plain = manifest_settings(CertifyConfig(**base))
    assert plain["early_abstain_rule"] == "cp"  # moot without early abstain: old plain folders resume


@pytest.mark.parametrize("changes", [{"stop_when_decided": True}, {"target_radius": 0.25},
                                     {"stop_when_decided": True, "n_policy": "iss"}])
def test_driver_releases_shards_look_by_look_and_stops_as_the_plan_says(changes):
    """The driver's stages (no Ray): waves end exactly at the plan's looks, the image stops at the first
    look whose verdict stops, and its row is computed at that look's level from the draws made."""
    from adre_ray.distributed.certify import ImageInFlight, next_wave, result_row, shortcut_rules
    from adre_ray.smoothing.shortcuts import row_fields

    cfg = CertifyConfig(checkpoint="c", sigma=SIGMA, n=4_000, shard_size=250, **changes)
    cfg.validate()
    rng = np.random.default_rng(0)
    for p_a in (0.3, 0.52, 0.7, 0.9, 0.99, 0.9999):
        pilot = np.array([int(rng.binomial(100, p_a)), 0])
        pilot[1] = 100 - pilot[0]
        image = ImageInFlight(0, pilot, np.zeros(2, np.int64), n=cfg.n)
        rules = shortcut_rules(cfg)
        wave, ends = next_wave(image, rules, cfg.shard_size), []
        while wave:
            for task in wave:
                hits = int(rng.binomial(task.num, p_a))
                image.counts += np.array([hits, task.num - hits] if pilot[0] >= pilot[1] else
                                         [task.num - hits, hits])
                image.made += task.num
            ends.append(image.made)
            wave = next_wave(image, rules, cfg.shard_size)
        plan, verdict = image.notes["plan"], image.notes["verdict"]  # the sequential rule's plan and stop
        assert tuple(ends) == plan.looks[:len(ends)]
        verdicts = [plan.check(int(image.counts[int(np.argmax(pilot))]), m) for m in ends[-1:]]
        assert verdicts[0] == verdict and verdict.stop
        row = result_row(0, 0, image.pilot, image.counts, sigma=SIGMA, alpha=cfg.alpha, mode="pilot",
                         grid=cfg.grid, seed=0, time_s=0.0, checkpoint="c", train_run_id=None,
                         shortcut=image.shortcut, **row_fields(rules, image))
        assert row["certify_level"] == verdict.level and row["n"] == ends[-1]
        assert row["decision"] == verdict.decision
        assert (image.shortcut in ("none", "iss")) == (ends[-1] == image.n)  # iss: n_i < n from the pilot


def test_target_summary_and_analyze_column():
    import pyarrow as pa

    from adre_ray.analysis.tables import TARGET_COLUMN, certified_accuracy_table, to_markdown
    from adre_ray.distributed.certify import result_row

    def row(idx, label, counts, decision, level=0.0005):
        return result_row(idx, label, np.array([0, 100]), np.array(counts), sigma=SIGMA, alpha=0.001,
                          mode="pilot", grid=(1.0,), seed=0, time_s=0.0, checkpoint="c", train_run_id=None,
                          shortcut="target_radius", level=level, target_radius=0.25, decision=decision)

    target = pa.Table.from_pylist([row(0, 1, [0, 1000], "certified"), row(1, 0, [0, 1000], "certified"),
                                   row(2, 1, [600, 400], "not_certified"), row(3, 1, [150, 850], "abstain")])
    summary = summarize(target)
    assert summary["target/certified_fraction"] == 0.25  # image 1 is certified, but for the wrong class
    assert summary["target/certified_rate"] == 0.5 and summary["target/abstain_rate"] == 0.25
    plain = pa.Table.from_pylist([{**row(0, 1, [0, 1000], None), "target_radius": None, "decision": None}])
    rows = certified_accuracy_table({"target": target, "plain": plain}, radii=(0.0, 0.25))
    assert [r[TARGET_COLUMN] for r in rows] == ["25.0 @ 0.25"] * 2 + [""] * 2
    assert "certified at target %" in to_markdown(rows)
