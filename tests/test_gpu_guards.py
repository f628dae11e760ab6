"""CPU tests that catch classes of GPU bugs: tensors created off the input's device, host-device syncs per
step, channels_last inputs for a channels_last model, float32 logits under bf16 autocast, and the
DDP-then-compile order on a two-process gloo group."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode

from adre_ray.models import build_model
from adre_ray.models.precision import Float32Linear, fp32_logits
from adre_ray.smoothing import sample_counts
from adre_ray.training import build_loss, evaluate_under_noise, train_one_epoch
from adre_ray.training.compiled import local_module, training_modules

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.randn, torch.rand,
             torch.randint, torch.randperm, torch.tensor, torch.as_tensor, torch.linspace, torch.eye,
             torch.zeros_like, torch.ones_like, torch.empty_like, torch.randn_like, torch.rand_like}
LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.randn_like, torch.rand_like}


def _from_project(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith("adre_ray")


class FactoriesNameTheirDevice(TorchFunctionMode):
    """Records every tensor factory called from adre_ray without ``device=`` (on a GPU such a tensor
    would land on the CPU: a crash, or a hidden copy per step). ``*_like`` calls inherit the device."""

    def __init__(self) -> None:
        super().__init__()
        self.offenders: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and func not in LIKE and "device" not in kwargs and "out" not in kwargs \
                and _from_project():
            caller = sys._getframe(1)
            self.offenders.append(f"{func.__name__} at {caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **kwargs)


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__")


@pytest.fixture()
def count_syncs(monkeypatch):
    """Counts host-device syncs (``Tensor.item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``) made by
    adre_ray code."""
    calls: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if _from_project():
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def _model(channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, "cifar10")
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _batches(count: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.rand(size, 3, 32, 32, generator=generator),
             torch.randint(0, 10, (size,), generator=generator)) for _ in range(count)]


LOSSES = [("gaussian", {}), ("adre_reg", {"k": 2, "lam": 0.5}), ("smoothadv", {"k": 2, "epsilon": 0.25})]


def _epoch(model: nn.Module, loss: str, knobs: dict, batches: list, **options) -> dict:
    loss_fn = build_loss(loss, sigma=0.25, **knobs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return train_one_epoch(model, batches, loss_fn, optimizer, None, device="cpu", epoch=0, **options)


@pytest.mark.parametrize(("loss", "knobs"), LOSSES)
def test_training_step_creates_tensors_on_the_input_device(loss, knobs):
    model, batches, mode = _model(), _batches(2), FactoriesNameTheirDevice()  # built on the CPU, then moved
    with mode:
        _epoch(model, loss, knobs, batches)
        evaluate_under_noise(model, batches, 0.25, device="cpu", seed=0)
    assert mode.offenders == []


@pytest.mark.parametrize("noise", ["torch", "philox"])
def test_sampler_creates_tensors_on_the_input_device(noise):
    model, x, mode = _model().eval(), torch.rand(3, 32, 32), FactoriesNameTheirDevice()
    with mode:
        sample_counts(model, x, 40, 10, 0.25, batch_size=16, noise=noise)
    assert mode.offenders == []


@pytest.mark.parametrize(("loss", "knobs"), LOSSES)
def test_host_syncs_do_not_grow_with_training_steps(loss, knobs, count_syncs):
    _epoch(_model(), loss, knobs, _batches(2))
    after_two = len(count_syncs)
    count_syncs.clear()
    _epoch(_model(), loss, knobs, _batches(20))
    assert len(count_syncs) == after_two, count_syncs


@pytest.mark.parametrize("noise", ["torch", "philox"])
def test_host_syncs_do_not_grow_with_sampler_batches(noise, count_syncs):
    model, x = _model().eval(), torch.rand(3, 32, 32)
    sample_counts(model, x, 2 * 8, 10, 0.25, batch_size=8, noise=noise)
    two = list(count_syncs)
    count_syncs.clear()
    sample_counts(model, x, 20 * 8, 10, 0.25, batch_size=8, noise=noise)
    assert count_syncs == two


def _channels_last_checked(model: nn.Module) -> list[bool]:
    """Registers a forward pre-hook on the first conv recording whether each input is channels_last."""
    seen: list[bool] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    return seen


@pytest.mark.parametrize(("loss", "knobs"), LOSSES)
def test_channels_last_model_gets_channels_last_inputs(loss, knobs):
    model = _model(channels_last=True)
    seen = _channels_last_checked(model)
    _epoch(model, loss, knobs, _batches(2), channels_last=True)
    evaluate_under_noise(model, _batches(2), 0.25, device="cpu", seed=0, channels_last=True)
    assert seen and all(seen), seen


def test_padded_evaluation_counts_only_the_real_rows():
    """fixed_shape pads a short last batch; the accuracies equal the unpadded pass."""
    model = _model()
    batches = _batches(2) + _batches(1, size=3)
    shapes: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: shapes.append(args[0].shape[0]))
    plain = evaluate_under_noise(model, batches, 0.25, device="cpu", seed=3)
    padded = evaluate_under_noise(model, batches, 0.25, device="cpu", seed=3, fixed_shape=True)
    assert shapes == [8, 8, 6, 8, 8, 8]
    assert {k: plain[k] for k in ("acc_noise", "acc_clean", "images")} == \
        {k: padded[k] for k in ("acc_noise", "acc_clean", "images")}


def test_final_logits_are_float32_under_bf16_autocast():
    """1,000 logits 1 + c * 1e-6 round to the same bf16 value: argmax would pick class 0 on a tie."""
    head = nn.Linear(2, 1000, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, 0] = 1 + 1e-6 * torch.arange(1000)
    x = torch.tensor([[1.0, 0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x).argmax().item() == 0  # the tie the fix removes
        logits = fp32_logits(nn.Sequential(nn.Identity(), head))(x)
    assert logits.dtype == torch.float32 and logits.argmax().item() == 999
    model = build_model("small_cnn", 10, "cifar10")
    assert type(model[-1][-1]) is Float32Linear  # registry models come with the float32 head
    assert list(model.state_dict()) == list(_plain_small_cnn().state_dict())


def _plain_small_cnn() -> nn.Module:
    from adre_ray.models.small_cnn import SmallCNN

    return nn.Sequential(nn.Identity(), SmallCNN(10))


def _ddp_then_compile(rank: int, rendezvous: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        train, evaluation = training_modules(model, DistributedDataParallel, compile=True,
                                             backend="eager")
        assert isinstance(train, torch._dynamo.eval_frame.OptimizedModule), type(train)
        assert isinstance(train._orig_mod, DistributedDataParallel), type(train._orig_mod)  # DDP inside
        assert isinstance(evaluation, torch._dynamo.eval_frame.OptimizedModule)
        assert evaluation._orig_mod is model and local_module(train) is evaluation
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(rank)  # each rank its own data
        x, y = torch.rand(6, 3, 8, 8, generator=generator), torch.randint(0, 5, (6,), generator=generator)
        nn.functional.cross_entropy(train(x), y).backward()
        optimizer.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), "gradients were not all-reduced"
        with torch.no_grad():
            evaluation(x)
    finally:
        dist.destroy_process_group()


def test_ddp_then_compile_on_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_then_compile, args=(str(tmp_path / "rendezvous"),), nprocs=2, join=True,
                       start_method="spawn")  # fork after the test process started threads can hang


def test_without_compile_the_modules_are_ddp_and_its_local_module():
    model = nn.Linear(2, 2)
    train, evaluation = training_modules(model, lambda m: m, compile=False)
    assert train is model and evaluation is model and local_module(train) is model
