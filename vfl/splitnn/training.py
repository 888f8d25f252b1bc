"""Training the split network end to end on one machine's channel (in-memory or gRPC).

The guest owns its bottom model ``f_g``, the plaintext interactive part ``W_g, b``, the top
model and the labels; the host owns its bottom model ``f_h``. Per step (§4.1, §4.4):

1. G draws the step's rows from its seeded batch order; H computes ``α = f_h(X_h[rows])``
   (bounded, plus optional embedding noise) and the encrypted F1;
2. G gets ``z_h``, computes ``z = z_h + α_g·W_g + b``, the top model and the loss, and
   ``δ = ∂L/∂z``; it updates its own parameters with the true δ and sends ``δ̃ = Protect(δ)``
   into B1 and B2;
3. H gets ``g_h = δ̃·W_hᵀ`` and back-propagates it through ``f_h``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vfl.models.split import BottomModel, OutputBound, Task, TopModel, loss_for
from vfl.privacy.label_protection import ProtectConfig, embedding_noise, new_generator, protect
from vfl.splitnn.interactive import GuestLayer, HostLayer


@dataclass(frozen=True)
class TrainConfig:
    """Architecture and optimisation (the same at both parties where shared)."""

    d: int = 8
    k: int = 8
    guest_widths: tuple[int, ...] = (16, 8)
    host_widths: tuple[int, ...] = (16, 8)
    top_widths: tuple[int, ...] = (1,)
    learning_rate: float = 0.01
    eta_w: float = 0.1
    a_max: float = 8.0
    host_embedding_noise: float = 0.0
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    seed: int = 0


class GuestTrainer:
    """G's models, optimizer and step function around its :class:`GuestLayer`."""

    def __init__(
        self, *, layer: GuestLayer, x: np.ndarray, y: np.ndarray, config: TrainConfig
    ) -> None:
        torch.manual_seed(config.seed)
        self.layer, self.config = layer, config
        self.x = torch.tensor(x, dtype=torch.float32)
        self.y = torch.tensor(y, dtype=torch.float32)
        self.bottom = BottomModel(
            in_features=x.shape[1], widths=config.guest_widths, output_bound=OutputBound.NONE
        )
        self.w_g = nn.Linear(self.bottom.out_features, config.k)
        self.top = TopModel(in_features=config.k, widths=config.top_widths)
        self.loss = loss_for(Task.BINARY)
        params = [*self.bottom.parameters(), *self.w_g.parameters(), *self.top.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        self.rng = new_generator()
        self.losses: list[float] = []

    def init(self, w0_guest: np.ndarray) -> None:
        """Joint initialisation (the guest's Gaussian component)."""
        self.layer.init(w0_guest)

    def step(self, step: int, rows: np.ndarray) -> None:
        """One training step on ``rows``."""

        def delta_fn(z_h: np.ndarray) -> np.ndarray:
            self.optimizer.zero_grad()
            z_own = self.w_g(self.bottom(self.x[rows]))
            z = (torch.tensor(z_h, dtype=torch.float32) + z_own.detach()).requires_grad_(True)
            loss = self.loss(self.top(z).squeeze(1), self.y[rows])
            torch.autograd.backward(loss)  # top model, and δ = ∂L/∂z in z.grad
            delta = z.grad
            if delta is None:
                raise RuntimeError("no gradient w.r.t. the interactive pre-activation")
            torch.autograd.backward(z_own, grad_tensors=delta)  # W_g, b, f_g learn from the true δ
            self.optimizer.step()
            self.losses.append(float(loss.detach()))
            return protect(delta.double().numpy(), self.config.protect, rng=self.rng)

        self.layer.step(step, rows, delta_fn, self.config.eta_w)

    @torch.no_grad()
    def scores(self, z_h: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Predicted probabilities for ``rows`` given their ``z_h``."""
        z = torch.tensor(z_h, dtype=torch.float32) + self.w_g(self.bottom(self.x[rows]))
        return torch.sigmoid(self.top(z).squeeze(1)).numpy()


class HostTrainer:
    """H's bottom model and optimizer around its :class:`HostLayer`."""

    def __init__(self, *, layer: HostLayer, x: np.ndarray, config: TrainConfig) -> None:
        torch.manual_seed(config.seed + 1)
        self.layer, self.config = layer, config
        self.x = torch.tensor(x, dtype=torch.float32)
        self.bottom = BottomModel(
            in_features=x.shape[1], widths=(*config.host_widths[:-1], config.d), bound=config.a_max
        )
        self.optimizer = torch.optim.Adam(self.bottom.parameters(), lr=config.learning_rate)
        self.rng = new_generator()

    def init(self, w0_host: np.ndarray) -> None:
        """Joint initialisation (the host's Gaussian component)."""
        self.layer.init(w0_host)

    def step(self, step: int) -> None:
        """One training step; the rows come from the guest's BATCH."""
        kept: dict[str, torch.Tensor] = {}

        def alpha_fn(rows: np.ndarray) -> np.ndarray:
            self.optimizer.zero_grad()
            alpha = self.bottom(self.x[torch.as_tensor(rows.astype(np.int64))])
            kept["alpha"] = alpha
            values = alpha.detach().double().numpy()
            return embedding_noise(
                values,
                sigma=self.config.host_embedding_noise,
                a_max=self.config.a_max,
                rng=self.rng,
            )

        _, g_h = self.layer.step(step, alpha_fn)
        torch.autograd.backward(kept["alpha"], grad_tensors=torch.tensor(g_h, dtype=torch.float32))
        self.optimizer.step()
