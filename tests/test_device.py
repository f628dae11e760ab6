"""GPU correctness guarded on CPU: the CUDA preflight, the numeric flags a worker sets, the device facts a
result folder records and its refusal to mix devices (adre_ray.device, adre_ray.analysis.devices)."""

from __future__ import annotations

import json

import pytest
import torch

from adre_ray import device as device_module
from adre_ray.analysis.devices import record_devices
from adre_ray.analysis.results import MANIFEST_NAME, read_manifest
from adre_ray.device import cuda_problem, device_facts, require_cuda, set_numerics
from adre_ray.distributed.worker import CertifyWorker

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without usable CUDA")


@pytest.fixture()
def numeric_flags():
    """Restore the process-wide flags that set_numerics changes."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled())
    yield
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32, deterministic = saved
    torch.use_deterministic_algorithms(deterministic)


def test_preflight_names_the_driver_torch_cuda_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(device_module, "nvidia_driver_version", lambda: "535.104.05")
    problem = cuda_problem()
    assert "CUDA 13.0" in problem and "driver >= 580" in problem and "535.104.05" in problem
    assert "cu126" in problem
    monkeypatch.setattr(device_module, "nvidia_driver_version", lambda: None)
    assert "no NVIDIA driver" in cuda_problem()
    with pytest.raises(RuntimeError, match=r"adre-ray train: GPUs were asked for .*CUDA 13.0"):
        require_cuda("adre-ray train")


def test_gpu_certification_worker_stops_before_touching_cuda(monkeypatch, tmp_path):
    """The worker fails with the preflight's reason (not a file error, not a crash in .to('cuda'))."""
    monkeypatch.setattr(device_module, "nvidia_driver_version", lambda: "470.1")
    with pytest.raises(RuntimeError, match=r"adre-ray certify: GPUs were asked for.*470\.1"):
        CertifyWorker(str(tmp_path / "missing.pt"), num_classes=10, sigma=0.25, seed=0, batch_size=8,
                      device="cuda")


def test_numeric_flags_after_worker_setup(numeric_flags):
    torch.backends.cudnn.benchmark = False
    set_numerics("cpu")
    assert torch.backends.cudnn.benchmark is False  # a CPU worker leaves cuDNN alone
    set_numerics("cuda")
    assert torch.backends.cudnn.benchmark is True and not torch.are_deterministic_algorithms_enabled()
    set_numerics("cuda", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_cpu_worker_reports_its_device_facts(numeric_flags, tmp_path):
    from adre_ray.models import build_model, save_model_checkpoint

    path = save_model_checkpoint(tmp_path / "model.pt", build_model("small_cnn", 10, "cifar10").eval(),
                                 model_name="small_cnn", num_classes=10, dataset="cifar10")
    worker = CertifyWorker(str(path), num_classes=10, sigma=0.25, seed=0, batch_size=8, deterministic=True)
    facts = worker.device_facts()
    assert facts == {"type": "cpu", "model": facts["model"], "autocast": "float32", "tf32_matmul": False,
                     "tf32_cudnn": False, "deterministic": True, "cudnn_benchmark": False, "noise": "torch",
                     "noise_scheme": 2}
    assert facts == device_facts("cpu", autocast_dtype=None, noise="torch", noise_scheme=2)


def _folder(tmp_path, devices=None):
    manifest = {"checkpoint": "m.pt", **({"devices": devices} if devices is not None else {})}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return tmp_path


H100 = {"type": "cuda", "model": "NVIDIA H100 80GB HBM3", "autocast": "bfloat16", "noise": "philox"}
A100 = {**H100, "model": "NVIDIA A100-SXM4-80GB"}


def test_devices_are_recorded_and_a_mix_is_refused(tmp_path):
    out = _folder(tmp_path)
    assert record_devices(out, [H100, H100], allow_mixed=False) == [H100]
    assert read_manifest(out)["devices"] == [H100] and read_manifest(out)["checkpoint"] == "m.pt"
    assert record_devices(out, [H100], allow_mixed=False) == [H100]  # a resume on the same device
    before = (out / MANIFEST_NAME).read_text()
    with pytest.raises(ValueError, match=r"model='NVIDIA A100-SXM4-80GB', not model='NVIDIA H100.*allow_mix"):
        record_devices(out, [A100], allow_mixed=False)
    assert (out / MANIFEST_NAME).read_text() == before  # nothing written on a refusal
    assert record_devices(out, [A100], allow_mixed=True) == [H100, A100]
    assert read_manifest(out)["devices"] == [H100, A100]


def test_actors_on_different_devices_are_refused(tmp_path):
    out = _folder(tmp_path)
    deterministic = {**H100, "deterministic": True}
    with pytest.raises(ValueError, match="different devices.*deterministic=True"):
        record_devices(out, [H100, deterministic], allow_mixed=False)
    assert "devices" not in read_manifest(out)
    assert record_devices(out, [H100, deterministic], allow_mixed=True) == [H100, deterministic]


def test_a_folder_from_before_device_facts_accepts_any_device(tmp_path):
    assert record_devices(_folder(tmp_path), [A100], allow_mixed=False) == [A100]


def test_gpu_actors_resume_a_cpu_folder_only_when_mixing_is_allowed(tmp_path):
    """GPU actors draw Philox noise (scheme 3), CPU actors torch's (scheme 2): run.json's noise_scheme
    refuses the switch, unless allow_mixed_devices keeps the folder's scheme (rows record their own)."""
    from adre_ray.analysis.results import ensure_manifest
    from adre_ray.config.certify import CertifyConfig
    from adre_ray.distributed.certify import manifest_settings, mixed_device_settings

    cfg = CertifyConfig(checkpoint="m.pt", data_dir="data", sigma=0.25)
    ensure_manifest(tmp_path, manifest_settings(cfg, use_gpu=False))
    on_gpu = manifest_settings(cfg, use_gpu=True)
    assert on_gpu["noise_scheme"] == 3 and read_manifest(tmp_path)["noise_scheme"] == 2
    with pytest.raises(ValueError, match=r"noise_scheme=3 differs .*noise_scheme=2"):
        ensure_manifest(tmp_path, mixed_device_settings(tmp_path, on_gpu, allow_mixed=False))
    assert ensure_manifest(tmp_path, mixed_device_settings(tmp_path, on_gpu, allow_mixed=True)) is True
