"""Model registry, NormalizeLayer and weights-only checkpoints (pure PyTorch, CPU)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adre_ray.data import dataset_info
from adre_ray.models import (
    FORMAT,
    MODEL_NAMES,
    NormalizedModel,
    NormalizeLayer,
    build_model,
    load_model_checkpoint,
    register_model,
    save_model_checkpoint,
    strip_wrapper_prefixes,
    unwrap_model,
)
from adre_ray.models import registry as registry_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tests run tiny batches, and the CI box's 2 cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def cifar_resnet_param_count(depth: int, num_classes: int) -> int:
    """Parameters of He et al.'s CIFAR ResNet counted from its description, independently of the code:
    conv3x3(3->16) + BN; per stage (16, 32, 64) n basic blocks of two bias-free 3x3 convs + 2 BN (2 params
    per channel), the first block of stages 2 and 3 with a 1x1 conv + BN shortcut; fc 64 -> classes."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16
    in_ch = 16
    for out_ch in (16, 32, 64):
        for block in range(n):
            cin = in_ch if block == 0 else out_ch
            total += cin * out_ch * 9 + out_ch * out_ch * 9 + 2 * 2 * out_ch
            if block == 0 and cin != out_ch:
                total += cin * out_ch + 2 * out_ch
        in_ch = out_ch
    return total + 64 * num_classes + num_classes


def test_model_names_are_the_contract():
    assert set(MODEL_NAMES) == {"cifar_resnet20", "cifar_resnet110", "resnet50", "small_cnn"}
    assert isinstance(MODEL_NAMES, tuple)


@pytest.mark.parametrize(("name", "dataset", "size", "batch"), [
    ("cifar_resnet20", "cifar10", 32, 4),
    ("cifar_resnet110", "cifar10", 32, 2),
    ("small_cnn", "cifar10", 32, 4),
    ("small_cnn", "imagenet", 48, 2),   # adaptive pooling: any input size
    ("resnet50", "imagenet", 64, 2),    # 64 x 64 keeps the CPU forward quick
])
def test_every_model_builds_and_gives_logits(name, dataset, size, batch):
    num_classes = dataset_info(dataset).num_classes
    model = build_model(name, num_classes, dataset).eval()
    assert isinstance(model, NormalizedModel) and isinstance(model, nn.Sequential)
    assert isinstance(model[0], NormalizeLayer) and model.net is model[1]
    info = dataset_info(dataset)
    assert torch.allclose(model[0].mean.flatten(), torch.tensor(info.mean))
    assert torch.allclose(model[0].std.flatten(), torch.tensor(info.std))
    with torch.no_grad():
        logits = model(torch.rand(batch, 3, size, size))
    assert logits.shape == (batch, num_classes)
    assert torch.isfinite(logits).all()


def test_cifar_resnet_parameter_counts():
    for name, depth in (("cifar_resnet20", 20), ("cifar_resnet110", 110)):
        model = build_model(name, 10, "cifar10")
        assert sum(p.numel() for p in model.parameters()) == cifar_resnet_param_count(depth, 10)
    resnet110 = sum(p.numel() for p in build_model("cifar_resnet110", 10, "cifar10").parameters())
    assert 1.6e6 < resnet110 < 1.8e6  # "1.7M" in the papers


def test_resnet50_is_torchvisions_and_random():
    model = build_model("resnet50", 1000, "imagenet")
    assert type(model.net).__module__.startswith("torchvision.models")
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's documented count


def test_unknown_model_and_bad_arguments():
    with pytest.raises(ValueError, match=r"model='resnet18'.*known: .*cifar_resnet110.*small_cnn"):
        build_model("resnet18", 10, "cifar10")
    with pytest.raises(ValueError, match=r"dataset='mnist'"):
        build_model("small_cnn", 10, "mnist")
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=r"num_classes="):
            build_model("small_cnn", bad, "cifar10")


