"""The performance benchmarks run end to end in a tiny configuration, and the sampler's speed options keep
the noise contract (the noisy inputs the model sees are fp32 and the same values whatever the options).

No timing is asserted anywhere: timings belong in benchmarks/RESULTS.md, not in tests.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from adre_ray.smoothing.sampler import fast_bf16_available, prepare_model, sample_counts

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    """Import a benchmark script as a module (the scripts import their sibling ``_common``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def ratios(text: str, label: str) -> list[float]:
    """The ratio (``1.23x``) at the end of every output line that starts with ``label``."""
    return [float(value) for value in re.findall(rf"^{label}.*?([0-9]+\.[0-9]+)x$", text, re.MULTILINE)]


def test_certify_throughput_prints_a_ratio(bench, capsys):
    module = bench("certify_throughput")
    argv = ["--model", "small_cnn", "--device", "cpu", "--n", "64", "--batch-size", "32", "--repeat", "1",
            "--channels-last"]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    (ratio,) = ratios(out, "ratio ours/reference")
    assert math.isfinite(ratio) and ratio > 0
    assert "s/image at n=100,000 (extrapolated)" in out


def test_train_step_prints_ratios_for_every_method(bench, capsys):
    module = bench("train_step")
    argv = ["--model", "small_cnn", "--device", "cpu", "--batch-size", "4", "--k", "2", "--repeat", "1",
            "--steps-per-run", "1", "--attack-steps", "1,2"]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    for method in ("gaussian", "adre_reg", "adre_adv_M1", "adre_adv_M2"):
        (ratio,) = ratios(out, rf"{method}\s")
        assert math.isfinite(ratio) and ratio > 0
    assert "ADRE_REG / Gaussian step time" in out


def test_train_step_rejects_bad_attack_steps(bench):
    module = bench("train_step")
    with pytest.raises(SystemExit):
        module.parse_args(["--attack-steps", "0"])


class ConvRecorder(torch.nn.Module):
    """A 1x1 conv classifier (4 classes) that remembers every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone(memory_format=torch.preserve_format))
        return self.conv(x).mean(dim=(2, 3)).float()


def test_reference_counts_follow_the_model(bench):
    module = bench("certify_throughput")
    model = ConvRecorder().eval()
    with torch.no_grad():  # class 2 wins for every input: counts must all land there
        model.conv.weight.zero_()
        model.conv.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    counts = module.reference_counts(model, torch.rand(3, 8, 8), 70, 4, 0.5, batch_size=32)
    assert isinstance(counts, np.ndarray) and counts.tolist() == [0, 0, 70, 0]
    assert [t.shape[0] for t in model.seen] == [32, 32, 6]


@pytest.mark.parametrize("options", [{"channels_last": True}, {"amp_dtype": torch.bfloat16},
                                     {"channels_last": True, "amp_dtype": torch.bfloat16}])
def test_speed_options_feed_the_same_fp32_noisy_inputs(options):
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = ConvRecorder().eval()
    sample_counts(plain, x, 80, 4, 0.5, batch_size=32, seed=3, idx=5)
    fast = ConvRecorder().eval()
    if options.get("channels_last"):
        fast = prepare_model(fast, channels_last=True)
    sample_counts(fast, x, 80, 4, 0.5, batch_size=64, seed=3, idx=5, **options)
    seen_plain, seen_fast = torch.cat(plain.seen), torch.cat(fast.seen)
    assert all(t.dtype == torch.float32 for t in fast.seen)  # x + d is never cast before the model
    assert torch.equal(seen_plain, seen_fast.contiguous())  # same noise, bit for bit
    if options.get("channels_last"):
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in fast.seen)


def test_prepare_model_rejects_training_mode_and_cuda_graphs_on_cpu():
    with pytest.raises(ValueError, match="model.training=True"):
        prepare_model(ConvRecorder().train())
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        prepare_model(ConvRecorder().eval(), cuda_graphs=True)


def test_fast_bf16_available_answers_a_bool():
    assert isinstance(fast_bf16_available("cpu"), bool)
    assert fast_bf16_available("meta") is False


def test_gpu_suite_smoke_runs_every_section_into_a_temp_file(bench, capsys, tmp_path, cifar10_dir):
    module = bench("gpu_suite")
    out = tmp_path / "gpu_results.json"
    (tmp_path / "gpu_results.json").write_text('{"train_images_per_s": {"small_cnn": {"gaussian": 1.0}}}')
    argv = ["--smoke", "--data-dir", str(cifar10_dir), "--out", str(out), "--repeat", "1"]
    assert module.main(argv) == 0
    text = capsys.readouterr().out
    results = json.loads(out.read_text())
    for key in ("device", "torch", "date", "certify_s_per_image", "reference_s_per_image",
                "flop_floor_s_per_image", "samples_per_s", "batch_size", "settings", "worker_s_per_image"):
        assert key in results, key
    assert results["train_images_per_s"] == {"small_cnn": {"gaussian": 1.0}}  # merged, not replaced
    assert results["noise_scheme"] == 2 and results["smoke"] is True
    seconds = results["certify_s_per_image"]["small_cnn"]
    assert math.isfinite(seconds) and seconds > 0 and results["flops_per_image"]["small_cnn"] > 0
    assert results["correctness"]["noise"]["noise_identical"] is True
    assert results["correctness"]["passed"] is True
    philox = results["correctness"]["philox"]
    assert philox["fused_equals_eager"] is True and philox["philox_eager_s"] > 0  # CPU: eager only
    fast = results["correctness"]["fast_vs_fp32"]
    assert 0 <= fast["class_agreement_rate"] <= 1 and fast["baseline"] == "fp32, TF32 off"
    assert "| small_cnn (32x32" in text and "CERTIFY class agreement" in text


def test_gpu_suite_smoke_refuses_the_real_results_file(bench):
    module = bench("gpu_suite")
    with pytest.raises(SystemExit):
        module.parse_args(["--smoke", "--out", str(module.DEFAULT_OUT)])
    with pytest.raises(SystemExit):
        module.parse_args(["--only", "timing"])


def test_train_step_suite_smoke_merges_train_images_per_s(bench, capsys, tmp_path):
    module = bench("train_step")
    out = tmp_path / "gpu_results.json"
    out.write_text('{"certify_s_per_image": {"small_cnn": 0.5}}')
    argv = ["--suite", "cifar", "--smoke", "--out", str(out),
            "--methods", "gaussian_k1,adre_reg_k8,adre_adv_M1_k1"]
    assert module.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["certify_s_per_image"] == {"small_cnn": 0.5}  # merged, not replaced
    figures = results["train_images_per_s"]["small_cnn"]
    assert sorted(figures) == ["adre_adv_M1_k1", "adre_reg_k8", "gaussian_k1"]
    assert all(math.isfinite(v) and v > 0 for v in figures.values())
    rows = results["train_step"]["small_cnn"]["methods"]
    # the FLOP count sees the k draws and the attack's passes: ADRE_REG k=8 ~ 8x, ADRE_ADV M=1 > Gaussian
    assert 7 < rows["adre_reg_k8"]["flops_per_step"] / rows["gaussian_k1"]["flops_per_step"] < 9
    assert rows["adre_adv_M1_k1"]["flops_per_step"] > 1.4 * rows["gaussian_k1"]["flops_per_step"]
    assert "| adre_reg_k8 | 8 | 0 |" in capsys.readouterr().out


def test_train_step_suite_rejects_unknown_methods(bench):
    module = bench("train_step")
    with pytest.raises(SystemExit):
        module.parse_args(["--suite", "cifar", "--methods", "adre_reg_k4"])


def test_table1_mini_smoke_trains_certifies_and_reports(bench, capsys, tmp_path, cifar10_dir):
    module = bench("table1_mini")
    runs_dir, out_dir = tmp_path / "runs", tmp_path / "results"
    argv = ["--smoke", "--data-dir", str(cifar10_dir), "--runs", "basic_s0.25,adre_l0.1_s0.25",
            "--runs-dir", str(runs_dir), "--out-dir", str(out_dir)]
    assert module.main(argv) == 0
    assert sorted(p.name for p in runs_dir.iterdir()) == ["adre_l0.1_s0.25.parquet", "basic_s0.25.parquet"]
    text = (out_dir / "table1_mini.md").read_text()
    assert (out_dir / "table1_mini.png").stat().st_size > 0
    for needle in ("| basic_s0.25 | CERTIFY |", "| adre_l0.1_s0.25 | T-CERTIFY |", "ACR", "noise scheme 2"):
        assert needle in text, needle
    # a report from the run files alone (as after runs split over several GPU calls)
    argv = ["--smoke", "--report-only", "--runs-dir", str(runs_dir), "--out-dir", str(out_dir)]
    assert module.main(argv) == 0


def test_table1_mini_refuses_a_short_protocol_and_unknown_runs(bench):
    module = bench("table1_mini")
    with pytest.raises(SystemExit):
        module.parse_args(["--epochs", "5"])
    with pytest.raises(SystemExit):
        module.parse_args(["--runs", "basic_s1.0"])


def test_ingest_bytes_counter_sees_row_group_rereads(bench, tmp_path):
    """benchmarks/ingest.py's torch-side byte count: a cache of one row group re-reads row groups on a
    shuffled epoch; a cache holding the dataset reads each row group once (ratio to the image column's
    compressed bytes exactly 1)."""
    import pyarrow.parquet as pq

    module = bench("ingest")
    files = module.write_shards(module.synthetic_jpegs(48, size=(64, 48)), tmp_path / "train", 16, 8)
    image_bytes = sum(pq.ParquetFile(f).metadata.row_group(g).column(0).total_compressed_size
                      for f in files for g in range(pq.ParquetFile(f).metadata.num_row_groups))
    assert module.torch_epoch_bytes(files, cache_bytes=2**30) == image_bytes
    assert module.torch_epoch_bytes(files, cache_bytes=0) > 3 * image_bytes
