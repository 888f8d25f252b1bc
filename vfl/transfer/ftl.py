"""Federated transfer learning: the Taylor loss, its gradients and the encrypted batch flow
(docs/protocol.md §6.1-6.3).

Roles: G (source domain) holds labels ``y ∈ {−1, +1}`` and ``Net^A``; H (target domain)
holds ``Net^B`` and no labels; A holds the Paillier key ``sk_A`` and decrypts only masked
values (§2.5). Every ciphertext here is under ``pk_A``; ``u`` and ``Φ`` are encoded at
``f_a`` bits.

What each party learns per batch ``S`` (γ = 0): H its decrypted ``∂L/∂u^B_i`` (with the
perturbation ``ξ`` of the configured protection, §6.3); G ``K = Σ_i c_i u^B_i`` and the
batch loss; A uniform masked values. With γ > 0 both parties learn the other's overlap
representations (§6.4), which needs ``reveal_overlap_repr``.

Steps (the comments of the functions below cite them):

T0. G: ``[[Φ̂]]``, once per epoch, over all ``N_A`` labelled rows.
T1. H: ``[[û_i]]`` and ``[[q̂]] = Obf(Û ⊙ [[Φ̂]])`` with ``Û = Σ_i û_i û_iᵀ`` (scale ``3f_a``).
T2. G: ``[[ŝ_i]] = Φ̂ᵀ[[û_i]]``, ``[[4c_i]] = [[ŝ_i]] ⊕ (−2y_i)``, and
    ``[[ĝ^B_i]] = Obf(Φ̂ ⊙ [[4c_i]] ⊕ enc_{3f_a}((4/α_L)(−γκu^A_i + ξ_i)))``.
T3. H: masked decryption of ``[[ĝ^B]]`` (tag ``FTL_GB``); ``∂L/∂u^B = (α_L/4)·ĝ^B``.
T4. G: ``[[4K]] = (−2y)ᵀ[[û]] ⊕ [[q̂]]``, obfuscated, masked decryption (``FTL_K``).
T5. G: ``[[Λ]] = (−4y)ᵀ[[ŝ]] ⊕ Φ̂ᵀ[[q̂]]``, obfuscated, masked decryption (``FTL_LOSS``);
    ``L = α_L(|S|·log 2 + Λ/8)`` (+ the alignment term if γ > 0).
T6. G, at the end of the epoch: ``∂L/∂u^A_j = α_L y_j K̄/N_A`` for every labelled row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from gmpy2 import mpz
from torch import nn

from protocols.crypto.cipher import Cipher
from protocols.crypto.fixedpoint import decode, encode, ring
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.tensor import EncryptedTensor, encrypt, plain_matmul
from protocols.errors import ConfigError, InsecureConfigError
from protocols.executor import Executor
from vfl.models.mlp import MLP

F_A = 24  # fixed-point bits of u and Φ
U_MAX = 8.0  # |u| and |Φ| bound before encoding (checked)
LOSS_BOUND = 2.0**40


class FtlProtect(StrEnum):
    """Perturbation ``ξ`` of the host-bound gradient (T2)."""

    NONE = "none"  # leaks every overlap label up to one sign (§6.3): needs allow_label_leak
    GAUSSIAN = "gaussian"


@dataclass(frozen=True)
class FtlConfig:
    """The FTL model and training parameters (§6.1; checks of test F2).

    Parameters
    ----------
    d
        Width of both networks' representations ``u``.
    alpha
        ``α_L``, weight of the prediction loss.
    gamma
        ``γ``, weight of the alignment loss; > 0 needs ``reveal_overlap_repr`` (§6.4).
    batch
        Overlap pairs per step (``|S| ≥ 2``: with one, K and the loss give ``u^B``).
    protect, noise
        ``ξ_i = η_i·α_L·Φ``, ``η_i ~ N(0, (noise/2)²)``: noise on the label part of each
        gradient row (:func:`protect_noise`); ``none`` needs ``allow_label_leak``.
    classes
        Label classes: FTL is binary only.
    """

    d: int = 8
    alpha: float = 1.0
    gamma: float = 0.0
    batch: int = 64
    protect: FtlProtect = FtlProtect.GAUSSIAN
    noise: float = 1.0
    allow_label_leak: bool = False
    reveal_overlap_repr: bool = False
    classes: int = 2

    def __post_init__(self) -> None:
        if self.classes > 2:
            raise ConfigError(f"FTL is binary only (§6.1); the labels have {self.classes} classes")
        if self.batch < 2:
            raise ConfigError(
                f"batch = {self.batch}: FTL needs at least 2 overlap pairs per step (with one, "
                "K and the loss reveal the host's representation, §6.3)"
            )
        if self.d < 1 or not self.alpha > 0 or self.gamma < 0 or self.noise < 0:
            raise ConfigError("FTL needs d >= 1, alpha > 0, gamma >= 0 and noise >= 0")
        if self.gamma > 0 and not self.reveal_overlap_repr:
            raise InsecureConfigError(
                f"gamma = {self.gamma} > 0: the alignment loss reveals both parties' overlap "
                "representations to each other (§6.4); set ftl_reveal_overlap_repr = true to "
                "accept that, or keep gamma = 0"
            )
        if self.protect is FtlProtect.NONE and not self.allow_label_leak:
            raise InsecureConfigError(
                "protect = none lets the host recover every overlap label up to one sign "
                "(§6.3); set allow_label_leak = true to accept that, or use gaussian"
            )

    @property
    def kappa(self) -> float:
        """``κ = 1/d``."""
        return 1.0 / self.d


def representation_net(in_features: int, widths: tuple[int, ...], d: int) -> nn.Module:
    """``Net^A`` / ``Net^B``: an MLP to width ``d`` with a tanh output (``|u| ≤ 1``, so
    every encoding stays inside its bound). ``widths = ()``: a linear representation, one
    linear layer to ``d`` (then the tanh)."""
    if any(w < 1 for w in widths):
        raise ConfigError(f"widths {list(widths)} must be >= 1 ([] for a linear representation)")
    return nn.Sequential(MLP(in_features=in_features, widths=(*widths, d)), nn.Tanh())


def to_signs(labels: np.ndarray) -> np.ndarray:
    """Labels 0/1 (or ±1) as ``y ∈ {−1, +1}``."""
    y = np.asarray(labels, dtype=np.float64)
    if not np.all(np.isin(y, (0.0, 1.0, -1.0))):
        raise ConfigError("FTL labels must be binary (0/1 or -1/+1)")
    return np.where(y > 0, 1.0, -1.0)


def phi_of(u_a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Φ = (1/N_A) Σ_i y_i u^A_i`` (§6.1)."""
    return (y[:, None] * u_a).mean(dim=0)


