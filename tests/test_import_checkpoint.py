"""Importing checkpoints of the original randomized-smoothing code and plain torchvision state dicts.

The fixtures are built here from the published layout (no download): the original code's
``Sequential(NormalizeLayer, net)`` whose NormalizeLayer keeps mean / std as plain attributes (or, in
derived codes, as ``means`` / ``sds`` buffers) and whose CIFAR ResNet is written below independently of
adre_ray's (same module names, ``AvgPool2d(8)`` head, downsample applied after the residual branch).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet50 as tv_resnet50

from adre_ray.import_cli import main as import_main
from adre_ray.models import load_model_checkpoint
from adre_ray.models.checkpoint import FORMAT, FORMAT_V1, save_model_checkpoint
from adre_ray.models.importers import SMOOTHING_NORMALIZATION, import_checkpoint
from adre_ray.models.registry import build_model

CIFAR_MEAN, CIFAR_STD = SMOOTHING_NORMALIZATION["cifar10"]


class OriginalNormalizeLayer(nn.Module):
    """The original code's layer: statistics as attributes (not in the state dict), or as buffers."""

    def __init__(self, means, sds, as_buffers: bool = False) -> None:
        super().__init__()
        if as_buffers:
            self.register_buffer("means", torch.tensor(means))
            self.register_buffer("sds", torch.tensor(sds))
        else:
            self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        means = self.means.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        sds = self.sds.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        return (x - means) / sds


class OriginalBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class OriginalCifarResNet(nn.Module):
    """The published CIFAR ResNet layout (depth 6n + 2, basic blocks, AvgPool2d(8), fc)."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [OriginalBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [OriginalBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.view(x.size(0), -1))


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong mapping shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            module.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
            module.bias.data.copy_(0.1 * torch.randn(c, generator=gen))
            module.num_batches_tracked.fill_(1234)


def original_cifar(arch: str = "cifar_resnet20", as_buffers: bool = False, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    depth = {"cifar_resnet20": 20, "cifar_resnet110": 110}[arch]
    model = nn.Sequential(OriginalNormalizeLayer(CIFAR_MEAN, CIFAR_STD, as_buffers),
                          OriginalCifarResNet(depth))
    randomize_bn(model, seed)
    return model.eval()


def save_original(path: Path, model: nn.Module, arch: str, legacy: bool = False) -> Path:
    """``torch.save`` exactly as the original train.py does (optionally in the pre-1.6 file format)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    record = {"epoch": 90, "arch": arch, "state_dict": model.state_dict(),
              "optimizer": optimizer.state_dict()}
    torch.save(record, path, _use_new_zipfile_serialization=not legacy)
    return path


def max_relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(((ours - theirs).abs().max() / theirs.abs().max()).item())


@pytest.mark.parametrize("legacy, as_buffers", [(False, False), (True, True)])
def test_cifar_import_gives_the_original_logits(tmp_path, legacy, as_buffers):
    theirs = original_cifar(as_buffers=as_buffers)
    if as_buffers:
        assert "0.means" in theirs.state_dict()
    else:
        assert all(k.startswith("1.") for k in theirs.state_dict())
    src = save_original(tmp_path / "checkpoint.pth.tar", theirs, "cifar_resnet20", legacy=legacy)
    dst = import_checkpoint(src, tmp_path / "imported.pt", source_format="smoothing", dataset="cifar10",
                            sigma=0.25)
    raw = torch.load(dst, weights_only=True)
    assert raw["format"] == FORMAT
    assert raw["normalization"]["std"] == pytest.approx(CIFAR_STD)
    model, meta = load_model_checkpoint(dst, expected_model="cifar_resnet20", expected_num_classes=10)
    assert meta["extra"]["sigma"] == 0.25 and meta["extra"]["epoch"] == 90
    assert meta["extra"]["source_format"] == "smoothing"
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, their_logits = model(x), theirs(x)
    assert max_relative_error(ours_logits, their_logits) <= 1e-5
    # with adre-ray's own CIFAR-10 statistics the logits would differ: the stored normalization matters
    wrong = build_model("cifar_resnet20", 10, "cifar10").eval()
    wrong[1].load_state_dict(model[1].state_dict())
    with torch.no_grad():
        assert max_relative_error(wrong(x), their_logits) > 1e-3


