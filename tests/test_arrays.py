"""Arrays datasets (any sample shape, .npz or fixed_shape_tensor Parquet), ``import-checkpoint --model-fn``
and certification of both on Ray, with the class count read from the model."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from adre_ray.analysis.results import read_results
from adre_ray.config.certify import CertifyConfig
from adre_ray.data import build_dataset, load_images
from adre_ray.data.arrays import ArraysDataset, check_arrays, write_arrays_parquet
from adre_ray.distributed import certify as certify_job
from adre_ray.distributed.certify import run_certification
from adre_ray.models.checkpoint import load_model_checkpoint
from adre_ray.models.importers import import_checkpoint
from adre_ray.smoothing.affine_fold import fold_affine_prefix
from adre_ray.smoothing.cpu_speed import cpu_batch_size, cpu_kernels, tiny_convolutions
from adre_ray.smoothing.sampler import sample_counts

MODEL_CODE = textwrap.dedent('''
    import torch
    from torch import nn


    class Normalize(nn.Module):
        def forward(self, x):
            return (x - 0.1307) / 0.2307


    class Net(nn.Module):
        def __init__(self, inputs=49, classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, kernel_size=2)
            self.lin1 = nn.Linear(144, 100)
            self.lin2 = nn.Linear(100, classes)

        def forward(self, x):
            return self.lin2(torch.relu(self.lin1(torch.relu(self.conv1(x)).flatten(1))))


    def small_mnist_net():
        return nn.Sequential(Normalize(), Net())


    def vector_net():
        torch.manual_seed(7)
        return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
''')


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A user's module ``my_models`` in a working directory of its own (the driver's cwd)."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "my_models.py").write_text(MODEL_CODE)
    monkeypatch.chdir(folder)
    yield folder
    sys.modules.pop("my_models", None)


def original_checkpoint(path: Path, legacy: bool = True, seed: int = 0) -> tuple[Path, dict]:
    """A checkpoint written as the original code writes it: ``{epoch, arch, state_dict, optimizer}`` of
    ``Sequential(normalize, net)`` (keys ``1.``), in the legacy non-zip format."""
    torch.manual_seed(seed)
    sys.path.insert(0, str(path.parent))
    import my_models

    model = my_models.small_mnist_net()
    record = {"epoch": 90, "arch": "small_mnist_net", "state_dict": model.state_dict(),
              "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}
    torch.save(record, path, _use_new_zipfile_serialization=not legacy)
    return path, record["state_dict"]


def image_arrays(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 7, 7), dtype=np.float32), rng.integers(0, 10, n).astype(np.uint8)


# ---------------------------------------------------------------------------------------- the arrays


def test_npz_and_parquet_give_the_same_samples_lazily(tmp_path):
    x, y = image_arrays(20)
    np.savez(tmp_path / "test.npz", x=x.astype(np.float64), y=y)  # float64 is cast, uint8 labels widened
    write_arrays_parquet(tmp_path / "set.parquet", x, y, row_group_size=6)
    from_npz = build_dataset("arrays", tmp_path / "test.npz", "test")
    from_parquet = build_dataset("arrays", tmp_path / "set.parquet", "test")
    assert len(from_npz) == len(from_parquet) == 20
    pixels, labels = load_images("arrays", tmp_path, "test", [0, 7, 19])  # the folder's test.npz
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 1, 7, 7)
    assert torch.equal(pixels, torch.from_numpy(x[[0, 7, 19]])) and labels.tolist() == y[[0, 7, 19]].tolist()
    assert isinstance(from_parquet, ArraysDataset) and from_parquet._cache == {}  # nothing read yet but y
    for i in (13, 2, 19):
        assert torch.equal(from_parquet[i][0], torch.from_numpy(x[i])) and from_parquet[i][1] == y[i]
    assert len(from_parquet._cache) == 3  # the row groups of rows 13, 2 and 19 only


def with_value(x: np.ndarray, row: int, value: float) -> np.ndarray:
    x = x.copy()
    x[row, 0, 2, 1] = value
    return x


@pytest.mark.parametrize(("change", "message"), [
    (lambda x, y: (x.astype(np.int32), y), r"array 'x' has dtype int32"),
    (lambda x, y: (x, y.astype(np.float32)), r"array 'y' has dtype float32"),
    (lambda x, y: (with_value(x, 5, np.nan), y), r"'x' row 5 holds NaN"),
    (lambda x, y: (with_value(x, 3, np.inf), y), r"'x' row 3 holds NaN or inf"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 4, -1, y.astype(np.int64))), r"'y' row 4 is -1"),
    (lambda x, y: (x[:-1], y), r"'x' has 11 rows but 'y' has 12"),
])
def test_bad_arrays_are_refused_naming_array_and_row(tmp_path, change, message):
    x, y = change(*image_arrays(12))
    np.savez(tmp_path / "bad.npz", x=x, y=y.astype(y.dtype))
    with pytest.raises(ValueError, match=message):
        build_dataset("arrays", tmp_path / "bad.npz", "test")


def test_labels_beyond_the_class_count_are_refused():
    x, y = image_arrays(12)
    y[9] = 10
    with pytest.raises(ValueError, match=r"'y' row 9 is 10, labels must be \[0, 10\)"):
        check_arrays(x, y, "arrays 'set'", num_classes=10)


def test_certify_refuses_bad_arrays_before_ray_starts(tmp_path, monkeypatch):
    x, y = image_arrays(12)
    x[6, 0, 3, 3] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    started = []
    monkeypatch.setattr(certify_job, "connect_ray", lambda *a, **k: started.append(1) or True)
    code = certify_job.main(["--model-fn", "tests.model_fns:seeded_small_cnn", "--sigma", "0.25",
                             "--dataset", "arrays", "--data-dir", str(tmp_path / "bad.npz"),
                             "--output-dir", str(tmp_path / "out"), "--tracking-uri", "none"])
    assert code == 2 and started == []
    assert not (tmp_path / "out").exists()


def test_sampler_takes_any_sample_shape():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 3)).eval()
    x = torch.rand(10)
    counts = sample_counts(model, x, 3000, 3, 0.5, batch_size=256, seed=1, idx=4)
    again = sample_counts(model, x, 3000, 3, 0.5, batch_size=1024, seed=1, idx=4)
    assert counts.sum() == 3000 and torch.equal(counts, again)  # batch size never changes the counts


# -------------------------------------------------------------------------------------------- import


def test_import_with_model_fn_loads_strictly_and_records_spec_sigma_source(user_module):
    src, state = original_checkpoint(user_module / "checkpoint.pth.tar", legacy=True)
    out = import_checkpoint(src, user_module / "imported.pt", source_format="smoothing", dataset=None,
                            model_fn="my_models:small_mnist_net", sigma=0.25)
    model, meta = load_model_checkpoint(out)
    assert meta["model_fn"] == "my_models:small_mnist_net" and meta["num_classes"] is None
    assert meta["extra"]["sigma"] == 0.25 and meta["extra"]["imported_from"] == str(src.resolve())
    assert meta["extra"]["epoch"] == 90 and meta["extra"]["arch"] == "small_mnist_net"
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda sd: sd.pop("1.lin1.bias"), r"key '1.lin1.bias' of the model is missing"),
    (lambda sd: sd.update({"1.extra.weight": torch.zeros(2)}), r"key '1.extra.weight' does not exist"),
    (lambda sd: sd.update({"1.lin2.weight": torch.zeros(9, 100)}),
     r"key '1.lin2.weight' has shape \(9, 100\)"),
])
def test_import_with_model_fn_refuses_keys_and_shapes_by_name(user_module, edit, message):
    src, state = original_checkpoint(user_module / "checkpoint.pth.tar", legacy=False)
    record = torch.load(src, weights_only=True)
    edit(record["state_dict"])
    torch.save(record, src)
    with pytest.raises(ValueError, match=message):
        import_checkpoint(src, user_module / "imported.pt", source_format="smoothing", dataset=None,
                          model_fn="my_models:small_mnist_net")
    assert not (user_module / "imported.pt").exists()


# ---------------------------------------------------------------------------------- certify on Ray


def certify_cfg(data: Path, out: Path, **changes) -> CertifyConfig:
    settings = dict(dataset="arrays", data_dir=str(data), split="test", n0=32, n=512, alpha=0.001, start=0,
                    skip=5, max_images=3, shard_size=200, batch_size=128, num_actors=2, seed=3,
                    output_dir=str(out), tracking_uri="none", progress=False)
    settings.update(changes)
    cfg = CertifyConfig(**settings)
    cfg.validate()
    return cfg


def expected_counts(model: torch.nn.Module, x: np.ndarray, cfg: CertifyConfig, num_classes: int) -> list[int]:
    """The main counts one process gets for sample ``x`` (shards of ``shard_size`` summed)."""
    total = torch.zeros(num_classes, dtype=torch.int64)
    sampled = fold_affine_prefix(model.eval(), x.shape) or model  # what a CPU actor samples with
    for shard, begin in enumerate(range(0, cfg.n, cfg.shard_size)):
        with cpu_kernels(tiny_convolutions(model)):  # the kernels the CPU actors choose for this model
            total += sample_counts(sampled, torch.from_numpy(x), min(cfg.shard_size, cfg.n - begin),
                                   num_classes,
                                   cfg.sigma, seed=cfg.seed, idx=cfg.start, shard=shard, stream=1)
    return total.tolist()


def test_imported_image_model_certifies_arrays_with_the_class_count_of_its_output(ray_cluster, user_module):
    x, y = image_arrays(12)
    np.savez(user_module / "small_test.npz", x=x, y=y)
    src, _ = original_checkpoint(user_module / "checkpoint.pth.tar")
    ckpt = import_checkpoint(src, user_module / "imported.pt", source_format="smoothing", dataset=None,
                             model_fn="my_models:small_mnist_net", sigma=0.25)
    cfg = certify_cfg(user_module / "small_test.npz", user_module / "out", checkpoint=str(ckpt))
    result = run_certification(cfg)  # sigma from the checkpoint, 10 classes from the model's output
    rows = read_results(result.output_dir).to_pylist()
    assert [r["idx"] for r in rows] == [0, 5, 10] and [r["label"] for r in rows] == y[[0, 5, 10]].tolist()
    model, _ = load_model_checkpoint(ckpt)
    assert rows[0]["sigma"] == 0.25 and len(rows[0]["counts"]) == 10
    assert rows[0]["counts"] == expected_counts(model, x[0], dataclasses.replace(cfg, sigma=0.25), 10)


def test_vector_arrays_certify_with_a_model_fn(ray_cluster, user_module):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 10)).astype(np.float32), rng.integers(0, 3, 9)
    write_arrays_parquet(user_module / "vectors.parquet", x, y, row_group_size=4)
    cfg = certify_cfg(user_module / "vectors.parquet", user_module / "out", model_fn="my_models:vector_net",
                      sigma=0.5, skip=4)
    rows = read_results(run_certification(cfg).output_dir).to_pylist()
    assert [r["idx"] for r in rows] == [0, 4, 8] and all(sum(r["counts"]) == 512 for r in rows)
    sys.path.insert(0, str(user_module))
    import my_models

    assert rows[0]["counts"] == expected_counts(my_models.vector_net().eval(), x[0], cfg, 3)


def test_labels_outside_the_models_classes_are_refused(ray_cluster, user_module):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 10)).astype(np.float32), np.array([0, 1, 2, 5, 1, 0])
    np.savez(user_module / "v.npz", x=x, y=y)
    cfg = certify_cfg(user_module / "v.npz", user_module / "out", model_fn="my_models:vector_net", sigma=0.5,
                      skip=1, max_images=None)
    with pytest.raises(ValueError, match=r"label 5 of row 3 is outside the model's 3 classes"):
        run_certification(cfg)


def test_cpu_speed_rules_depend_on_the_model_only():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import model_fns

    tiny = model_fns.small_mnist_net().eval()
    assert tiny_convolutions(tiny) and not tiny_convolutions(model_fns.seeded_small_cnn())
    assert not tiny_convolutions(model_fns.vector_net())  # no convolution: nothing to switch
    # ~32k FLOPs per 1x7x7 sample: 2**28 / 32k ~ 8192, within one noise block; never below the configured
    assert cpu_batch_size(tiny, (1, 7, 7), 1000) == 8192 and cpu_batch_size(tiny, (1, 7, 7), 20000) == 20000
    x = torch.rand(1, 7, 7)
    with cpu_kernels(True):
        small = sample_counts(tiny, x, 5000, 10, 0.25, batch_size=512, seed=2, idx=1)
        large = sample_counts(tiny, x, 5000, 10, 0.25, batch_size=8192, seed=2, idx=1)
    assert torch.equal(small, large) and torch.backends.mkldnn.is_available()