def taylor_loss(
    phi: torch.Tensor,
    u_b: torch.Tensor,
    y: torch.Tensor,
    u_a_overlap: torch.Tensor,
    config: FtlConfig,
) -> torch.Tensor:
    """``α_L Σ ℓ1(y_i, Φ·u^B_i) + γ Σ (−κ u^A_i·u^B_i)`` (§6.1, without the λ term: that is
    the optimizers' weight decay)."""
    s = u_b @ phi
    prediction = math.log(2.0) - 0.5 * y * s + 0.125 * s**2
    alignment = -config.kappa * (u_a_overlap * u_b).sum(dim=1)
    return config.alpha * prediction.sum() + config.gamma * alignment.sum()


@dataclass(frozen=True)
class BatchTerms:
    """The plaintext formulas of §6.2 for one batch (the reference of test F1)."""

    grad_u_b: np.ndarray  # ∂L/∂u^B_i, B×d
    k: np.ndarray  # K = Σ c_i u^B_i, d
    loss: float


def batch_terms(
    phi: np.ndarray, u_b: np.ndarray, y: np.ndarray, u_a: np.ndarray, config: FtlConfig
) -> BatchTerms:
    """§6.2: ``c_i = −½y_i + ¼s_i``; ``∂L/∂u^B_i = α_L c_i Φ − γκu^A_i``; ``K``; ``L``."""
    s = u_b @ phi
    c = -0.5 * y + 0.25 * s
    grad = config.alpha * c[:, None] * phi[None, :] - config.gamma * config.kappa * u_a
    k = c @ u_b
    loss = config.alpha * float(np.sum(math.log(2.0) - 0.5 * y * s + 0.125 * s**2))
    loss += config.gamma * float(np.sum(-config.kappa * np.sum(u_a * u_b, axis=1)))
    return BatchTerms(grad_u_b=grad, k=k, loss=loss)


