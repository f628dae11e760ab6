"""benchmarks/table1_cpu.py (issue 24) at toy sizes: an interrupted training resumes to the same weights as
an uninterrupted one, a changed plan is refused, the whole run ends in a page with the paired tests, and
the layout/precision comparison of train_step.py runs."""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def table1(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("table1_cpu")


def _toy_plan(module):
    return replace(module.Plan(), **{**module.SMOKE, "train_images": 32, "threads": 1})


def _toy_data(count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, 3, 32, 32, generator=generator), torch.randint(10, (count,), generator=generator)


class StopError(Exception):
    pass


@pytest.mark.parametrize("method", ["basic", "adre_reg"])
def test_interrupted_training_resumes_to_the_same_weights(table1, tmp_path, monkeypatch, method):
    plan, data = _toy_plan(table1), _toy_data()
    table1.freeze_plan(tmp_path / "whole", plan)
    whole = table1.train_method(plan, method, tmp_path / "whole", data, checkpoint_s=1e9)
    saves = {"count": 0}
    original = table1.save_training

    def stop_after_three(path, run):  # saved after each batch (checkpoint_s=0): die in the 2nd epoch
        original(path, run)
        saves["count"] += 1
        if saves["count"] == 3:
            raise StopError

    monkeypatch.setattr(table1, "save_training", stop_after_three)
    table1.freeze_plan(tmp_path / "cut", plan)
    with pytest.raises(StopError):
        table1.train_method(plan, method, tmp_path / "cut", data, checkpoint_s=0.0)
    assert (tmp_path / "cut" / method / "train_state.pt").is_file()
    assert not (tmp_path / "cut" / method / "model.pt").exists()
    torch.manual_seed(12345)  # a resumed process starts with another RNG state: the saved one must win
    monkeypatch.setattr(table1, "save_training", original)
    resumed = table1.train_method(plan, method, tmp_path / "cut", data, checkpoint_s=0.0)
    a = torch.load(whole, weights_only=False)
    b = torch.load(resumed, weights_only=False)
    assert a["extra"]["train_log"] and len(a["extra"]["train_log"]) == plan.epochs
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert not (tmp_path / "cut" / method / "train_state.pt").exists()


def test_epoch_batches_depend_on_seed_and_epoch_only(table1):
    """Both methods (and a resumed epoch) get the same batches: a function of (seed, epoch, batch index)."""
    plan, data = _toy_plan(table1), _toy_data()
    first = [x for x, _ in table1.epoch_batches(plan, data, 1, 0, 2)]
    again = [x for x, _ in table1.epoch_batches(plan, data, 1, 1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(first[1:], again, strict=True))
    other_epoch = next(table1.epoch_batches(plan, data, 0, 0, 1))[0]
    assert not torch.equal(first[0], other_epoch)


def test_a_changed_plan_is_refused(table1, tmp_path):
    plan = _toy_plan(table1)
    table1.freeze_plan(tmp_path, plan)
    table1.freeze_plan(tmp_path, plan)  # the same plan: a resume
    with pytest.raises(ValueError, match=r"adre_lambda=0.2 differs from the plan frozen in .*=0.1"):
        table1.freeze_plan(tmp_path, replace(plan, adre_lambda=0.2))


def test_smoke_run_writes_the_page_with_paired_tests(table1, tmp_path, cifar10_dir, capsys):
    out = tmp_path / "results"
    argv = ["--smoke", "--data-dir", str(cifar10_dir), "--state-dir", str(tmp_path / "state"),
            "--out-dir", str(out), "--threads", "1"]
    assert table1.main(argv) == 0
    page = (out / "table1_cpu.md").read_text()
    assert "## Paired comparison (same images)" in page and "McNemar exact p" in page
    assert "ACR difference ADRE_REG - Basic" in page and (out / "table1_cpu.png").is_file()
    from adre_ray.analysis.results import read_results

    rows = read_results(tmp_path / "state" / "basic" / "certify")
    assert set(rows.column("precision").to_pylist()) == {"fp32"} and rows.num_rows == 3
    assert table1.main([*argv, "--adre-k", "3"]) == 2  # another plan on the same state: refused
    assert "adre_k=3 differs from the plan frozen" in capsys.readouterr().err


def test_mcnemar_and_bootstrap(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    report = importlib.import_module("table1_cpu_report")
    assert report.mcnemar_exact(0, 0) == 1.0
    assert report.mcnemar_exact(10, 0) == pytest.approx(2 * 0.5 ** 10)  # two-sided exact
    assert report.mcnemar_exact(3, 7) == report.mcnemar_exact(7, 3)
    import numpy as np

    low, high = report.bootstrap_interval(np.full(50, 0.2))
    assert low == high == pytest.approx(0.2)


def test_the_report_names_each_machine_with_the_stages_it_ran(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    report = importlib.import_module("table1_cpu_report")
    amd, xeon = {"cpu": "AMD EPYC"}, {"cpu": "Xeon"}
    progress = [{"stage": "load_train", "wall_s": 1}, {"stage": "train", "method": "basic", "wall_s": 1},
                {"stage": "start", "machine": xeon}, {"stage": "train", "method": "basic", "wall_s": 1},
                {"stage": "train", "method": "adre_reg", "wall_s": 1}, {"stage": "start", "machine": amd},
                {"stage": "certify", "method": "basic", "wall_s": 1}]
    assert report.machines_by_stage(amd, progress) == [
        (amd, ["load_train", "train basic", "certify basic"]), (xeon, ["train basic", "train adre_reg"])]


def test_train_step_layouts_compare_precisions_side_by_side(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("train_step")
    argv = ["--model", "small_cnn", "--device", "cpu", "--batch-size", "4", "--k", "2", "--repeat", "1",
            "--steps-per-run", "1", "--layouts", "fp32,fp32_cl,bf16_cl", "--cpu-time"]
    assert module.main(argv) == 0
    text = capsys.readouterr().out
    assert all(f"| {name} |" in text for name in ("fp32", "fp32_cl", "bf16_cl")) and "process CPU" in text
    with pytest.raises(SystemExit):
        module.parse_args(["--layouts", "fp16"])
