"""The certification worker without Ray: it imports no Ray, returns sample_counts' counts, and its speed
options (compile; cuda_graphs ignored on CPU) run on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adre_ray.models import build_model
from adre_ray.models.checkpoint import load_model_checkpoint, save_model_checkpoint
from adre_ray.smoothing import MAIN_STREAM, sample_counts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, "cifar10")
    return str(save_model_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model,
                                     model_name="small_cnn", num_classes=10, dataset="cifar10"))


def test_worker_counts_equal_sample_counts(checkpoint):
    from adre_ray.distributed.worker import CertifyWorker

    worker = CertifyWorker(checkpoint, num_classes=10, sigma=0.5, seed=3, batch_size=48, cuda_graphs=True)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    counts = worker.count(image.numpy(), idx=4, stream=MAIN_STREAM, shard=1, num=100)
    model, _ = load_model_checkpoint(checkpoint, expected_num_classes=10)
    expected = sample_counts(model.eval(), image, 100, 10, 0.5, batch_size=1000, seed=3, idx=4, shard=1)
    assert isinstance(counts, np.ndarray) and counts.tolist() == expected.tolist()


def test_worker_compile_runs_on_cpu(checkpoint):
    """compile=True goes through torch.compile (frozen inductor graph on CPU): same function, so the
    counts may differ only where a draw lies within rounding of a decision boundary."""
    from adre_ray.distributed.worker import CertifyWorker

    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    eager = CertifyWorker(checkpoint, num_classes=10, sigma=0.25, seed=0, batch_size=32)
    fast = CertifyWorker(checkpoint, num_classes=10, sigma=0.25, seed=0, batch_size=32, compile=True)
    assert type(fast.model).__name__ == "OptimizedModule"
    a = eager.count(image, idx=0, stream=MAIN_STREAM, shard=0, num=32)
    b = fast.count(image, idx=0, stream=MAIN_STREAM, shard=0, num=32)
    assert int(b.sum()) == 32 and np.abs(a - b).sum() <= 2


def test_certify_config_speed_fields():
    from adre_ray.config.base import field_help
    from adre_ray.config.certify import CertifyConfig

    cfg = CertifyConfig(checkpoint="model.pt")
    cfg.validate()
    assert cfg.compile is False and cfg.cuda_graphs is False
    assert "torch.compile" in field_help(CertifyConfig, "compile")
    assert "CUDA graphs" in field_help(CertifyConfig, "cuda_graphs")
    for name in ("compile", "cuda_graphs"):
        with pytest.raises(ValueError, match=rf"{name}='yes'"):
            CertifyConfig(checkpoint="model.pt", **{name: "yes"}).validate()