def test_imagenet_resnet50_inside_dataparallel(tmp_path):
    torch.manual_seed(0)
    mean, std = SMOOTHING_NORMALIZATION["imagenet"]
    theirs = nn.Sequential(OriginalNormalizeLayer(mean, std), nn.DataParallel(tv_resnet50(weights=None)))
    randomize_bn(theirs, 3)
    theirs.eval()
    assert next(iter(theirs.state_dict())).startswith("1.module.")
    src = save_original(tmp_path / "imagenet.pth.tar", theirs, "resnet50")
    dst = import_checkpoint(src, tmp_path / "out", source_format="smoothing", dataset="imagenet")
    model, meta = load_model_checkpoint(dst, expected_model="resnet50", expected_num_classes=1000)
    assert "sigma" not in meta["extra"]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_relative_error(model(x), theirs(x)) <= 1e-5

    # the same network as a plain torchvision state dict
    plain = tmp_path / "resnet50.pth"
    torch.save(theirs[1].module.state_dict(), plain)
    assert import_main([str(plain), "--format", "torchvision", "--dataset", "imagenet",
                        "--output", str(tmp_path / "tv.pt")]) == 0
    tv_model, _ = load_model_checkpoint(tmp_path / "tv.pt")
    with torch.no_grad():
        assert max_relative_error(tv_model(x), theirs(x)) <= 1e-5


def test_bad_key_wrong_shape_and_missing_key_are_refused(tmp_path, capsys):
    theirs = original_cifar()
    state = theirs.state_dict()

    def write(name: str, state_dict: dict, arch: str = "cifar_resnet20") -> Path:
        path = tmp_path / name
        torch.save({"epoch": 1, "arch": arch, "state_dict": state_dict, "optimizer": {}}, path)
        return path

    bad_key = write("bad_key.pth", {**state, "1.layer9.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"key 'layer9\.conv\.weight' does not exist"):
        import_checkpoint(bad_key, tmp_path / "a.pt", source_format="smoothing", dataset="cifar10")
    outside = write("outside.pth", {"2.extra": torch.zeros(1), **state})
    with pytest.raises(ValueError, match=r"key '2\.extra' is not a network key"):
        import_checkpoint(outside, tmp_path / "a.pt", source_format="smoothing", dataset="cifar10")
    wrong_shape = write("shape.pth", {**state, "1.fc.weight": torch.zeros(100, 64)})
    with pytest.raises(ValueError, match=r"key 'fc\.weight' has shape \(100, 64\), the model expects "
                                         r"\(10, 64\)"):
        import_checkpoint(wrong_shape, tmp_path / "a.pt", source_format="smoothing", dataset="cifar10")
    missing = write("missing.pth", {k: v for k, v in state.items() if k != "1.layer2.0.conv1.weight"})
    with pytest.raises(ValueError, match=r"key 'layer2\.0\.conv1\.weight' of the model is missing"):
        import_checkpoint(missing, tmp_path / "a.pt", source_format="smoothing", dataset="cifar10")
    other_arch = write("arch.pth", state, arch="cifar_resnet110")  # a ResNet-20's weights under another arch
    with pytest.raises(ValueError, match=r"key 'layer1\.3\.conv1\.weight' of the model is missing"):
        import_checkpoint(other_arch, tmp_path / "a.pt", source_format="smoothing", dataset="cifar10")
    unknown_arch = write("vgg.pth", state, arch="vgg16")
    assert import_main([str(unknown_arch), "--format", "smoothing", "--dataset", "cifar10",
                        "--output", str(tmp_path / "a.pt")]) == 2
    assert "arch='vgg16' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()


class _RunsCode:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_code_is_refused_and_never_runs(tmp_path, legacy, capsys):
    marker = tmp_path / "code_ran"
    src = tmp_path / "evil.pth"
    record = {"arch": "cifar_resnet20", "state_dict": original_cifar().state_dict(),
              "hook": _RunsCode(marker)}
    if legacy:
        with open(src, "wb") as handle:
            pickle.dump(record, handle, protocol=2)
    else:
        torch.save(record, src)
    code = import_main([str(src), "--format", "smoothing", "--dataset", "cifar10",
                        "--output", str(tmp_path / "out.pt")])
    assert code == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_existing_output_is_not_overwritten(tmp_path):
    src = save_original(tmp_path / "c.pth", original_cifar(), "cifar_resnet20")
    (tmp_path / "taken.pt").write_bytes(b"keep me")
    with pytest.raises(ValueError, match=r"taken\.pt'.*already exists"):
        import_checkpoint(src, tmp_path / "taken.pt", source_format="smoothing", dataset="cifar10")
    assert (tmp_path / "taken.pt").read_bytes() == b"keep me"


def test_format_1_checkpoints_load_with_the_dataset_statistics(tmp_path):
    model = build_model("small_cnn", 10, "cifar10").eval()
    path = save_model_checkpoint(tmp_path / "m.pt", model, model_name="small_cnn", num_classes=10,
                                 dataset="cifar10")
    record = torch.load(path, weights_only=True)
    del record["normalization"]
    record["format"] = FORMAT_V1
    torch.save(record, tmp_path / "v1.pt")
    loaded, meta = load_model_checkpoint(tmp_path / "v1.pt")
    assert meta["format"] == FORMAT_V1
    assert meta["normalization"]["std"] == pytest.approx([0.2470, 0.2435, 0.2616])
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
