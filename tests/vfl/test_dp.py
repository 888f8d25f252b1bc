"""DP-SGD sampler (docs/protocol.md §7.2, test L6 style): clipping, noise scale, Poisson batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from protocols.errors import ConfigError
from vfl.privacy.accountant import RdpAccountant
from vfl.privacy.dp import (
    DPConfig,
    clip_per_example,
    dp_epoch,
    per_example_gradients,
    poisson_batches,
    private_gradients,
)


def bce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y)


def mlp(seed: int, d: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1))


def data(n: int, d: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = (x @ w > 0).to(torch.float32)
    return x, y


def flat_norms(grads: dict[str, Tensor]) -> Tensor:
    b = next(iter(grads.values())).shape[0]
    norms: Tensor = torch.cat([g.reshape(b, -1) for g in grads.values()], dim=1).norm(dim=1)
    return norms


def test_vmap_matches_autograd_loop() -> None:
    model = mlp(1)
    x, y = data(10)
    per = per_example_gradients(model, bce, x, y)
    names, params = zip(*model.named_parameters(), strict=True)
    for i in range(x.shape[0]):
        loop = torch.autograd.grad(bce(model(x[i : i + 1]), y[i : i + 1]), params)
        for name, g in zip(names, loop, strict=True):
            torch.testing.assert_close(per[name][i], g, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_get_no_gradient() -> None:
    model = mlp(2)
    model[0].weight.requires_grad_(False)
    x, y = data(4)
    per = per_example_gradients(model, bce, x, y)
    assert "0.weight" not in per
    assert set(per) == {"0.bias", "2.weight", "2.bias"}


def test_clipping_bounds_the_whole_gradient_norm() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = {
        "a": torch.randn(64, 5, 3, generator=gen) * torch.linspace(0.01, 3, 64).reshape(64, 1, 1),
        "b": torch.randn(64, 4, generator=gen) * torch.linspace(0.01, 3, 64).reshape(64, 1),
    }
    c = 1.5
    before = flat_norms(grads)
    clipped = clip_per_example(grads, max_norm=c)
    after = flat_norms(clipped)
    assert bool((before > c).any()) and bool((before < c).any())
    assert bool((after <= c * (1 + 1e-6)).all())
    big = before > c
    torch.testing.assert_close(after[big], torch.full_like(after[big], c))
    for name in grads:  # below the bound: unchanged, exactly
        assert torch.equal(clipped[name][~big], grads[name][~big])
    # Clipping scales the whole vector: directions are kept.
    ratio = clipped["a"][big] / grads["a"][big]
    torch.testing.assert_close(ratio, ratio[:, :1, :1].expand_as(ratio))


def test_clipping_zero_gradient() -> None:
    zero = {"w": torch.zeros(3, 4)}
    assert torch.equal(clip_per_example(zero, max_norm=1.0)["w"], zero["w"])


def test_noise_std_is_sigma_c() -> None:
    """Empirical std of the added noise = σC ± 2 % (L6); here about 0.2 % sampling error."""
    model = nn.Linear(500, 200)  # 100 200 coordinates
    x = torch.randn(8, 500, generator=torch.Generator().manual_seed(4))
    y = torch.rand(8, generator=torch.Generator().manual_seed(5))

    def mse(out: Tensor, t: Tensor) -> Tensor:
        return (out - t.unsqueeze(-1)).pow(2).mean()

    config = DPConfig(noise_multiplier=1.3, max_grad_norm=0.7)
    expected = 16.0
    noisy = private_gradients(
        model,
        mse,
        x,
        y,
        config=config,
        expected_batch=expected,
        generator=torch.Generator().manual_seed(6),
    )
    clipped = clip_per_example(
        per_example_gradients(model, mse, x, y), max_norm=config.max_grad_norm
    )
    noise = torch.cat(
        [(noisy[k] * expected - clipped[k].sum(dim=0)).flatten() for k in sorted(noisy)]
    )
    assert noise.numel() == 100_200
    target = config.noise_multiplier * config.max_grad_norm
    assert float(noise.std()) == pytest.approx(target, rel=0.02)
    assert abs(float(noise.mean())) < 4 * target / math.sqrt(noise.numel())


def test_empty_batch_is_noise_only() -> None:
    model = mlp(7)
    config = DPConfig(noise_multiplier=2.0, max_grad_norm=0.5)
    out = private_gradients(
        model,
        bce,
        torch.zeros(0, 6),
        torch.zeros(0),
        config=config,
        expected_batch=4.0,
        generator=torch.Generator().manual_seed(8),
    )
    gen = torch.Generator().manual_seed(8)
    for name, p in model.named_parameters():
        assert out[name].shape == p.shape
        expected = 2.0 * 0.5 * torch.randn(p.shape, generator=gen) / 4.0
        torch.testing.assert_close(out[name], expected)


def test_noise_is_reproducible_from_the_generator() -> None:
    model = mlp(9)
    x, y = data(12)
    config = DPConfig()

    def run(seed: int) -> Tensor:
        g = private_gradients(
            model,
            bce,
            x,
            y,
            config=config,
            expected_batch=12.0,
            generator=torch.Generator().manual_seed(seed),
        )
        return torch.cat([v.flatten() for v in g.values()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_poisson_batch_sizes() -> None:
    n, q, steps = 1000, 0.05, 400
    sizes = []
    for idx in poisson_batches(n, q=q, steps=steps, generator=torch.Generator().manual_seed(10)):
        assert idx.dtype == torch.int64
        assert bool((idx[1:] > idx[:-1]).all())  # distinct, sorted
        assert idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n)
        sizes.append(idx.numel())
    assert len(sizes) == steps
    mean = sum(sizes) / steps
    se = math.sqrt(n * q * (1 - q) / steps)
    assert abs(mean - q * n) < 3 * se
    # A tiny rate yields empty batches too.
    empty = list(poisson_batches(20, q=0.01, steps=50, generator=torch.Generator().manual_seed(1)))
    assert any(b.numel() == 0 for b in empty)


def test_dp_epoch_trains_and_counts_steps() -> None:
    torch.manual_seed(11)
    model = nn.Linear(6, 1)
    x, y = data(600, seed=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    config = DPConfig(noise_multiplier=0.05, max_grad_norm=1.0)
    gen = torch.Generator().manual_seed(13)

    def loss() -> float:
        with torch.no_grad():
            return float(bce(model(x), y))

    start = loss()
    acc = RdpAccountant(q=64 / 600, sigma=config.noise_multiplier, delta=config.delta)
    for _ in range(3):
        steps = dp_epoch(
            model, x, y, optimizer=optimizer, loss_fn=bce, config=config, batch=64, generator=gen
        )
        assert steps == math.ceil(600 / 64) == 10
        acc.step(steps)
    assert loss() < 0.6 * start
    assert acc.steps == 30
    assert acc.epsilon() > 0


def test_dp_epoch_rejects_bad_batch() -> None:
    model = nn.Linear(6, 1)
    x, y = data(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for bad in (0, 11):
        with pytest.raises(ConfigError, match="batch"):
            dp_epoch(
                model, x, y, optimizer=opt, loss_fn=bce, config=DPConfig(), batch=bad, generator=gen
            )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": math.nan}, "max_grad_norm"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_config_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DPConfig(**kwargs)


def test_poisson_rejects_bad_rate() -> None:
    gen = torch.Generator()
    with pytest.raises(ConfigError, match="sampling rate"):
        next(poisson_batches(10, q=0.0, steps=1, generator=gen))
    with pytest.raises(ConfigError, match="sampling rate"):
        next(poisson_batches(10, q=1.5, steps=1, generator=gen))
