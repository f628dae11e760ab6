"""The affine prefix folded into one dense map (adre_ray.smoothing.affine_fold): what is folded, what is
not, and that the folded model is the same classifier up to float rounding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from adre_ray.smoothing import affine_fold
from adre_ray.smoothing.affine_fold import FOLD_MAX_ENTRIES, DenseLayer, FoldedModel, fold_affine_prefix
from adre_ray.smoothing.cpu_speed import flops_per_sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_fns  # noqa: E402

ROUNDING_ULPS = 32
"""Largest logit difference allowed between the folded and the eager float32 model, in float32 ulps of the
logits' scale (2**-23 of max |logit|): float32 sums of ~150 terms in another order (the probe's own
tolerance, 1e-3 of the scale, is for gross errors)."""


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in module.parameters():
            nn.init.normal_(p, std=0.5)
    return module.eval()


def noisy_inputs(shape: tuple[int, ...], count: int = 2048, sigma: float = 0.25) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=generator)
    return x + sigma * torch.randn((count, *shape), generator=generator)


def assert_same_classifier(model: nn.Module, folded: nn.Module, inputs: torch.Tensor) -> None:
    """Logits equal to rounding, and the same class wherever the top-2 margin exceeds rounding."""
    with torch.inference_mode():
        eager, fast = model(inputs), folded(inputs)
    rounding = ROUNDING_ULPS * 2.0**-23 * float(eager.abs().max())
    assert float((eager - fast).abs().max()) <= rounding
    top2 = eager.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * rounding
    assert clear.float().mean() > 0.99  # the comparison is not vacuous
    assert torch.equal(eager.argmax(1)[clear], fast.argmax(1)[clear])


def test_levine_small_mnist_net_folds_normalization_and_convolution():
    model = seeded(model_fns.small_mnist_net())
    folded = fold_affine_prefix(model, (1, 7, 7))
    assert isinstance(folded, FoldedModel)
    assert tuple(folded.matrix.shape) == (49, 144) and folded.prefix_shape == (4, 6, 6)
    assert "conv1" not in folded.rest.code  # the cut is at the first ReLU, which the folded map applies
    assert folded.prefix.relu and "relu" not in folded.rest.code
    dense = [(m.weight.shape[1], m.weight.shape[0], m.relu) for m in folded.rest.modules()
             if isinstance(m, DenseLayer)]
    assert dense == [(144, 100, True), (100, 10, False)]  # lin1 with its ReLU fused, then lin2
    # the CPU batch rule counts the dense layers' work (oneDNN's op has its FLOP formula registered)
    assert flops_per_sample(folded, (1, 7, 7)) == 2 * (49 * 144 + 144 * 100 + 100 * 10)
    assert_same_classifier(model, folded, noisy_inputs((1, 7, 7)))


class Normalized(nn.Module):
    """Buffers as constants (as Cohen et al.'s NormalizeLayer keeps them), batch norm, pooling, a
    functional linear layer, then the first nonlinearity."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.2, 0.4]).view(2, 1, 1))
        self.register_buffer("std", torch.tensor([0.3, 0.5]).view(2, 1, 1))
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AvgPool2d(2)
        self.weight = nn.Parameter(torch.zeros(5, 12))
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.bn(self.conv((x - self.mean) / self.std)))
        x = F.linear(torch.flatten(x, 1) * 2.0, self.weight)
        return self.head(torch.tanh(x))


def test_buffers_batch_norm_pooling_and_functional_layers_fold():
    model = seeded(Normalized())
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    folded = fold_affine_prefix(model, (2, 4, 4))
    assert folded is not None and tuple(folded.matrix.shape) == (32, 5)
    assert "tanh" in folded.rest.code and "conv" not in folded.rest.code
    assert_same_classifier(model, folded, noisy_inputs((2, 4, 4)))


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


class InputUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin(x) * 0.5 + x))


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.lin(x)
        return -self.lin(x)


@pytest.mark.parametrize(("model", "shape"), [
    (nn.Sequential(nn.ReLU(), nn.Linear(6, 2)), (6,)),  # no affine prefix
    (nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), (6,)),  # one GEMM already
    (nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(6, 2)), (6,)),  # only a reshape before the ReLU
    (InputUsedTwice(), (6,)),  # the input (a prefix value) is used again after the prefix
    (Branching(), (6,)),  # untraceable
    (model_fns.seeded_small_cnn(), (3, 32, 32)),  # d * m far above FOLD_MAX_ENTRIES
])
def test_models_with_nothing_worth_folding_are_left_alone(model, shape):
    assert fold_affine_prefix(seeded(model), shape) is None


class ReluBesideSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x.flatten(1) * 2.0 - 1.0)
        return self.head(torch.relu(h) + h)


def test_a_relu_whose_input_is_used_again_stays_out_of_place():
    model = seeded(ReluBesideSkip())
    folded = fold_affine_prefix(model, (2, 3))
    assert folded is not None and "torch.relu(" in folded.rest.code and "relu_" not in folded.rest.code
    assert_same_classifier(model, folded, noisy_inputs((2, 3)))