# -- encrypted steps --------------------------------------------------------------------


def encode_u(u: np.ndarray) -> np.ndarray:
    """``û = enc_{f_a}(u)`` (signed integers), after the bound check."""
    return encode(u, scale=F_A, bound=U_MAX)


def encrypt_phi(phi: np.ndarray, *, cipher: Cipher, pool: ObfuscatorPool) -> EncryptedTensor:
    """T0 (G): ``[[Φ̂]]`` as a d×1 column."""
    phi_hat = encode_u(phi).reshape(-1, 1)
    return encrypt(cipher, ring(phi_hat, cipher.key.n), pool=pool, scale=F_A)


def host_t1(
    u_b: np.ndarray,
    enc_phi: EncryptedTensor,
    *,
    cipher: Cipher,
    pool: ObfuscatorPool,
    executor: Executor,
) -> tuple[EncryptedTensor, EncryptedTensor]:
    """T1 (H): ``[[û]]`` (B×d) and ``[[q̂]] = Obf(Û ⊙ [[Φ̂]])`` (d×1, scale 3f_a)."""
    u_hat = encode_u(u_b)
    enc_u = encrypt(cipher, ring(u_hat, cipher.key.n), pool=pool, scale=F_A)
    gram = u_hat.T.dot(u_hat)  # Û = Σ_i û_i û_iᵀ, exact integers (scale 2f_a)
    enc_q = plain_matmul(gram, enc_phi, executor=executor, scale=3 * F_A).obfuscate(pool)
    return enc_u, enc_q


def _transpose(t: EncryptedTensor) -> EncryptedTensor:
    return EncryptedTensor(cipher=t.cipher, values=t.values.T.copy(), scale=t.scale)


@dataclass(frozen=True)
class GuestBatch:
    """What G computes from H's T1 message (T2, T4, T5)."""

    g_b: EncryptedTensor  # [[ĝ^B]] B×d, scale 3f_a, obfuscated (T2, to H)
    four_k: EncryptedTensor  # [[4K]] 1×d, scale 3f_a, obfuscated (T4, to A)
    lam: EncryptedTensor  # [[Λ]] 1×1, scale 4f_a, obfuscated (T5, to A)