def test_register_model(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_model("tiny_linear")
    def tiny_linear(num_classes: int, dataset: str) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    model = build_model("tiny_linear", 3, "cifar10")
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_linear")(lambda num_classes, dataset: nn.Identity())


def test_normalize_layer_math():
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    layer = NormalizeLayer(mean, std)
    x = torch.rand(3, 3, 5, 4)
    y = layer(x)
    for c in range(3):
        torch.testing.assert_close(y[:, c], (x[:, c] - mean[c]) / std[c])
    # x = mean -> 0 and x = mean + std -> 1 in every channel
    m = torch.tensor(mean).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    s = torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(m), torch.zeros(1, 3, 2, 2))
    torch.testing.assert_close(layer(m + s), torch.ones(1, 3, 2, 2))
    assert layer.state_dict() == {}  # statistics come from the dataset, not the checkpoint
    assert layer.double().mean.dtype == torch.float64  # buffers follow .to()
    with pytest.raises(ValueError, match=r"input shape \(2, 1, 4, 4\)"):
        layer(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="std="):
        NormalizeLayer((0.5,), (0.0,))


def _trained_small_cnn(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes, "cifar10")
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))  # moves the BN running statistics off their defaults
    return model.eval()


def _only_primitives(obj) -> bool:
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return type(obj) in (type(None), bool, int, float, str) or isinstance(obj, torch.Tensor)
    if isinstance(obj, dict):
        return all(isinstance(k, str | int) and _only_primitives(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return all(_only_primitives(v) for v in obj)
    return False


def test_checkpoint_round_trip(tmp_path):
    model = _trained_small_cnn()
    extra = {"epoch": 3, "sigma": np.float64(0.25), "config": {"lr": 0.1, "grid": (0.5, 1.0)},
             "run": tmp_path / "run", "acc": torch.tensor(0.5)}
    path = save_model_checkpoint(tmp_path / "ckpt" / "m.pt", model, model_name="small_cnn", num_classes=10,
                                 dataset="cifar10", extra=extra)
    assert path == tmp_path / "ckpt" / "m.pt"
    assert os.listdir(path.parent) == ["m.pt"]  # the temporary file was renamed, not left behind

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["model_name"] == "small_cnn" and raw["num_classes"] == 10
    assert _only_primitives(raw)
    assert all(key.startswith("1.") for key in raw["state_dict"])

    loaded, meta = load_model_checkpoint(path, expected_model="small_cnn", expected_num_classes=10)
    assert not loaded.training
    assert meta["dataset"] == "cifar10" and meta["path"] == str(path)
    assert meta["extra"]["epoch"] == 3 and type(meta["extra"]["sigma"]) is float
    assert meta["extra"]["config"] == {"lr": 0.1, "grid": (0.5, 1.0)}
    assert meta["extra"]["run"] == str(tmp_path / "run")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_directory_is_ray_train_style(tmp_path):
    model = _trained_small_cnn()
    ckpt_dir = tmp_path / "checkpoint_000001"
    ckpt_dir.mkdir()
    path = save_model_checkpoint(ckpt_dir, model, model_name="small_cnn", num_classes=10, dataset="cifar10")
    assert path == ckpt_dir / "model.pt"
    loaded, meta = load_model_checkpoint(ckpt_dir)
    assert meta["path"] == str(ckpt_dir / "model.pt")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty_dir'.*no model\.pt"):
        load_model_checkpoint(empty)


def test_checkpoint_strips_ddp_and_compile_prefixes(tmp_path):
    model = _trained_small_cnn()
    # A real DistributedDataParallel wrapper (gloo, world size 1) inside torch.compile's wrapper.
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.compile(nn.parallel.DistributedDataParallel(model))
        assert any(k.startswith("_orig_mod.module.") for k in wrapped.state_dict())
        assert unwrap_model(wrapped) is model
        path = save_model_checkpoint(tmp_path / "m.pt", wrapped, model_name="small_cnn", num_classes=10,
                                     dataset="cifar10")
    finally:
        dist.destroy_process_group()
    keys = torch.load(path, weights_only=True)["state_dict"].keys()
    assert set(keys) == set(model.state_dict())
    loaded, _ = load_model_checkpoint(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    # a file written by other code with "module." keys still loads
    record = torch.load(path, weights_only=True)
    record["state_dict"] = {f"module.{k}": v for k, v in record["state_dict"].items()}
    torch.save(record, tmp_path / "prefixed.pt")
    loaded, _ = load_model_checkpoint(tmp_path / "prefixed.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert strip_wrapper_prefixes({"module._orig_mod.a": 1, "b.module.c": 2}) == {"a": 1, "b.module.c": 2}


def test_checkpoint_expected_architecture_and_classes(tmp_path):
    path = save_model_checkpoint(tmp_path / "m.pt", _trained_small_cnn(), model_name="small_cnn",
                                 num_classes=10, dataset="cifar10")
    with pytest.raises(ValueError, match=r"model_name='small_cnn', expected_model='cifar_resnet110'"):
        load_model_checkpoint(path, expected_model="cifar_resnet110")
    with pytest.raises(ValueError, match=r"num_classes=10, expected_num_classes=1000"):
        load_model_checkpoint(path, expected_num_classes=1000)


def test_checkpoint_mismatched_weights(tmp_path):
    model = _trained_small_cnn()
    # saving weights under the wrong identity is refused up front ...
    with pytest.raises(ValueError, match=r"num_classes=5.*1\.11\.weight: \(10, 128\) vs \(5, 128\)"):
        save_model_checkpoint(tmp_path / "m.pt", model, model_name="small_cnn", num_classes=5,
                              dataset="cifar10")
    with pytest.raises(ValueError, match=r"model_name='cifar_resnet20'.*missing keys"):
        save_model_checkpoint(tmp_path / "m.pt", model, model_name="cifar_resnet20", num_classes=10,
                              dataset="cifar10")
    assert not (tmp_path / "m.pt").exists()
    # ... and a tampered file is refused on load, naming the file and the offending tensor
    good = save_model_checkpoint(tmp_path / "good.pt", model, model_name="small_cnn", num_classes=10,
                                 dataset="cifar10")
    record = torch.load(good, weights_only=True)
    record["num_classes"] = 5
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt'.*shape mismatches.*1\.11\.weight"):
        load_model_checkpoint(tmp_path / "bad.pt")
    record = torch.load(good, weights_only=True)
    record["model_name"] = "vit_huge"
    torch.save(record, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match=r"unknown\.pt'.*model='vit_huge': unknown model"):
        load_model_checkpoint(tmp_path / "unknown.pt")


class _Payload:
    pass


def test_checkpoint_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint='.*nope\.pt': no such file"):
        load_model_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.pt'.*not a readable adre-ray model checkpoint"):
        load_model_checkpoint(tmp_path / "text.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt'"):
        load_model_checkpoint(tmp_path / "empty.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt'.*no 'format' field"):
        load_model_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": "other/9"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"format='other/9' is not supported"):
        load_model_checkpoint(tmp_path / "other.pt")
    # an arbitrary pickled object is never unpickled (weights_only=True)
    with open(tmp_path / "object.pt", "wb") as handle:
        pickle.dump({"format": FORMAT, "payload": _Payload()}, handle, protocol=2)
    with pytest.raises(ValueError, match=r"object\.pt'.*weights_only=True"):
        load_model_checkpoint(tmp_path / "object.pt")


def test_checkpoint_extra_must_be_primitive(tmp_path):
    with pytest.raises(ValueError, match=r"extra\['fn'\]"):
        save_model_checkpoint(tmp_path / "m.pt", _trained_small_cnn(), model_name="small_cnn", num_classes=10,
                              dataset="cifar10", extra={"fn": object()})
    with pytest.raises(ValueError, match=r"model='nope'"):
        save_model_checkpoint(tmp_path / "m.pt", _trained_small_cnn(), model_name="nope", num_classes=10,
                              dataset="cifar10")