class FunctionalHead(nn.Module):
    """After the first nonlinearity: a functional linear layer with its ReLU, and one whose output is read
    twice (its ReLU cannot be fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.w1, self.b1 = nn.Parameter(torch.zeros(8, 8)), nn.Parameter(torch.zeros(8))
        self.w2 = nn.Parameter(torch.zeros(3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x * 0.5))
        h = F.relu(F.linear(h, self.w1, self.b1))
        h = F.linear(h, self.w2)
        return torch.relu(h) - h


def test_linear_layers_after_the_cut_become_dense_layers_with_their_relu():
    model = seeded(FunctionalHead())
    folded = fold_affine_prefix(model, (6,))
    assert folded is not None and not folded.prefix.relu  # the prefix ends at tanh
    dense = [(m.weight.shape[1], m.weight.shape[0], m.relu, m.bias is None) for m in folded.rest.modules()
             if isinstance(m, DenseLayer)]
    assert dense == [(8, 8, True, False), (8, 3, False, True)]
    assert "F.linear" not in folded.rest.code and "torch.relu(" in folded.rest.code  # the ReLU read twice
    assert_same_classifier(model, folded, noisy_inputs((6,)))


@pytest.mark.parametrize("relu", [False, True])
def test_dense_layer_is_linear_then_relu_and_keeps_autocast(relu):
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(7, 5, generator=generator), torch.randn(7, generator=generator)
    z = torch.randn(2, 33, 5, generator=generator)  # any leading axes, as nn.Linear
    layer = DenseLayer(weight, bias, relu=relu)
    expected = F.linear(z, weight, bias)
    expected = expected.relu() if relu else expected
    with torch.inference_mode():
        got = layer(z)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= ROUNDING_ULPS * 2.0**-23 * float(expected.abs().max())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 run: the layer computes in bf16
            assert layer(z).dtype == torch.bfloat16
            # a float32 head (models.precision.Float32Linear) stays float32 and gives the same logits
            head = DenseLayer(weight, bias, relu=relu, float32=True)
            assert head(z.bfloat16()).dtype == torch.float32
            assert torch.equal(head(z), got)


def test_batch_norm_without_running_statistics_is_not_affine():
    model = seeded(nn.Sequential(nn.Flatten(), nn.Linear(6, 4), Double(),
                                 nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU(), nn.Linear(4, 2)))
    folded = fold_affine_prefix(model, (6,))
    assert folded is not None and 'getattr(self, "3")' in folded.rest.code  # the batch norm stays
    assert_same_classifier(model, folded, noisy_inputs((6,)))


def test_the_size_limit_is_on_the_dense_map():
    model = seeded(nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.Linear(2048, 8), nn.ReLU(),
                                 nn.Linear(8, 2)))
    assert 64 * 8 <= FOLD_MAX_ENTRIES < 64 * 2048  # the map is small; an intermediate layer is not
    folded = fold_affine_prefix(model, (64,))
    assert folded is not None and tuple(folded.matrix.shape) == (64, 8)
    wide = seeded(nn.Sequential(nn.Linear(64, 2048), nn.Flatten(), nn.ReLU()))
    assert fold_affine_prefix(wide, (64,)) is None


def test_an_operation_wrongly_taken_as_affine_is_caught_by_the_probe(monkeypatch):
    model = seeded(nn.Sequential(nn.Flatten(), Double(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3),
                                 nn.Tanh(), nn.Linear(3, 2)))
    assert fold_affine_prefix(model, (6,)) is not None  # Flatten, x 2, Linear; cut at the ReLU
    monkeypatch.setattr(affine_fold, "AFFINE_MODULES", (*affine_fold.AFFINE_MODULES, nn.ReLU))
    assert fold_affine_prefix(model, (6,)) is None  # ReLU "affine": the probe's logits disagree


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match=r"model.training=True"):
        fold_affine_prefix(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train(), (2,))


def test_the_worker_samples_with_the_folded_model_on_cpu(tmp_path):
    from adre_ray.distributed.worker import CertifyWorker
    from adre_ray.smoothing.cpu_speed import cpu_kernels
    from adre_ray.smoothing.sampler import MAIN_STREAM, sample_counts

    worker = CertifyWorker(str(tmp_path / "unused.pt"), num_classes=None, sigma=0.25, seed=5, batch_size=100,
                           model_fn="tests.model_fns:small_mnist_net")
    assert isinstance(worker.model_for((1, 7, 7)), FoldedModel)
    heads = [m.float32 for m in worker.model_for((1, 7, 7)).modules() if isinstance(m, DenseLayer)]
    assert heads == [False, False, True]  # the worker's float32 head (fp32_logits) stays float32
    assert worker.model_for((1, 7, 7)) is worker.model_for((1, 7, 7))  # folded once per shape
    image = torch.rand(1, 7, 7, generator=torch.Generator().manual_seed(4))
    counts = worker.count(image.numpy(), idx=2, stream=MAIN_STREAM, shard=1, num=3000)
    with cpu_kernels(worker.native_convolutions):
        expected = sample_counts(worker.model_for((1, 7, 7)), image, 3000, worker.num_classes, 0.25,
                                 batch_size=worker.batch_for((1, 7, 7)), seed=5, idx=2, shard=1)
    assert counts.tolist() == expected.tolist() and counts.sum() == 3000
    compiled = CertifyWorker(str(tmp_path / "unused.pt"), num_classes=None, sigma=0.25, seed=5,
                             batch_size=100, model_fn="tests.model_fns:small_mnist_net", compile=True)
    assert not compiled.fold_prefix  # a compiled model is left to the compiler
