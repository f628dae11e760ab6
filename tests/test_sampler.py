"""The noise sampler's contract: counts sum to num, noise depends on (seed, idx, shard, stream) only."""

from __future__ import annotations

import pytest
import torch

from adre_ray.smoothing import (
    MAIN_STREAM,
    NOISE_BLOCK_ELEMENTS,
    PILOT_STREAM,
    effective_batch_size,
    noise_block,
    noise_seed,
    sample_counts,
)
from adre_ray.smoothing.sampler import _noise_batches, _noise_filler, draws_in_batches

SHAPE = (3, 4, 4)


class Linear(torch.nn.Module):
    """A fixed random linear classifier (5 classes): its counts move with the noise."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(48, 5)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=generator))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Recorder(torch.nn.Module):
    """Remembers every noisy input it sees (to compare noise directly) and answers class 0."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return torch.zeros(x.shape[0], self.classes)

    def noise(self) -> torch.Tensor:
        return torch.cat(self.seen)


class Constant(torch.nn.Module):
    """Always answers class ``c``."""

    def __init__(self, c: int, classes: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(classes))
        with torch.no_grad():
            self.bias[c] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


def image() -> torch.Tensor:
    return torch.linspace(0, 1, 48).reshape(SHAPE)


def recorded_noise(num: int, batch_size: int = 1000, **stream) -> torch.Tensor:
    model = Recorder()
    counts = sample_counts(model, image(), num, 3, 1.0, batch_size=batch_size, **stream)
    assert counts.tolist() == [num, 0, 0]
    return model.noise() - image()


def test_counts_sum_to_num_and_are_int64_cpu():
    for num in (1, 31, 32, 33, 500):
        counts = sample_counts(Linear().eval(), image(), num, 5, 0.5, batch_size=64, seed=1, idx=2)
        assert counts.dtype == torch.int64 and counts.device.type == "cpu" and counts.shape == (5,)
        assert int(counts.sum()) == num and int(counts.min()) >= 0


def test_same_seed_same_counts():
    a = sample_counts(Linear().eval(), image(), 700, 5, 0.5, seed=4, idx=9, shard=2, stream=PILOT_STREAM)
    b = sample_counts(Linear().eval(), image(), 700, 5, 0.5, seed=4, idx=9, shard=2, stream=PILOT_STREAM)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 1  # the model really depends on the noise


@pytest.mark.parametrize("change", [{"seed": 1}, {"idx": 1}, {"shard": 1}, {"stream": PILOT_STREAM}])
def test_each_key_changes_the_noise(change):
    base = {"seed": 0, "idx": 0, "shard": 0, "stream": MAIN_STREAM}
    noise = recorded_noise(64, **base)
    other = recorded_noise(64, **{**base, **change})
    assert not torch.allclose(noise, other)
    assert noise_seed(**base) != noise_seed(**{**base, **change})
    # and the noise is standard normal scaled by sigma = 1 (mean ~ 0, var ~ 1 over 64 * 48 values;
    # 5 standard errors: sd(mean) = 1/sqrt(3072) ~ 0.018, sd(var) ~ sqrt(2/3072) ~ 0.026)
    assert abs(float(other.mean())) < 5 * 0.018 and abs(float(other.var()) - 1) < 5 * 0.026


def test_constant_model_puts_every_count_on_its_class():
    for c in (0, 3, 6):
        counts = sample_counts(Constant(c, 7), image(), 250, 7, 2.0, batch_size=96)
        assert counts.tolist() == [250 if k == c else 0 for k in range(7)]


def test_batch_size_does_not_change_counts_or_noise():
    reference = sample_counts(Linear().eval(), image(), 1000, 5, 0.5, batch_size=32, seed=7, idx=3)
    for batch_size in (96, 1000, 5000):
        other = sample_counts(Linear().eval(), image(), 1000, 5, 0.5, batch_size=batch_size, seed=7, idx=3)
        assert torch.equal(reference, other), batch_size
    noise = recorded_noise(1000, batch_size=32, seed=7)
    for batch_size in (96, 1000):
        assert torch.equal(noise, recorded_noise(1000, batch_size=batch_size, seed=7))


