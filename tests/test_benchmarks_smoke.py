"""The performance benchmarks run end to end in a tiny configuration, and the sampler's speed options keep
the noise contract (the noisy inputs the model sees are fp32 and the same values whatever the options).

No timing is asserted anywhere: timings belong in benchmarks/RESULTS.md, not in tests.
"""

from __future__ import annotations

import importlib
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
