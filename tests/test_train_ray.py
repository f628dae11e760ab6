"""Training under Ray Train: 2 CPU workers, MLflow tracking, checkpoint round trip, resume by run name."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from adre_ray.config import load_config
from adre_ray.config.train import TrainConfig
from adre_ray.distributed import train as train_mod
from adre_ray.distributed.train import (
    CHECKPOINT_PREFIX,
    TRAIN_STATE_FILENAME,
    config_from_loop_config,
    latest_checkpoint,
    main,
    rng_seed,
    run_training,
)

TRAIN_IMAGES, TEST_IMAGES = 256, 128


def _small_config(cifar10_dir, storage, name: str, epochs: int) -> TrainConfig:
    return load_config(TrainConfig, None, [
        "model=small_cnn", "batch_size=64", f"data.data_dir={cifar10_dir}", "data.source=parquet",
        f"data.train_subset={TRAIN_IMAGES}", f"data.test_subset={TEST_IMAGES}", "data.loader_workers=0",
        "loss.name=adre_reg", "loss.k=2", "loss.lam=0.1", "optim.lr=0.05", "schedule.name=step",
        f"schedule.epochs={epochs}", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        f"run.name={name}", f"run.storage_path={storage}", "run.experiment=test-train",
    ])


def _clean_accuracy(model: torch.nn.Module, cifar10_dir) -> float:
    from adre_ray.data import build_dataset

    test_set = build_dataset("cifar10", cifar10_dir, "test", source="parquet", augment=False,
                             subset=TEST_IMAGES, subset_seed=0)
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test_set, batch_size=64):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(test_set)


@pytest.mark.slow
def test_train_track_checkpoint_and_resume(ray_cluster, mlflow_uri, cifar10_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from adre_ray.models import load_model_checkpoint

    storage = tmp_path / "runs"
    first = run_training(_small_config(cifar10_dir, storage, "resume-me", epochs=1))

    # Ray Train reported one epoch over all 256 / 128 images (2 workers x 2 batches of 32 x 2 draws)
    assert first.metrics["epoch"] == 0
    assert first.metrics["train_images"] == TRAIN_IMAGES and first.metrics["test_images"] == TEST_IMAGES
    for key in ("l_per", "l_adre", "loss", "images_per_s", "images_per_s_total", "epoch_time_s"):
        assert math.isfinite(first.metrics[key]) and first.metrics[key] > 0, key
    # loss = l_per - lam * l_adre (eq. 8), per image, averaged the same way on every worker
    assert first.metrics["loss"] == pytest.approx(first.metrics["l_per"] - 0.1 * first.metrics["l_adre"],
                                                  rel=1e-6)

    # MLflow: flat config params, per-epoch metrics logged live by rank 0, final metrics, the model artifact
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.lam"] == "0.1" and run.data.params["model"] == "small_cnn"
    assert run.data.params["scaling.num_workers"] == "2"
    for key in ("l_per", "l_adre", "test_acc_noise", "test_acc_clean", "lr", "final_test_acc_noise"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(first.mlflow_run_id, "l_adre")] == [0]
    artifacts = client.list_artifacts(first.mlflow_run_id, "checkpoint")
    assert [a.path for a in artifacts] == ["checkpoint/model.pt"]

    # the checkpoint (Ray's and MLflow's copy) rebuilds the trained model: on the test subset its clean
    # accuracy is exactly what the workers measured (eval mode, float32, rank 0's BN statistics)
    assert first.checkpoint_path.endswith(f"{CHECKPOINT_PREFIX}000000")
    model, meta = load_model_checkpoint(first.checkpoint_path, expected_model="small_cnn",
                                        expected_num_classes=10)
    assert meta["extra"]["mlflow_run_id"] == first.mlflow_run_id and meta["extra"]["epoch"] == 0
    assert meta["extra"]["config"]["loss"]["sigma"] == 0.25
    assert _clean_accuracy(model, cifar10_dir) == pytest.approx(first.metrics["test_acc_clean"], abs=1e-12)
    artifact = client.download_artifacts(first.mlflow_run_id, "checkpoint/model.pt", str(tmp_path))
    from_mlflow, _ = load_model_checkpoint(artifact)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), from_mlflow(x))
    state = torch.load(f"{first.checkpoint_path}/{TRAIN_STATE_FILENAME}", weights_only=True)
    assert state["epoch"] == 0 and state["scheduler"]["last_epoch"] == 4  # 256 / 64 = 4 steps

    # resume: same name and storage, one more epoch -> only epoch 1 runs, into the same MLflow run
    second = run_training(_small_config(cifar10_dir, storage, "resume-me", epochs=2))
    assert second.metrics["epoch"] == 1
    assert second.mlflow_run_id == first.mlflow_run_id
    resumed_run = client.get_run(first.mlflow_run_id)
    assert resumed_run.data.params["schedule.epochs"] == "1"  # params are immutable; the change is a tag
    assert resumed_run.data.tags["changed_param.schedule.epochs"] == "2"
    assert second.checkpoint_path.endswith(f"{CHECKPOINT_PREFIX}000001")
    history = client.get_metric_history(first.mlflow_run_id, "l_per")
    assert sorted(m.step for m in history) == [0, 1]  # epoch 0 was not trained (nor logged) again
    resumed_state = torch.load(f"{second.checkpoint_path}/{TRAIN_STATE_FILENAME}", weights_only=True)
    assert resumed_state["scheduler"]["last_epoch"] == 8  # 4 steps restored + 4 new ones


def test_bad_config_exits_2_naming_the_field(capsys):
    assert main(["--set", "loss.sigma=-1.0"]) == 2
    assert "loss.sigma=-1.0" in capsys.readouterr().err
    assert main(["--config", "/nonexistent.yaml"]) == 2
    assert "config='/nonexistent.yaml'" in capsys.readouterr().err


def test_missing_data_exits_2_before_starting_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(train_mod, "connect_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    assert main(["--set", f"data.data_dir={tmp_path / 'nothing'}", "--set", "model=small_cnn"]) == 2
    assert "data_dir" in capsys.readouterr().err


def test_loop_config_overrides_for_tune():
    cfg = TrainConfig()
    loop_config = {"train_config": cfg.to_dict(), "mlflow_run_id": "abc", "loss.lam": 0.5, "optim.lr": 0.2}
    changed = config_from_loop_config(loop_config)
    assert changed.loss.lam == 0.5 and changed.optim.lr == 0.2 and changed.loss.k == cfg.loss.k
    with pytest.raises(ValueError, match=r"^loss\.lam=-1"):
        config_from_loop_config({**loop_config, "loss.lam": -1})
    with pytest.raises(ValueError, match="train_config"):
        config_from_loop_config({"loss.lam": 0.5})


def test_rng_seeds_are_distinct_per_seed_epoch_rank_stream():
    seeds = {rng_seed(s, e, r, t) for s in range(3) for e in range(-1, 20) for r in range(16) for t in (0, 1)}
    assert len(seeds) == 3 * 21 * 16 * 2 and min(seeds) >= 0


def test_latest_checkpoint_picks_most_recent_complete_folder(tmp_path):
    import os

    assert latest_checkpoint(str(tmp_path / "missing")) is None
    # V2 names folders by epoch; V1 numbers them per attempt, so write time decides, not the name
    layout = (("run/checkpoint_epoch_000000", True, 100), ("run/attempt1/checkpoint_000001", True, 300),
              ("run/attempt2/checkpoint_000000", True, 200), ("run/checkpoint_epoch_000009", False, 400),
              ("run/other_000005", True, 500))
    for folder, complete, mtime in layout:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "model.pt").write_bytes(b"x")
        if complete:
            state = tmp_path / folder / TRAIN_STATE_FILENAME
            state.write_bytes(b"x")
            os.utime(state, (mtime, mtime))
    found = latest_checkpoint(str(tmp_path / "run"))
    assert found is not None and found.path == str(tmp_path / "run/attempt1/checkpoint_000001")
