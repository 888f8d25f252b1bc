"""DP-SGD for a client's local training (docs/protocol.md §7.2; Abadi et al. 2016, Opacus style).

What it protects: in FedAvg with two clients, secure aggregation hides each update from the
aggregator and outsiders only; each client can subtract its own update from the average and
read the other's. DP-SGD bounds what that update — and hence the other silo or the aggregator,
who see it directly or through the average — can reveal about any single training record of
the client that ran it: record-level (ε, δ)-DP for the whole sequence of local steps. It does
not hide aggregate properties of the client's data, and it does not replace secure
aggregation against outsiders.

Parameters (:class:`DPConfig`)
------------------------------
* ``max_grad_norm`` C: each example's full gradient (all parameters flattened together) is
  clipped to L2 norm at most C, which bounds one record's influence on a step's sum.
* ``noise_multiplier`` σ: Gaussian noise ``N(0, σ²C²)`` is added to every coordinate of the
  summed clipped gradient.
* ``delta`` δ: the target δ at which the accountant reports ε.

Steps of one DP-SGD step (:func:`private_gradients`, :func:`dp_epoch`):

1. Poisson sampling: every row joins the batch independently with probability ``q = B/n``
   (the batch size varies and may be 0).
2. Per-example gradients with ``torch.func`` (``vmap(grad(...))`` over ``functional_call``).
3. Clip each example's gradient to norm ≤ C and sum over the batch.
4. Add ``N(0, σ²C²)`` per coordinate (from the caller's generator) and divide by the
   *expected* batch size ``q·n = B`` (a fixed divisor, so the noise scale does not depend on
   the sampled batch).
5. Set ``p.grad`` and take an optimizer step.

Accounting: :mod:`vfl.privacy.accountant` analyses exactly this sampled Gaussian mechanism: it
assumes Poisson sampling at rate ``q`` and ``T = epochs·ceil(n/B)`` steps (``dp_epoch``
returns the steps it took). Shuffled fixed-size batches would need a different analysis.

The noise generator is the caller's ``torch.Generator``: production seeds it from the OS CSPRNG
(e.g. ``secrets.randbits(64)``), tests pass a fixed seed. Models with BatchNorm are not
supported (a record's gradient would depend on the others in its batch); use GroupNorm or
LayerNorm. Nothing here logs gradient values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from protocols.errors import ConfigError

__all__ = [
    "DPConfig",
    "clip_per_example",
    "dp_epoch",
    "per_example_gradients",
    "poisson_batches",
    "private_gradients",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings (defaults as in docs/protocol.md: C = 1.0, σ = 1.0).

    Parameters
    ----------
    noise_multiplier
        σ > 0: noise std in units of the clipping norm.
    max_grad_norm
        C > 0: per-example L2 clipping norm.
    delta
        Target δ in (0, 1) for the reported ε.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(
                f"dp noise_multiplier = {self.noise_multiplier!r} must be a positive finite "
                "number (1.0 is a common choice; 0 would give no privacy)"
            )
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(
                f"dp max_grad_norm = {self.max_grad_norm!r} must be a positive finite number, "
                "e.g. 1.0"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(
                f"dp delta = {self.delta!r} must lie in (0, 1); use a value well below 1/n, "
                "e.g. 1e-5"
            )


def poisson_batches(
    n: int, *, q: float, steps: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Poisson-sampled batches (Step 1).

    Parameters
    ----------
    n
        Number of rows.
    q
        Inclusion probability of each row in each step, ``0 < q ≤ 1``.
    steps
        Number of batches to draw.
    generator
        Source of randomness (on the CPU or the device the indices should live on).

    Yields
    ------
    torch.Tensor
        For each step, the sorted int64 indices of the rows included (possibly empty).
    """
    if n < 0 or steps < 0:
        raise ConfigError(f"n = {n} and steps = {steps} must be non-negative")
    if not 0 < q <= 1:
        raise ConfigError(f"sampling rate q = {q!r} must lie in (0, 1]; use batch / n")
    for _ in range(steps):
        mask = torch.rand(n, generator=generator, device=generator.device) < q
        yield mask.nonzero().squeeze(1)


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def per_example_gradients(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Each example's gradient of ``loss_fn`` w.r.t. the trainable parameters (Step 2).

    Parameters
    ----------
    model
        A plain torch module (no BatchNorm).
    loss_fn
        Loss of one example: called with the model output for a batch of one and that
        example's target (also with a leading dimension of one); returns a scalar.
    x, y
        Inputs and targets, first dimension the batch (B ≥ 1).

    Returns
    -------
    dict of str to torch.Tensor
        Per parameter name, a tensor of shape ``(B, *param.shape)``.
    """
    params = {name: p.detach() for name, p in _trainable(model).items()}
    others: dict[str, Tensor] = {
        name: p.detach() for name, p in model.named_parameters() if not p.requires_grad
    }
    others.update(dict(model.named_buffers()))

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, others), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads: dict[str, Tensor] = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")(
        params, x, y
    )
    return grads


def clip_per_example(grads: dict[str, Tensor], *, max_norm: float) -> dict[str, Tensor]:
    """Scale each example's gradient to L2 norm ≤ ``max_norm`` (Step 3, before summing).

    The norm is that of the example's whole gradient, all parameters flattened together.
    Gradients already within the bound are left unchanged.

    Parameters
    ----------
    grads
        Per-example gradients, each of shape ``(B, ...)`` (see :func:`per_example_gradients`).
    max_norm
        C > 0.

    Returns
    -------
    dict of str to torch.Tensor
        The clipped per-example gradients, same shapes.
    """
    if not max_norm > 0:
        raise ConfigError(f"max_norm = {max_norm!r} must be positive")
    if not grads:
        return {}
    batch = next(iter(grads.values())).shape[0]
    sq = torch.zeros(batch, dtype=torch.float64, device=next(iter(grads.values())).device)
    for g in grads.values():
        sq = sq + g.reshape(batch, -1).to(torch.float64).pow(2).sum(dim=1)
    norms = sq.sqrt()
    factor = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-300), 1.0)
    return {
        name: g * factor.to(g.dtype).reshape((batch,) + (1,) * (g.dim() - 1))
        for name, g in grads.items()
    }


def private_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    config: DPConfig,
    expected_batch: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """The DP-SGD gradient of one Poisson batch (Steps 2-4).

    ``(Σ_b clip_C(g_b) + N(0, σ²C² I)) / expected_batch``; an empty batch gives noise only.

    Parameters
    ----------
    model
        The module being trained; its trainable parameters get a gradient each.
    loss_fn
        Per-example loss (see :func:`per_example_gradients`).
    x, y
        The sampled batch (may have zero rows).
    config
        σ and C.
    expected_batch
        The fixed divisor ``q·n`` (> 0).
    generator
        Noise source; CSPRNG-seeded in production.

    Returns
    -------
    dict of str to torch.Tensor
        Per trainable parameter name, a gradient of the parameter's shape.
    """
    if not expected_batch > 0:
        raise ConfigError(f"expected_batch = {expected_batch!r} must be positive (q·n)")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"x has {x.shape[0]} rows but y has {y.shape[0]}; pass matching rows")
    params = _trainable(model)
    if x.shape[0] > 0:
        clipped = clip_per_example(
            per_example_gradients(model, loss_fn, x, y), max_norm=config.max_grad_norm
        )
        summed = {name: g.sum(dim=0) for name, g in clipped.items()}
    else:
        summed = {name: torch.zeros_like(p) for name, p in params.items()}
    std = config.noise_multiplier * config.max_grad_norm
    out: dict[str, Tensor] = {}
    for name, p in params.items():
        noise = torch.randn(
            p.shape, generator=generator, dtype=p.dtype, device=generator.device
        ).to(p.device)
        out[name] = (summed[name].detach() + std * noise) / expected_batch
    return out


def dp_epoch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    config: DPConfig,
    batch: int,
    generator: torch.Generator,
) -> int:
    """One epoch of DP-SGD: ``ceil(n/batch)`` Poisson steps at ``q = batch/n`` (Steps 1-5).

    Parameters
    ----------
    model
        The module to train (its trainable parameters must be those in ``optimizer``).
    x, y
        The client's training rows and targets.
    optimizer
        Any torch optimizer; it sees only the privatised gradients.
    loss_fn
        Per-example loss (see :func:`per_example_gradients`).
    config
        σ and C.
    batch
        Expected batch size B, ``1 ≤ B ≤ n``.
    generator
        Source of the sampling and the noise.

    Returns
    -------
    int
        Steps taken, for the accountant (``RdpAccountant(q=batch/n, ...).step(steps)``).
    """
    n = int(x.shape[0])
    if y.shape[0] != n:
        raise ConfigError(f"x has {n} rows but y has {y.shape[0]}; pass matching rows")
    if n == 0:
        raise ConfigError("dp_epoch needs at least one training row")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= n:
        raise ConfigError(f"dp batch = {batch!r} must be an integer in [1, n = {n}]")
    q = batch / n
    steps = math.ceil(n / batch)
    params = _trainable(model)
    for idx in poisson_batches(n, q=q, steps=steps, generator=generator):
        rows = idx.to(x.device)
        grads = private_gradients(
            model,
            loss_fn,
            x[rows],
            y[rows.to(y.device)],
            config=config,
            expected_batch=float(batch),
            generator=generator,
        )
        for name, p in params.items():
            p.grad = grads[name]
        optimizer.step()
    logger.debug("dp epoch: n=%d batch=%d q=%.6g steps=%d", n, batch, q, steps)
    return steps
