"""Label leakage through the host's cut-layer gradient: tests L1, L2, L6, L7 (PROTOCOL.md §8.4).

The host's view is produced by split training without encryption: the guest's and the host's
torch models (``vfl.models.split``, as in ``vfl.splitnn.training``) around the integer
reference of the interactive layer (:class:`InteractiveReference`), which computes exactly the
integers of the encrypted protocol (tests S1, S2). So ``g_h`` below is, bit for bit, the ``g_h``
the host would decrypt, and the attacks of :mod:`vfl.privacy.attacks` run on what the host
really sees. Everything is seeded: the data, torch, the batch order and the protection noise
(the reference's share masks come from the OS CSPRNG but cancel exactly in ``z_h``, ``g_h``
and ``W``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from gmpy2 import mpz
from sklearn.metrics import roc_auc_score
from torch import nn

from protocols.crypto.fixedpoint import FixedPointConfig
from protocols.errors import ConfigError
from vfl.models.split import BottomModel, OutputBound, Task, TopModel, loss_for
from vfl.privacy.attacks import (
    HostView,
    direction_attack,
    leak_auc,
    norm_attack,
    norm_scores,
    track_updates,
    update_tracking_attack,
)
from vfl.privacy.label_protection import (
    ProtectConfig,
    ProtectMode,
    marvell_objective,
    marvell_solve,
    protect,
)
from vfl.splitnn.reference import InteractiveReference
from vfl.splitnn.spec import SplitMode

FP = FixedPointConfig()
# P1 shares are plain integers; the modulus only embeds decoded values (|value| ≪ n/2), so any
# large odd n gives the protocol's integers. 2^1279 − 1 is a Mersenne prime.
MODULUS = mpz(2) ** 1279 - 1
NONE = ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True)
MAX_NORM = ProtectConfig(mode=ProtectMode.MAX_NORM)
MARVELL = ProtectConfig(mode=ProtectMode.MARVELL)


@dataclass(frozen=True)
class Data:
    """Vertically split synthetic data: guest features and labels, host features."""

    x_guest: np.ndarray
    x_host: np.ndarray
    y: np.ndarray
    test_guest: np.ndarray
    test_host: np.ndarray
    test_y: np.ndarray


def synthetic(seed: int, *, n: int = 2000, n_test: int = 2000, positive_rate: float = 0.05) -> Data:
    """Exactly ``positive_rate·n`` positives; both parties' features shift with the label.

    The host's 8 features carry more signal (shift 1.2 along a random direction, plus an
    interaction) than the guest's 4 (shift 0.7), so the joint model needs the host.
    """
    rng = np.random.default_rng(seed)
    total = n + n_test
    y = np.zeros(total)
    y[: round(positive_rate * n)] = 1
    y[n : n + round(positive_rate * n_test)] = 1
    y = np.concatenate([rng.permutation(y[:n]), rng.permutation(y[n:])])
    u_h, u_g = rng.normal(0, 1, 8), rng.normal(0, 1, 4)
    x_h = rng.normal(0, 1, (total, 8)) + 1.2 * y[:, None] * u_h / np.linalg.norm(u_h)
    x_h[:, 0] += 0.8 * y * np.sign(x_h[:, 1])  # something for the bottom model's hidden layer
    x_g = rng.normal(0, 1, (total, 4)) + 0.7 * y[:, None] * u_g / np.linalg.norm(u_g)
    return Data(x_g[:n], x_h[:n], y[:n], x_g[n:], x_h[n:], y[n:])


@dataclass(frozen=True)
class Run:
    """The host's view of one training run and what the evaluator needs besides it."""

    view: HostView
    deltas: list[np.ndarray]  # the guest's true δ per step
    protected: list[np.ndarray]  # δ̃ per step (B1 and, unless leaky, B2)
    guest_auc: float  # the trained joint model on the held-out rows


