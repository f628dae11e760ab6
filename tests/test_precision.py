"""``precision: auto | fp32 | bf16`` for both jobs (issue 24): config (the deprecated ``amp``), resolution,
the CPU bf16 / channels_last paths (tiny model, a few steps), rows and the manifest refusing a mix."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from adre_ray.analysis.results import ensure_manifest, read_results, write_part
from adre_ray.config import load_config
from adre_ray.config.certify import CertifyConfig
from adre_ray.config.train import TrainConfig
from adre_ray.models import build_model
from adre_ray.precision import autocast_dtype, precision_params, refuse_mixed_precision, resolve_precision
from adre_ray.smoothing import prepare_model, sample_counts
from adre_ray.training import build_loss, train_one_epoch

# ------------------------------------------------------------------------------------------------ config


def make(cls, values=None, overrides=()):
    """``load_config`` of ``cls``; a certification config gets a checkpoint name (it requires one)."""
    base = {"checkpoint": "m.pt"} if cls is CertifyConfig else {}
    return load_config(cls, overrides=list(overrides), values={**base, **(values or {})})


@pytest.mark.parametrize("cls, key", [(TrainConfig, "run.precision"), (CertifyConfig, "precision")])
def test_precision_choices(cls, key):
    for value in ("auto", "fp32", "bf16"):
        cfg = make(cls, {key: value})
        section = cfg.run if cls is TrainConfig else cfg
        assert section.precision_setting == value
    with pytest.raises(ValueError, match=rf"{key}='fp16'"):
        make(cls, {key: "fp16"})


@pytest.mark.parametrize("cls, prefix", [(TrainConfig, "run."), (CertifyConfig, "")])
@pytest.mark.parametrize("amp, meant", [(True, "auto"), (False, "fp32")])
def test_deprecated_amp_is_read_with_a_message(cls, prefix, amp, meant):
    message = rf"{prefix}amp={amp} is deprecated: read as {prefix}precision='{meant}'"
    with pytest.warns(FutureWarning, match=message):
        cfg = make(cls, overrides=[f"{prefix}amp={str(amp).lower()}"])
    section = cfg.run if cls is TrainConfig else cfg
    assert section.precision_setting == meant


@pytest.mark.parametrize("cls, prefix", [(TrainConfig, "run."), (CertifyConfig, "")])
def test_amp_and_precision_both_given_are_refused_naming_both(cls, prefix):
    with pytest.raises(ValueError, match=rf"{prefix}amp=False and {prefix}precision='bf16': both given"):
        make(cls, overrides=[f"{prefix}amp=false", f"{prefix}precision=bf16"])


def test_resolved_precision_is_never_auto():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp32") is None
    with pytest.raises(ValueError, match="precision='auto'"):
        autocast_dtype("auto")
    params = precision_params({"run.amp": True, "run.precision": "auto", "seed": 0}, "bf16", "run.")
    assert params == {"run.precision": "bf16", "seed": 0}


def test_certify_job_resolves_precision_for_its_actors():
    from adre_ray.distributed.certify import manifest_settings, resolve_certify_precision, result_row

    cpu = make(CertifyConfig, {"use_gpu": "false"})
    assert resolve_certify_precision(cpu).precision == "fp32"
    gpu = make(CertifyConfig, {"use_gpu": "true"})
    assert resolve_certify_precision(gpu).precision == "bf16"
    with pytest.warns(FutureWarning):
        old = make(CertifyConfig, overrides=["amp=false", "use_gpu=true"])
    resolved = resolve_certify_precision(old)
    assert (resolved.precision, resolved.amp) == ("fp32", None)
    with warnings.catch_warnings():  # a CPU without native bf16 is told it is emulated
        warnings.simplefilter("ignore", UserWarning)
        bf16 = resolve_certify_precision(make(CertifyConfig, {"use_gpu": "false", "precision": "bf16",
                                                               "sigma": "0.25"}))
    assert manifest_settings(bf16)["precision"] == "bf16"
    row = result_row(0, 1, [0, 10], [0, 100], sigma=0.25, alpha=0.001, mode="pilot", grid=(1.0,), seed=0,
                     time_s=0.1, checkpoint="m.pt", train_run_id=None, precision=bf16.precision)
    assert row["precision"] == "bf16"


def test_cpu_actor_batch_default_is_cache_sized():
    from adre_ray.distributed.certify import CPU_BATCH_SIZE, GPU_BATCH_SIZE, actor_batch_size

    assert make(CertifyConfig).batch_size is None
    assert actor_batch_size(None, use_gpu=False) == CPU_BATCH_SIZE < GPU_BATCH_SIZE
    assert actor_batch_size(None, use_gpu=True) == GPU_BATCH_SIZE
    assert actor_batch_size(500, use_gpu=False) == 500


# ------------------------------------------------------------------------------------- rows and manifest


SETTINGS = {"checkpoint": "/ckpt/model.pt", "dataset": "cifar10", "split": "test", "sigma": 0.25, "n0": 100,
            "n": 1000, "alpha": 0.001, "seed": 0, "mode": "pilot", "grid": [1.0], "shard_size": 1000}


def test_manifest_refuses_a_precision_mix_on_resume(tmp_path):
    assert ensure_manifest(tmp_path, {**SETTINGS, "precision": "fp32"}) is False
    assert ensure_manifest(tmp_path, {**SETTINGS, "precision": "fp32"}) is True  # same precision: resume
    with pytest.raises(ValueError, match=r"precision='bf16' differs from the run already there "
                                         r"\(precision='fp32'\)"):
        ensure_manifest(tmp_path, {**SETTINGS, "precision": "bf16"})


def test_readers_accept_rows_without_precision(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"idx": [0, 20], "label": [1, 2], "radius_certify": [0.1, 0.0],
                             "certify_predict": [1, -1]}), tmp_path / "part-000000000-old.parquet")
    table = read_results(tmp_path)
    assert table.column("precision").to_pylist() == [None, None]
    write_part(tmp_path / "new", [{**table.to_pylist()[0], "precision": "bf16"}])
    assert read_results(tmp_path / "new").column("precision").to_pylist() == ["bf16"]


def test_training_resume_refuses_another_precision():
    from adre_ray.distributed.train import stored_train_precision, train_precision

    cpu_bf16 = load_config(TrainConfig, values={"run.precision": "bf16"})
    assert train_precision(cpu_bf16) == "bf16"
    assert train_precision(load_config(TrainConfig)) == "fp32"  # auto on CPU workers
    old_gpu = {"config": {"run": {"amp": True}, "scaling": {"use_gpu": True}}}  # before precision existed
    assert stored_train_precision(old_gpu) == "bf16"
    assert stored_train_precision({"precision": "fp32"}) == "fp32" and stored_train_precision({}) is None
    with pytest.raises(ValueError, match=r"precision='bf16' differs from the run being resumed \(checkpoint"):
        refuse_mixed_precision(stored_train_precision({"precision": "fp32"}), train_precision(cpu_bf16),
                               "checkpoint x")
    refuse_mixed_precision(None, "bf16", "an imported checkpoint")  # unknown: nothing to compare


# --------------------------------------------------------------------------------- CPU bf16 / layout paths


def _batches(count: int, size: int, channels_last: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(torch.rand(size, 3, 32, 32, generator=generator).contiguous(memory_format=fmt),
             torch.randint(10, (size,), generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("loss_name", ["gaussian", "adre_reg"])
def test_cpu_bf16_channels_last_training_steps(loss_name):
    """A few bf16 autocast steps on CPU with channels_last weights and inputs: the weights stay fp32 and
    NHWC, the loss and the ADRE terms are fp32, and the steps move the weights."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, "cifar10").to(memory_format=torch.channels_last)
    before = copy.deepcopy(model.state_dict())
    loss_fn = build_loss(loss_name, sigma=0.25, k=2, lam=0.1, per_loss="single")
    seen = {}

    def recording(net, x, y, epoch):
        out = loss_fn(net, x, y, epoch)
        seen["dtypes"] = (out.loss.dtype, torch.as_tensor(out.l_per).dtype, torch.as_tensor(out.l_adre).dtype)
        return out

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stats = train_one_epoch(model, _batches(3, 8, channels_last=True), recording, optimizer, None,
                            device="cpu", epoch=0, amp_dtype=autocast_dtype("bf16"))
    assert stats["batches"] == 3 and torch.isfinite(torch.tensor(stats["loss"]))
    assert seen["dtypes"] == (torch.float32, torch.float32, torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _spread_model() -> torch.nn.Module:
    """small_cnn with a scaled-up last layer: its noisy predictions spread over several classes, so a
    changed count would show."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, "cifar10").eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(300)
    return model


def test_cpu_channels_last_certification_counts_equal_fp32_eager():
    model = _spread_model()
    fast = prepare_model(copy.deepcopy(model), channels_last=True)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    for sigma, idx in ((0.5, 3), (1.0, 7)):
        eager = sample_counts(model, image, 1024, 10, sigma, batch_size=128, idx=idx)
        nhwc = sample_counts(fast, image, 1024, 10, sigma, batch_size=128, idx=idx, channels_last=True)
        assert (eager > 0).sum() >= 2, "the test needs predictions spread over classes"
        assert nhwc.tolist() == eager.tolist()


def test_cpu_bf16_certification_is_deterministic_and_recorded(tmp_path):
    """bf16 on CPU actors: a different but deterministic base classifier (same counts on a repeat)."""
    from adre_ray.distributed.worker import CertifyWorker
    from adre_ray.models.checkpoint import save_model_checkpoint
    from adre_ray.smoothing import MAIN_STREAM

    path = save_model_checkpoint(tmp_path / "model.pt", _spread_model(), model_name="small_cnn",
                                 num_classes=10, dataset="cifar10")
    worker = CertifyWorker(str(path), num_classes=10, sigma=0.5, seed=0, batch_size=64, precision="bf16",
                           channels_last=True)
    assert worker.amp_dtype is torch.bfloat16 and worker.channels_last
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    first = worker.count(image, idx=3, stream=MAIN_STREAM, shard=0, num=256)
    again = worker.count(image, idx=3, stream=MAIN_STREAM, shard=0, num=256)
    assert first.sum() == 256 and first.tolist() == again.tolist()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_reported(monkeypatch, native):
    import adre_ray.precision as precision

    monkeypatch.setattr(precision, "bf16_capability", lambda device="cpu": {"native_bf16": native})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision.warn_if_emulated("bf16", "cpu", "CPU workers")
        precision.warn_if_emulated("fp32", "cpu", "CPU workers")
        precision.warn_if_emulated("bf16", "cuda", "GPU workers")
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert messages == ([] if native else ["precision='bf16' on CPU workers: this CPU has no native bf16 "
                                           "(AVX512-BF16 / AMX), so bf16 is emulated and usually slower than "
                                           "fp32 here"])
    assert set(precision.bf16_capability("cpu")) >= {"native_bf16"}
