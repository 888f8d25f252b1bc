"""FTL math and encrypted batch flow (docs/protocol.md §6.2-6.3; tests F1, F2, and the label
attack of F3 at the formula level)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.errors import ConfigError, InsecureConfigError
from protocols.executor import InlineExecutor
from vfl.common import checkpoint
from vfl.transfer.ftl import (
    FtlConfig,
    FtlProtect,
    batch_terms,
    decode_g_b,
    decode_k,
    decode_loss,
    encrypt_phi,
    guest_batch,
    host_t1,
    phi_of,
    representation_net,
    taylor_loss,
)
from vfl.transfer.inprocess import FtlRun, run_in_process
from vfl.transfer.session import FtlDecTag, FtlJob, FtlSpec


@pytest.fixture(scope="module")
def pool(pk: PublicKey) -> Iterator[ObfuscatorPool]:
    p = ObfuscatorPool(pk, executor=InlineExecutor())
    p.fill(300)
    yield p
    p.close()


def random_batch(
    seed: int, *, rows: int = 6, d: int = 4, labelled: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u_a_all = rng.normal(scale=0.5, size=(labelled, d))
    y_all = np.where(rng.random(labelled) < 0.5, -1.0, 1.0)
    phi = (y_all[:, None] * u_a_all).mean(axis=0)
    u_b = rng.normal(scale=0.5, size=(rows, d))
    y = y_all[:rows]
    return phi, u_b, y, u_a_all[:rows]


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_f1_formulas_equal_autograd_of_the_taylor_loss(gamma: float) -> None:
    """§6.2 gradients, K and loss == torch.autograd of the Taylor loss (float64)."""
    config = FtlConfig(d=4, gamma=gamma, reveal_overlap_repr=gamma > 0, alpha=0.7)
    labelled = 20
    rng = np.random.default_rng(1)
    u_a_all = torch.tensor(rng.normal(scale=0.5, size=(labelled, 4)), requires_grad=True)
    y_all = torch.tensor(np.where(rng.random(labelled) < 0.5, -1.0, 1.0))
    u_b = torch.tensor(rng.normal(scale=0.5, size=(6, 4)), requires_grad=True)
    phi = phi_of(u_a_all, y_all)
    loss = taylor_loss(phi, u_b, y_all[:6], u_a_all[:6], config)
    loss.backward()
    assert u_b.grad is not None and u_a_all.grad is not None
    terms = batch_terms(
        phi.detach().numpy(),
        u_b.detach().numpy(),
        y_all[:6].numpy(),
        u_a_all[:6].detach().numpy(),
        config,
    )
    np.testing.assert_allclose(terms.grad_u_b, u_b.grad.numpy(), atol=1e-12)
    assert terms.loss == pytest.approx(float(loss.detach()), abs=1e-12)
    # ∂L/∂u^A_j = α_L y_j K / N_A (+ −γκ u^B_j on the overlap rows)
    expected = config.alpha * y_all.numpy()[:, None] * terms.k[None, :] / labelled
    expected[:6] -= gamma * config.kappa * u_b.detach().numpy()
    np.testing.assert_allclose(u_a_all.grad.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_f1_encrypted_flow_equals_the_formulas(
    pk: PublicKey, sk: PrivateKey, pool: ObfuscatorPool, gamma: float
) -> None:
    """T0-T5 under Paillier (decrypted here with the test key) == the plaintext formulas."""
    config = FtlConfig(
        d=4,
        gamma=gamma,
        reveal_overlap_repr=gamma > 0,
        protect=FtlProtect.NONE,
        allow_label_leak=True,
    )
    phi, u_b, y, u_a = random_batch(2)
    cipher = PaillierCipher(pk)
    executor = InlineExecutor()
    enc_phi = encrypt_phi(phi, cipher=cipher, pool=pool)  # T0
    enc_u, enc_q = host_t1(u_b, enc_phi, cipher=cipher, pool=pool, executor=executor)  # T1
    addend = -gamma * config.kappa * u_a
    out = guest_batch(
        enc_u,
        enc_q,
        phi=phi,
        y=y,
        addend=addend,
        config=config,
        cipher=cipher,
        pool=pool,
        executor=executor,
    )
    assert out.g_b.obfuscated and out.four_k.obfuscated and out.lam.obfuscated

    def dec(t: object) -> np.ndarray:
        values = t.values  # type: ignore[attr-defined]
        flat = [sk.decrypt(v) for v in values.reshape(-1)]
        return np.array(flat, dtype=object).reshape(values.shape)

    n = pk.n
    reference = batch_terms(phi, u_b, y, u_a, config)
    np.testing.assert_allclose(
        decode_g_b(dec(out.g_b), n=n, config=config), reference.grad_u_b, atol=1e-6
    )
    np.testing.assert_allclose(decode_k(dec(out.four_k), n=n), reference.k, atol=1e-6)
    if gamma > 0:  # F3: what H decrypts holds G's overlap representations (§6.4)
        without = batch_terms(phi, u_b, y, np.zeros_like(u_a), config).grad_u_b
        np.testing.assert_allclose(
            decode_g_b(dec(out.g_b), n=n, config=config) - without,
            -gamma * config.kappa * u_a,
            atol=1e-6,
        )
    loss = decode_loss(dec(out.lam), n=n, rows=len(y), config=config)
    prediction_only = batch_terms(
        phi, u_b, y, u_a, FtlConfig(d=4, protect=FtlProtect.NONE, allow_label_leak=True)
    )
    assert loss == pytest.approx(prediction_only.loss, abs=1e-6)


def test_f2_refusals() -> None:
    with pytest.raises(InsecureConfigError, match="ftl_reveal_overlap_repr"):
        FtlConfig(gamma=0.1)
    with pytest.raises(InsecureConfigError, match="allow_label_leak"):
        FtlConfig(protect=FtlProtect.NONE)
    with pytest.raises(ConfigError, match="at least 2 overlap pairs"):
        FtlConfig(batch=1)
    with pytest.raises(ConfigError, match="binary only"):
        FtlConfig(classes=3)
    with pytest.raises(ConfigError, match=r"\[\] gives a linear representation"):
        FtlJob(guest_widths=(0,))


def test_empty_widths_give_a_linear_representation() -> None:
    """``guest_widths = ()``: one linear layer to d, then the tanh bound."""
    job = FtlJob(guest_widths=(), host_widths=())
    assert FtlJob.from_json(job.to_json()) == job
    net = representation_net(5, job.guest_widths, 3)
    assert [type(m).__name__ for m in net.modules() if not list(m.children())] == [
        "Linear",
        "Tanh",
    ]
    assert net(torch.randn(4, 5) * 100).abs().max() <= 1.0


def test_f3_without_protection_the_host_recovers_every_overlap_label() -> None:
    """§6.3: with ξ = 0 each ∂L/∂u^B_i is a multiple of Φ and H recovers every label up to
    one global sign; with the default protection the same attack fails on many rows."""
    rng = np.random.default_rng(3)
    d, rows = 8, 200
    phi = rng.normal(scale=0.3, size=d)
    u_b = rng.normal(scale=0.5, size=(rows, d))
    y = np.where(rng.random(rows) < 0.3, 1.0, -1.0)
    leak = FtlConfig(d=d, protect=FtlProtect.NONE, allow_label_leak=True)

    def attack(grads: np.ndarray) -> float:
        e = grads[0] / np.linalg.norm(grads[0])
        a = grads @ e / leak.alpha
        b = u_b @ e
        # a_i − λ²b_i/4 = −(λ/2) y_i: fit λ² from the common magnitude, read the signs
        lam2 = min((np.std(np.abs(a - t * b / 4)), t) for t in np.linspace(0.0, 4.0, 4001))[1]
        signs = np.sign(-(a - lam2 * b / 4))
        agree = float(np.mean(signs == y))
        return max(agree, 1 - agree)

    clean = batch_terms(phi, u_b, y, np.zeros((rows, d)), leak).grad_u_b
    assert attack(clean) == 1.0
    from vfl.transfer.ftl import protect_noise

    noisy = clean + protect_noise(phi, rows, config=FtlConfig(d=d), generator=rng)
    assert attack(noisy) < 0.9
    assert math.isfinite(attack(noisy))


def ftl_data() -> dict[str, np.ndarray]:
    """Synthetic guest (300 labelled rows) and host (260 rows, 120 of them shared)."""
    rng = np.random.default_rng(0)
    n_guest, n_host, n_overlap = 300, 260, 120
    latent = rng.normal(size=(n_guest + n_host, 2))
    y_all = latent[:, 0] + 0.5 * latent[:, 1] + 0.3 * rng.normal(size=len(latent)) > 0
    xg = np.c_[latent @ rng.normal(size=(2, 5)), rng.normal(size=(len(latent), 2))]
    xh = np.c_[latent @ rng.normal(size=(2, 4)), rng.normal(size=(len(latent), 1))]
    guest_ids = np.arange(n_guest)  # the host holds ids 180..439: 120 shared
    host_ids = np.arange(n_guest - n_overlap, n_guest - n_overlap + n_host)
    shared = np.intersect1d(guest_ids, host_ids)
    return {
        "guest_features": xg[guest_ids],
        "guest_labels": y_all[guest_ids].astype(float),
        "guest_overlap": np.searchsorted(guest_ids, shared),
        "host_features": xh[host_ids],
        "host_overlap": np.searchsorted(host_ids, shared),
        "host_labels": y_all[host_ids],
    }


def small_job(epochs: int = 3) -> FtlJob:
    return FtlJob(
        job_id="ftl-small",
        config=FtlConfig(d=4, batch=16, noise=0.5),
        guest_widths=(8,),
        host_widths=(8,),
        epochs=epochs,
        patience=5,
        host_lr=0.02,
        guest_lr=0.05,
    )


def run_small(**kwargs: Any) -> FtlRun:
    data = ftl_data()
    data.pop("host_labels")
    return run_in_process(
        **data,
        executor=InlineExecutor(),
        key_bits=1024,
        allow_test_key=True,
        seed=2,
        **kwargs,
    )


def test_ftl_job_in_process_learns_and_scores() -> None:
    """R1-R5 between an in-process guest, host and the real arbiter service: the loss falls,
    the host's customers outside the overlap are scored well, and A served exactly the
    policy's decryptions (F3: only the policy's tags, for the parties it names)."""
    local = run_small(job=small_job())
    result = local.result
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["val_roc_auc"] > 0.7  # validation on probabilities, not logits
    data = ftl_data()
    outside = np.setdiff1d(np.arange(len(data["host_features"])), data["host_overlap"])
    assert result.scores is not None and len(result.scores) == len(outside)
    assert roc_auc_score(data["host_labels"][outside], result.scores) > 0.7
    steps = (120 - round(0.2 * 120)) // 16 * result.epochs
    assert local.decryptions[FtlDecTag.GB.value] == steps * 16 * 4
    assert local.decryptions[FtlDecTag.K.value] == steps * 4
    assert local.decryptions[FtlDecTag.LOSS.value] == steps
    assert set(local.decryptions) == {t.value for t in FtlDecTag}
    spec = FtlSpec(job_id="x", key_id="00", key_bits=1024, batch=16, d=4, guest="g", host="h")
    rules = {r.tag: r.requester for r in spec.policy().rules}
    assert rules[FtlDecTag.GB.value] == "h"
    assert {rules[t.value] for t in (FtlDecTag.K, FtlDecTag.LOSS, FtlDecTag.VAL)} == {"g"}


def test_a_stopped_ftl_job_resumes_from_its_epoch_checkpoints(tmp_path: Path) -> None:
    """R6: the guest fails after epoch 2; the next run resumes at the newest epoch both
    parties saved, keeps the earlier history and finishes; each state file is owner-only."""

    def fail_after_two(record: dict[str, Any]) -> None:
        if record["epoch"] == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_small(job=small_job(4), state_dir=tmp_path, progress=fail_after_two, timeout=20)
    first = json.loads(
        (
            tmp_path / "guest" / "jobs" / "ftl-small" / "ftl" / "step-000000001" / "state.json"
        ).read_text()
    )["history"]
    assert [h["epoch"] for h in first] == [1.0]
    again = run_small(job=small_job(4), state_dir=tmp_path)
    history = again.result.history
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    assert history[0] == first[0]  # carried over, not retrained
    for party in ("guest", "host"):
        folder = tmp_path / party / "jobs" / "ftl-small" / "ftl"
        assert checkpoint.available_steps(folder)
        for path in folder.rglob("*"):
            if path.is_file():
                assert oct(path.stat().st_mode & 0o777) == "0o600", path