def test_num_zero_gives_zero_counts():
    counts = sample_counts(Linear().eval(), image(), 0, 5, 0.5)
    assert counts.tolist() == [0] * 5 and counts.dtype == torch.int64


def test_noise_block_sizes():
    assert noise_block((3, 32, 32)) == 2048 and noise_block((3, 224, 224)) == 32  # 32: as noise scheme 1
    assert noise_block((3, 4096, 4096)) == 1  # an image larger than a block: one sample per draw
    for shape in ((3, 32, 32), (3, 224, 224), (1, 28, 28), SHAPE):
        block = noise_block(shape)
        assert block & (block - 1) == 0
        numel = torch.Size(shape).numel()
        assert block * numel <= NOISE_BLOCK_ELEMENTS < 2 * block * numel
    with pytest.raises(ValueError, match="image_shape"):
        noise_block((3, 0, 4))


def test_effective_batch_size_divides_or_is_whole_blocks():
    assert effective_batch_size(1) == 1 and effective_batch_size(1000) == 1000  # no shape: validation only
    assert effective_batch_size(96, (3, 32, 32)) == 128 and effective_batch_size(1000, (3, 32, 32)) == 1024
    assert effective_batch_size(5000, (3, 32, 32)) == 4096 and effective_batch_size(2047, (3, 32, 32)) == 2048
    assert effective_batch_size(1000, (3, 224, 224)) == 992  # 31 blocks of 32
    assert effective_batch_size(3, (3, 224, 224)) == 4 and effective_batch_size(1, (3, 224, 224)) == 1
    for shape in ((3, 32, 32), (3, 224, 224), SHAPE):
        block = noise_block(shape)
        for batch_size in range(1, 3 * block, max(1, block // 7)):
            batch = effective_batch_size(batch_size, shape)
            assert (block % batch == 0) if batch < block else (batch % block == 0), (shape, batch_size)


def test_noise_blocks_do_not_depend_on_batch_size_across_block_edges():
    """Images big enough for blocks of 4 samples (NOISE_BLOCK_ELEMENTS / numel in [4, 8)): batches
    smaller than, equal to and larger than a block, and shards ending inside a block, see the same noise."""
    shape = (1, 1, NOISE_BLOCK_ELEMENTS // 6)
    x = torch.zeros(shape)
    assert noise_block(shape) == 4

    def noise(batch_size: int, num: int = 11) -> torch.Tensor:
        model = Recorder()
        sample_counts(model, x, num, 3, 1.0, batch_size=batch_size, seed=2, idx=1)
        assert sum(t.shape[0] for t in model.seen) == num
        return model.noise()

    reference = noise(1)
    for batch_size in (3, 4, 8, 9, 100):
        assert torch.equal(reference, noise(batch_size)), batch_size
    assert torch.equal(reference[:8], noise(4, num=8))  # a shorter shard: the same leading blocks


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sigma": 0.0}, "sigma=0.0"),
        ({"sigma": -1.0}, "sigma=-1.0"),
        ({"num": -1}, "num=-1"),
        ({"num": 2.5}, "num=2.5"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 0, "num": 0}, "batch_size=0"),
        ({"seed": -1}, "seed=-1"),
        ({"idx": -2, "num": 0}, "idx=-2"),
        ({"shard": 1.5}, "shard=1.5"),
        ({"stream": -1}, "stream=-1"),
        ({"x": torch.zeros(())}, "x.shape=()"),  # a sample may have any shape, but at least one axis
        ({"x": torch.zeros(3), "channels_last": True}, "channels_last=True: needs an image"),
        ({"num_classes": 4}, "model output shape (64, 5): expected (64, 4)"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(kwargs, needle):
    args = {"model": Linear().eval(), "x": image(), "num": 64, "num_classes": 5, "sigma": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        sample_counts(**args)
    assert needle in str(err.value)


def test_padded_batches_give_the_same_counts_and_noise():
    """pad_batches: one input shape for every forward pass; the counted rows are the same draws."""
    for num, batch_size in ((1000, 96), (250, 1000), (130, 64)):
        plain = sample_counts(Linear().eval(), image(), num, 5, 0.5, batch_size=batch_size, seed=5, idx=2)
        padded = sample_counts(Linear().eval(), image(), num, 5, 0.5, batch_size=batch_size, seed=5, idx=2,
                               pad_batches=True)
        assert torch.equal(plain, padded), (num, batch_size)
    model = Recorder()
    sample_counts(model, image(), 130, 3, 1.0, batch_size=64, seed=7, pad_batches=True)
    assert [t.shape[0] for t in model.seen] == [64, 64, 64]  # 64 + 64 + 2 draws, one shape
    assert torch.equal(torch.cat(model.seen)[:130], recorded_noise(130, batch_size=64, seed=7) + image())
    short = Recorder()
    counts = sample_counts(short, image(), 10, 3, 1.0, batch_size=64, seed=7, pad_batches=True)
    assert [t.shape[0] for t in short.seen] == [64] and counts.tolist() == [10, 0, 0]  # a pilot-size shard
    assert torch.equal(short.seen[0][:10], recorded_noise(10, batch_size=64, seed=7) + image())


def drawn_noise(shape: tuple[int, ...], num: int, batch: int, key: int, in_batches: bool) -> torch.Tensor:
    """The ``num`` noise samples ``_noise_batches`` yields for a zero image (sigma 1, torch CPU generator)."""
    fill = _noise_filler("torch", key, torch.device("cpu"))
    batches = _noise_batches(torch.zeros(shape), num, 1.0, batch, fill, False, in_batches=in_batches)
    return torch.cat([b.clone() for b in batches])


@pytest.mark.parametrize(("shape", "batch", "num"), [
    ((1, 7, 7), 16, 1000),  # pooled MNIST: 49 values a sample, the shard ends inside a batch
    ((1, 7, 7), 8192, 20_001),
    ((16,), 1, 37),  # one sample per draw: 16 values
    ((3, 4, 4), 32, 1001),
    ((1, 1, NOISE_BLOCK_ELEMENTS // 64), 16, 150),  # blocks of 64 samples: the shard crosses two edges
    ((3, 32, 32), 256, 2100),  # CIFAR-10: blocks of 2,048, the shard ends inside the second
])
def test_drawing_the_noise_batch_by_batch_gives_the_block_draws_values(shape, batch, num):
    """torch's CPU generator: batches of whole 16-value chunks, drawn one by one into a small buffer, give
    exactly the noise of one draw per block (``draws_in_batches``), so counts keep their noise scheme."""
    assert draws_in_batches("torch", torch.device("cpu"), batch, shape)
    drawn = [drawn_noise(shape, num, batch, noise_seed(3, 1), in_batches) for in_batches in (True, False)]
    assert torch.equal(*drawn)


def test_batch_by_batch_draws_are_refused_where_their_values_would_differ():
    cpu = torch.device("cpu")
    assert not draws_in_batches("torch", cpu, 1, (1, 7, 7))  # 49 values: not whole 16-value chunks
    assert not draws_in_batches("torch", cpu, 8, (10,))  # a 10-value last batch would not be a chunk
    assert not draws_in_batches("philox", cpu, 16, (1, 7, 7))  # only torch's generator draws this way
    assert not draws_in_batches("torch", torch.device("cuda"), 16, (1, 7, 7))  # randn sized by the GPU
    assert not torch.equal(drawn_noise((10,), 13, 1, 5, in_batches=True), drawn_noise((10,), 13, 1, 5, False))