def guest_batch(
    enc_u: EncryptedTensor,
    enc_q: EncryptedTensor,
    *,
    phi: np.ndarray,
    y: np.ndarray,
    addend: np.ndarray,
    config: FtlConfig,
    cipher: Cipher,
    pool: ObfuscatorPool,
    executor: Executor,
) -> GuestBatch:
    """T2, T4, T5 at G. ``addend`` is ``−γκu^A_i + ξ_i`` (B×d, gradient units)."""
    n = cipher.key.n
    phi_hat = encode_u(phi)
    two_f = 1 << (2 * F_A)
    y_int = np.array([int(v) for v in y], dtype=object)
    # T2: [[ŝ]]ᵀ = Φ̂ᵀ [[û]]ᵀ (1×B, scale 2f_a); [[4c]] = [[ŝ]] ⊕ (−2y·2^{2f_a})
    enc_u_t = _transpose(enc_u)
    s_row = plain_matmul(phi_hat.reshape(1, -1), enc_u_t, executor=executor, scale=2 * F_A)
    four_c = s_row.add_plain(ring((-2 * y_int * two_f).reshape(1, -1), n))
    # [[ĝ]]ᵀ = Φ̂ ⊙ [[4c]] (d×B, scale 3f_a) ⊕ enc_{3f_a}((4/α_L)·addend)ᵀ
    g_t = plain_matmul(phi_hat.reshape(-1, 1), four_c, executor=executor, scale=3 * F_A)
    extra = encode((4.0 / config.alpha) * addend.T, scale=3 * F_A, bound=LOSS_BOUND)
    g_b = _transpose(g_t.add_plain(ring(extra, n))).obfuscate(pool)
    # T4: [[4K]] = (−2y·2^{2f_a})ᵀ [[û]] ⊕ [[q̂]]ᵀ (1×d, scale 3f_a)
    weights = (-2 * y_int * two_f).reshape(1, -1)
    label_part = plain_matmul(weights, enc_u, executor=executor, scale=3 * F_A)
    four_k = (label_part + _transpose(enc_q)).obfuscate(pool)
    # T5: [[Λ]] = (−4y·2^{2f_a})ᵀ[[ŝ]] ⊕ Φ̂ᵀ[[q̂]] (1×1, scale 4f_a)
    s_col = _transpose(s_row)
    first = plain_matmul((-4 * y_int * two_f).reshape(1, -1), s_col, executor=executor, scale=0)
    second = plain_matmul(phi_hat.reshape(1, -1), enc_q, executor=executor, scale=0)
    lam = EncryptedTensor(cipher=cipher, values=(first + second).values, scale=4 * F_A)
    return GuestBatch(g_b=g_b, four_k=four_k, lam=lam.obfuscate(pool))


def decode_g_b(residues: np.ndarray, *, n: mpz, config: FtlConfig) -> np.ndarray:
    """T3 (H): ``∂L/∂u^B = (α_L/4)·dec_{3f_a}(ĝ^B)``."""
    return (config.alpha / 4.0) * decode(residues, n, scale=3 * F_A, bound=LOSS_BOUND)


def decode_k(residues: np.ndarray, *, n: mpz) -> np.ndarray:
    """T4 (G): ``K = dec_{3f_a}(4K)/4``."""
    return decode(residues, n, scale=3 * F_A, bound=LOSS_BOUND).reshape(-1) / 4.0


def decode_loss(residues: np.ndarray, *, n: mpz, rows: int, config: FtlConfig) -> float:
    """T5 (G): ``L = α_L(|S|·log 2 + Λ/8)`` (prediction part)."""
    lam = float(decode(residues, n, scale=4 * F_A, bound=LOSS_BOUND).reshape(-1)[0])
    return config.alpha * (rows * math.log(2.0) + lam / 8.0)


def protect_noise(
    phi: np.ndarray, rows: int, *, config: FtlConfig, generator: np.random.Generator
) -> np.ndarray:
    """``ξ`` of T2 (B×d): zeros with ``protect = none``; else ``ξ_i = η_i·α_L·Φ`` with
    ``η_i ~ N(0, (noise/2)²)``. With γ = 0 every gradient row is ``α_L c_i Φ``, so noise
    orthogonal to Φ would protect nothing: it goes along Φ, where it blurs the label part
    ``−y_i/2`` of ``c_i`` (the §6.3 attack then reads each label right with probability
    ``Φ_N(1/noise)``, e.g. 0.84 at noise 1, instead of 1)."""
    if config.protect is FtlProtect.NONE or config.noise == 0:
        return np.zeros((rows, config.d))
    eta = generator.normal(0.0, config.noise / 2.0, size=rows)
    return config.alpha * eta[:, None] * np.asarray(phi, dtype=np.float64)[None, :]