class FloatLayer:
    """The interactive layer's host part in float64 (only for the exploratory investigation)."""

    def __init__(self, w0: np.ndarray) -> None:
        self.w = w0.copy()

    def forward(self, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return alpha, alpha @ self.w

    def backward(self, alpha: np.ndarray, b1: np.ndarray, b2: np.ndarray, eta: float) -> np.ndarray:
        g = b1 @ self.w.T
        self.w = self.w - eta * alpha.T @ b2
        return g

    def weights(self) -> np.ndarray:
        return self.w


class ExactLayer:
    """The protocol's integers through :class:`InteractiveReference` (P1, no encryption)."""

    def __init__(self, w0_guest: np.ndarray, w0_host: np.ndarray) -> None:
        self.ref = InteractiveReference(mode=SplitMode.P1, n=MODULUS, fp=FP)
        self.shares = self.ref.init(w0_guest, w0_host)
        self.a_hat: np.ndarray | None = None

    def forward(self, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.a_hat, z = self.ref.forward(self.shares, alpha)
        encoded = np.ldexp(self.a_hat.astype(np.float64), -FP.f_a)  # â / 2^f_a, exact
        return encoded, z

    def backward(self, alpha: np.ndarray, b1: np.ndarray, b2: np.ndarray, eta: float) -> np.ndarray:
        assert self.a_hat is not None
        g, after = self.ref.backward(self.shares, self.a_hat, b1, eta)
        if b2 is not b1:  # the broken protocol of the L7 control: true δ in B2
            _, after = self.ref.backward(self.shares, self.a_hat, b2, eta)
        self.shares = after
        return g

    def weights(self) -> np.ndarray:
        ints = self.ref.weights(self.shares)
        return np.array([[math.ldexp(int(v), -FP.f_w) for v in row] for row in ints])


def train(
    data: Data,
    config: ProtectConfig,
    *,
    d: int = 8,
    k: int = 4,
    batch: int = 64,
    steps: int = 150,
    seed: int = 0,
    exact: bool = True,
    leaky_b2: bool = False,
    eta: float = 0.1,
    learning_rate: float = 0.01,
) -> Run:
    """Split training as in ``vfl.splitnn.training`` and the host's view of it.

    Guest: bottom (16, 8), plaintext ``W_g, b``, top model (ReLU, 1 logit), Adam on the true δ;
    host: bottom (16, d) with a tanh bound ``A_max``, Adam on ``g_h``; ``W_h`` by plain SGD with
    ``η_W``, jointly initialised. ``leaky_b2`` puts the true δ into B2 (a broken protocol).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    noise = np.random.default_rng([seed, 1])
    guest_bottom = BottomModel(
        in_features=data.x_guest.shape[1], widths=(16, 8), output_bound=OutputBound.NONE
    )
    w_g = nn.Linear(guest_bottom.out_features, k)
    top = TopModel(in_features=k, widths=(1,))
    loss_fn = loss_for(Task.BINARY)
    guest_params = [*guest_bottom.parameters(), *w_g.parameters(), *top.parameters()]
    guest_opt = torch.optim.Adam(guest_params, lr=learning_rate)
    host_bottom = BottomModel(in_features=data.x_host.shape[1], widths=(16, d), bound=FP.a_max)
    host_opt = torch.optim.Adam(host_bottom.parameters(), lr=learning_rate)
    sigma0 = math.sqrt(2 / (d + k))
    w0_g, w0_h = rng.normal(0, sigma0 / math.sqrt(2), (2, d, k))
    layer: ExactLayer | FloatLayer = ExactLayer(w0_g, w0_h) if exact else FloatLayer(w0_g + w0_h)
    x_g = torch.tensor(data.x_guest, dtype=torch.float32)
    x_h = torch.tensor(data.x_host, dtype=torch.float32)
    y = torch.tensor(data.y, dtype=torch.float32)
    per_epoch = len(data.y) // batch
    gradients, embeddings, rows_seen, deltas, protected = [], [], [], [], []
    order = rng.permutation(len(data.y))
    for step in range(steps):
        if step and step % per_epoch == 0:
            order = rng.permutation(len(data.y))
        rows = order[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]
        # H: embedding and F1
        host_opt.zero_grad()
        alpha = host_bottom(x_h[rows])
        encoded, z_h = layer.forward(alpha.detach().double().numpy())
        # G: forward, loss, δ = ∂L/∂z, own update with the true δ, δ̃ = Protect(δ, y)
        guest_opt.zero_grad()
        z_own = w_g(guest_bottom(x_g[rows]))
        z = (torch.tensor(z_h, dtype=torch.float32) + z_own.detach()).requires_grad_(True)
        torch.autograd.backward(loss_fn(top(z).squeeze(1), y[rows]))
        assert z.grad is not None
        torch.autograd.backward(z_own, grad_tensors=z.grad)
        guest_opt.step()
        delta = z.grad.double().numpy()
        tilde = protect(delta, config, rng=noise, labels=data.y[rows])
        # B1 (g_h from the pre-update weights) and B2
        g_h = layer.backward(encoded, tilde, delta if leaky_b2 else tilde, eta)
        torch.autograd.backward(alpha, grad_tensors=torch.tensor(g_h, dtype=torch.float32))
        host_opt.step()
        gradients.append(g_h)
        embeddings.append(encoded)
        rows_seen.append(rows)
        deltas.append(delta)
        protected.append(tilde)
    with torch.no_grad():
        alpha_test = host_bottom(torch.tensor(data.test_host, dtype=torch.float32)).double()
        z_test = torch.tensor(alpha_test.numpy() @ layer.weights(), dtype=torch.float32)
        z_test = z_test + w_g(guest_bottom(torch.tensor(data.test_guest, dtype=torch.float32)))
        scores = top(z_test).squeeze(1).numpy()
    view = HostView(gradients=gradients, embeddings=embeddings, rows=rows_seen)
    return Run(view, deltas, protected, float(roc_auc_score(data.test_y, scores)))


@pytest.fixture(scope="module")
def data() -> Data:
    return synthetic(0)


# ---------------------------------------------------------------------------------------------
# L1: without protection both attacks recover the labels from g_h


def test_l1_no_protection_leaks(data: Data) -> None:
    run = train(data, NONE, k=4)
    assert run.guest_auc > 0.85  # the model learns
    late = run.view.window(50)
    norm, direction = norm_attack(late, data.y), direction_attack(late, data.y)
    assert norm > 0.9 and direction > 0.9, (norm, direction)  # documents the risk


# ---------------------------------------------------------------------------------------------
# L2: max_norm equalises the norms of δ̃ — but not of g_h


def test_l2_max_norm_on_the_protected_gradient(data: Data) -> None:
    run = train(data, MAX_NORM, k=4)
    late = run.view.window(50)
    labels = np.concatenate([data.y[r] for r in late.rows])
    assert leak_auc(norm_scores(run.protected[50:]), labels) < 0.6  # L2 as specified, on δ̃


def test_l2_max_norm_does_not_protect_g_h(data: Data) -> None:
    """What the host actually sees: an anisotropic W_t re-weights signal and noise of δ̃."""
    run = train(data, MAX_NORM, k=4)
    assert norm_attack(run.view.window(50), data.y) > 0.7  # documents: max_norm fails on g_h


def test_l2_marvell_protects_g_h(data: Data) -> None:
    run = train(data, MARVELL, k=4)
    late = run.view.window(50)
    norm, direction = norm_attack(late, data.y), direction_attack(late, data.y)
    assert norm < 0.6 and direction < 0.6, (norm, direction)
    assert run.guest_auc > 0.8


# ---------------------------------------------------------------------------------------------
# L3 (partial): Marvell's objective and configuration


def test_marvell_is_never_worse_than_isotropic_noise() -> None:
    for v1, v0, p, k in [(0.01, 0.001, 0.05, 8), (0.0, 0.02, 1 / 64, 4), (2.0, 0.1, 0.5, 1)]:
        found = marvell_solve(v1=v1, v0=v0, delta_sq=1.0, p=p, k=k, power=4.0)
        spent = p * (found.a1 + (k - 1) * found.b1) + (1 - p) * (found.a0 + (k - 1) * found.b0)
        assert spent == pytest.approx(4.0, rel=1e-9)  # the whole budget, no more
        iso = marvell_objective(4 / k, 4 / k, 4 / k, 4 / k, v1=v1, v0=v0, delta_sq=1.0, k=k)
        assert found.objective <= iso


def test_marvell_is_binary_only_and_needs_labels() -> None:
    with pytest.raises(ConfigError, match="binary"):
        ProtectConfig(mode=ProtectMode.MARVELL, num_classes=3)
    with pytest.raises(ConfigError, match="labels"):
        protect(np.zeros((4, 2)), MARVELL, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="binary label"):
        protect(np.zeros((2, 2)), MARVELL, rng=np.random.default_rng(0), labels=np.array([0, 2]))
