"""Split-NN security tests S4-S12 of docs/protocol.md §8.3: what each party's view contains.

The parties are the real protocol classes — :class:`GuestLayer`, :class:`HostLayer` and the
arbiter's :class:`ArbiterService` (jobs registered by ``JOB_SPEC`` envelopes over the wire) —
on in-memory channels whose transport records every envelope each party receives
(:mod:`tests.vfl.transcripts`), with a small (1024-bit) test key and :class:`InlineExecutor`.
Nothing of the crypto is mocked.

Statistical tests are deterministic: the test-only randomness hook of §2.3
(:func:`protocols.arbiter.masked.sample_masks` with a seeded ``randbelow``) gives the
decryption masks, the shares ``E`` come from the same kind of seeded stream (one per party
thread), and the test key is made from seeded primes (every mask and P0 share is drawn mod
n, so the session's random key would change every statistic). The obfuscators stay random.
Thresholds are those of §8.3 (KS p > 0.01, ``|corr| < 4/√N``) for these fixed seeds; every
statistical assertion comes with a control showing that the same statistic rejects the
broken property. A change in the order in which the protocol draws its randomness changes
the samples, and may then need another seed.

Tests already covered elsewhere and not repeated here: the arbiter's reply cache, refusals
of wrong requesters/counts and of a non-identical repeat (tests/protocols/crypto/test_arbiter.py),
disagreeing policies (test_arbiter.py, tests/vfl/test_splitnn_spec.py), the §4.9 formulas on
the worked example (test_splitnn_spec.py), and C3's pool audit (test_paillier.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import gmpy2
import numpy as np
import pytest
from gmpy2 import mpz

from protocols.arbiter import masked
from protocols.arbiter.masked import MaskedDecryptionClient
from protocols.arbiter.service import ArbiterService, SetupTag
from protocols.crypto.cipher import Cipher, PaillierCipher
from protocols.crypto.counters import OpCounts, snapshot
from protocols.crypto.fixed_base import multi_exp
from protocols.crypto.fixedpoint import FixedPointConfig, decode, encode, lift, ring
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.packing import unpack_rows
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.policy import DecryptionPolicy
from protocols.crypto.tensor import EncryptedTensor, encrypt, plain_matmul
from protocols.envelope import CipherBlock, ControlBlock, Envelope, IndexBlock
from protocols.errors import (
    ConfigError,
    DecodingOverflowError,
    EncodingBoundError,
    PolicyViolationError,
    ProtocolError,
    TransportError,
)
from protocols.executor import InlineExecutor
from protocols.roles import Party
from protocols.tags import TagRegistry
from protocols.transport.inmemory import InMemoryChannel, InMemoryNetwork
from tests.conftest import ARBITER, BANK, RETAILER
from tests.vfl.transcripts import (
    TranscriptBook,
    cipher_count,
    plain_residues,
    recording_channel_class,
)
from vfl.privacy.label_protection import ProtectConfig, ProtectMode, protect
from vfl.splitnn import interactive
from vfl.splitnn.interactive import BIG_L, GuestLayer, HostLayer, SplitTag
from vfl.splitnn.reference import InteractiveReference
from vfl.splitnn.spec import DecTag, JobSpec, SplitMode
from vfl.splitnn.training import TrainConfig

FP = FixedPointConfig()
TIMEOUT = 30.0
GUEST_THREAD = "MainThread"  # the guest runs in the test's thread, the host in HOST_THREAD
HOST_THREAD = "host"
STEP_TAGS = {
    t.value for t in (SplitTag.F1, SplitTag.B1, SplitTag.B2_1, SplitTag.B2_2, SplitTag.B2_3)
}
DEC_TAGS = {t.value for t in DecTag} - {DecTag.INF_Z.value}  # training only; scoring: test_scoring
EVALUATED_TAGS = {t.value for t in (SplitTag.INIT_WG, SplitTag.F1, SplitTag.B1, SplitTag.B2_2)}


# ---------------------------------------------------------------------------------------------
# statistics (asymptotic Kolmogorov distribution with Stephens' small-sample correction)


def kolmogorov_sf(lam: float) -> float:
    """``P(K > λ)`` for the Kolmogorov distribution.

    Parameters
    ----------
    lam
        The scaled KS statistic.

    Returns
    -------
    float
        The tail probability.
    """
    if lam < 0.2:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = 2.0 * (-1.0) ** (j - 1) * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-16:
            break
    return min(1.0, max(0.0, total))


def ks_pvalue(sample: Sequence[float], cdf: Callable[[float], float]) -> float:
    """One-sample KS test of ``sample`` against ``cdf``.

    Parameters
    ----------
    sample
        The observations.
    cdf
        The hypothesised continuous distribution function.

    Returns
    -------
    float
        The p-value.
    """
    xs = sorted(sample)
    n = len(xs)
    d = max(max((i + 1) / n - cdf(x), cdf(x) - i / n) for i, x in enumerate(xs))
    root = math.sqrt(n)
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * d)


def ks_2samp_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample KS test: were ``a`` and ``b`` drawn from the same distribution?

    Parameters
    ----------
    a, b
        The two samples.

    Returns
    -------
    float
        The p-value.
    """
    sa, sb = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    both = np.concatenate([sa, sb])
    cdf_a = np.searchsorted(sa, both, side="right") / sa.size
    cdf_b = np.searchsorted(sb, both, side="right") / sb.size
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    root = math.sqrt(sa.size * sb.size / (sa.size + sb.size))
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * d)


def uniform01(x: float) -> float:
    """CDF of U(0, 1)."""
    return min(1.0, max(0.0, x))


def uniform_centred(x: float) -> float:
    """CDF of U(−½, ½)."""
    return min(1.0, max(0.0, x + 0.5))


def triangular(x: float) -> float:
    """CDF of Triangular(−1, 0, 1), the law of the difference of two U(−½, ½)."""
    if x <= -1.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    return (x + 1.0) ** 2 / 2.0 if x < 0 else 1.0 - (1.0 - x) ** 2 / 2.0


def scaled(values: Sequence[int]) -> list[float]:
    """Big signed integers divided by the largest magnitude (exact division, then rounded)."""
    top = max(abs(int(v)) for v in values) or 1
    return [int(v) / top for v in values]


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of two equally long samples."""
    return float(
        np.corrcoef(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))[0, 1]
    )


def corr_bound(n: int) -> float:
    """The §8.3 bound ``4/√N`` on an empirical correlation that should be zero."""
    return 4.0 / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# a fixed test key and the seeded randomness hook (§2.3, test only)


def fixed_keypair(bits: int = 1024, seed: int = 83) -> tuple[PublicKey, PrivateKey]:
    """A small test key from seeded primes (the same in every session).

    The session's key (``tests/conftest.py``) is random, and every share and mask is drawn
    mod n, so seeded statistics are only reproducible with a fixed modulus.
    """
    rng = random.Random(seed)
    top = (1 << (bits // 2 - 1)) | (1 << (bits // 2 - 2))  # p·q then has exactly ``bits`` bits
    p, q = (gmpy2.next_prime(mpz(rng.getrandbits(bits // 2) | top)) for _ in range(2))
    n = p * q
    h_s = gmpy2.powmod(mpz(rng.randrange(2, int(n))), n, n * n)
    public = PublicKey(n=n, h_s=h_s, bits=bits)
    return public, PrivateKey(public=public, p=p, q=q)


@pytest.fixture(scope="module")
def keypair() -> tuple[PublicKey, PrivateKey]:
    """This module's test key (overrides the session's random one)."""
    return fixed_keypair()


@pytest.fixture(scope="module")
def pk(keypair: tuple[PublicKey, PrivateKey]) -> PublicKey:
    """The public half of :func:`keypair`."""
    return keypair[0]


@pytest.fixture(scope="module")
def sk(keypair: tuple[PublicKey, PrivateKey]) -> PrivateKey:
    """The private half of :func:`keypair`."""
    return keypair[1]


class SeededRandomness:
    """Seeded streams per (thread, purpose) for the shares and the decryption masks.

    Installed by :func:`seeded`: ``interactive.secrets`` (what ``fresh_share`` draws ``E``
    from) and ``masked.sample_masks`` (the masks of every masked decryption). The masks
    each thread drew are kept, in order, so a test can unmask what the arbiter saw.

    Parameters
    ----------
    seed
        The run's seed; each party thread gets its own stream from it.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], random.Random] = {}
        self.masks: dict[str, list[list[mpz]]] = {}

    def _stream(self, purpose: str) -> random.Random:
        key = (threading.current_thread().name, purpose)
        with self._lock:
            if key not in self._streams:
                self._streams[key] = random.Random(f"{self.seed}/{key[0]}/{purpose}")
            return self._streams[key]

    def randbelow(self, bound: int) -> int:
        """Stand-in for ``secrets.randbelow`` in the interactive layer (the shares)."""
        return self._stream("shares").randrange(bound)

    def sample_masks(self, n: mpz, count: int, **_: Any) -> list[mpz]:
        """The real sampler, with the test-only ``randbelow`` hook, recording the masks."""
        out = REAL_SAMPLE_MASKS(n, count, randbelow=self._stream("masks").randrange)
        with self._lock:
            self.masks.setdefault(threading.current_thread().name, []).append(out)
        return out


REAL_SAMPLE_MASKS = masked.sample_masks


@contextmanager
def seeded(seed: int) -> Iterator[SeededRandomness]:
    """Install :class:`SeededRandomness` for the duration of a run."""
    hook = SeededRandomness(seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interactive, "secrets", hook)
        mp.setattr(masked, "sample_masks", hook.sample_masks)
        yield hook


# ---------------------------------------------------------------------------------------------
# three parties, a job registered over the wire, and a driver for init + steps


@dataclass
class Trio:
    """Three recording channels and the arbiter serving decryptions and setup messages."""

    book: TranscriptBook
    channels: dict[str, InMemoryChannel]
    service: ArbiterService
    policy: DecryptionPolicy

    def close(self) -> None:
        """Close every channel (wakes any party still waiting)."""
        for ch in self.channels.values():
            ch.close()


def make_trio(pk: PublicKey, sk: PrivateKey) -> Trio:
    """A fresh network of G, H and A; A answers ``DecTag`` requests and ``JOB_SPEC``."""
    net, book = InMemoryNetwork(), TranscriptBook()
    cls = recording_channel_class(book)
    channels = {
        p.party_id: net.channel(
            p, tags=TagRegistry([SplitTag, DecTag, SetupTag]), channel_class=cls
        )
        for p in (BANK, RETAILER, ARBITER)
    }
    policy = DecryptionPolicy()
    service = ArbiterService(
        channel=channels["arbiter"],
        cipher=PaillierCipher(pk),
        private_key=sk,
        policy=policy,
        executor=InlineExecutor(),
    )
    service.serve(DecTag)
    service.serve_setup(lambda obj: JobSpec.from_json(obj).policy())
    return Trio(book=book, channels=channels, service=service, policy=policy)


def job_spec(pk: PublicKey, mode: SplitMode, b: int, d: int, k: int, name: str) -> JobSpec:
    """The JOB_SPEC of a training job with ``B = batch_eval = b``."""
    return JobSpec(
        job_id=f"{name}-{mode.value}-{uuid.uuid4().hex[:8]}",
        key_id=pk.key_id.hex(),
        key_bits=pk.bits,
        mode=mode,
        batch=b,
        d=d,
        k=k,
        batch_eval=b,
        guest=BANK.party_id,
        host=RETAILER.party_id,
        steps_per_epoch=64,  # a schedule long enough for every test
        eval_steps=64,
    )


def submit_specs(trio: Trio, guest_spec: JobSpec, host_spec: JobSpec) -> list[dict[str, Any]]:
    """G and H each send their ``JOB_SPEC`` to A; A's ``JOB_READY`` replies (G's, H's)."""
    parties: list[tuple[Party, JobSpec]] = [(BANK, guest_spec), (RETAILER, host_spec)]
    for party, spec in parties:
        trio.channels[party.party_id].send(
            Envelope(
                job_id=spec.job_id,
                sender=party,
                receiver=ARBITER,
                tag=SetupTag.JOB_SPEC,
                body=ControlBlock.from_obj(spec.to_json()),
            )
        )
    out = []
    for party, spec in parties:
        reply = trio.channels[party.party_id].recv(
            job_id=spec.job_id, sender=ARBITER, tag=SetupTag.JOB_READY, step=0, timeout=TIMEOUT
        )
        assert isinstance(reply.body, ControlBlock)
        out.append(reply.body.obj())
    return out


def make_layers(trio: Trio, spec: JobSpec, pk: PublicKey) -> tuple[GuestLayer, HostLayer]:
    """Register ``spec`` at A over the wire and build both parties' layers."""
    assert all("refused" not in r for r in submit_specs(trio, spec, spec))
    cipher, executor = PaillierCipher(pk), InlineExecutor()
    guest = GuestLayer(
        channel=trio.channels["bank"],
        peer=RETAILER,
        arbiter=ARBITER,
        spec=spec,
        cipher=cipher,
        pool=ObfuscatorPool(pk, executor=executor),
        executor=executor,
        fp=FP,
        timeout=TIMEOUT,
    )
    host = HostLayer(
        channel=trio.channels["retailer"],
        peer=BANK,
        arbiter=ARBITER,
        spec=spec,
        cipher=cipher,
        pool=ObfuscatorPool(pk, executor=executor),
        executor=executor,
        fp=FP,
        timeout=TIMEOUT,
    )
    return guest, host


def two_party(
    trio: Trio, guest_fn: Callable[[], None], host_fn: Callable[[], None]
) -> tuple[BaseException | None, BaseException | None]:
    """Run ``host_fn`` in the host thread and ``guest_fn`` here; the exception of each.

    If either side fails, every channel is closed so the other stops waiting at once.
    """
    errors: dict[str, BaseException] = {}

    def host() -> None:
        try:
            host_fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors["host"] = exc
            trio.close()

    thread = threading.Thread(target=host, name=HOST_THREAD)
    thread.start()
    try:
        guest_fn()
    except BaseException as exc:  # noqa: BLE001
        errors["guest"] = exc
        trio.close()
    thread.join(TIMEOUT + 10)
    assert not thread.is_alive(), "the host thread hangs"
    return errors.get("guest"), errors.get("host")


AlphaFn = Callable[[int, np.ndarray], np.ndarray]
DeltaFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class SplitRun:
    """Everything one run produced: inputs, outputs, per-step state and the transcripts.

    ``wg[t]``, ``enc_e[t]`` (at G) and ``e[t]``, ``enc_wg[t]`` (at H) are the states before
    step ``t``; index ``steps`` is the state after the last step.
    """

    trio: Trio
    spec: JobSpec
    guest: GuestLayer
    host: HostLayer
    hook: SeededRandomness
    eta: float
    w0_guest: np.ndarray
    w0_host: np.ndarray
    rows: list[np.ndarray] = field(default_factory=list)
    alphas: list[np.ndarray] = field(default_factory=list)
    deltas: list[np.ndarray] = field(default_factory=list)
    z: list[np.ndarray] = field(default_factory=list)
    g: list[np.ndarray] = field(default_factory=list)
    wg: list[np.ndarray] = field(default_factory=list)
    enc_e: list[np.ndarray] = field(default_factory=list)
    e: list[np.ndarray] = field(default_factory=list)
    enc_wg: list[np.ndarray] = field(default_factory=list)
    counts_after_init: OpCounts = field(default_factory=OpCounts)
    counts_at_end: OpCounts = field(default_factory=OpCounts)
    rho_after_init: tuple[int, int] = (0, 0)
    view: list[Decrypted] = field(default_factory=list)  # A's view, filled on first use

    @property
    def n(self) -> mpz:
        """The Paillier modulus."""
        return self.guest.n

    @property
    def steps(self) -> int:
        """Training steps run."""
        return len(self.z)

    def weights(self, t: int) -> np.ndarray:
        """``enc(W_t)`` from both shares (test only: nobody in the protocol can do this)."""
        total: np.ndarray = self.wg[t] + self.e[t]
        return total if self.spec.mode is SplitMode.P1 else lift(ring(total, self.n), self.n)

    def v_hat(self, t: int) -> np.ndarray:
        """``V̂_t`` as G applied it: ``W^G_t − W^G_{t+1}`` (mod n in P0)."""
        diff: np.ndarray = self.wg[t] - self.wg[t + 1]
        return diff if self.spec.mode is SplitMode.P1 else ring(diff, self.n)


def run_split(
    pk: PublicKey,
    sk: PrivateKey,
    spec: JobSpec,
    *,
    steps: int,
    alpha_fn: AlphaFn,
    delta_fn: DeltaFn,
    eta: float = 0.1,
    seed: int = 0,
) -> SplitRun:
    """Joint initialisation and ``steps`` training steps of the interactive layer.

    Parameters
    ----------
    pk, sk
        The test key pair.
    spec
        The job (registered at A over the wire by both parties).
    steps
        Training steps after the initialisation.
    alpha_fn
        ``(t, rows) -> α_t`` at the host.
    delta_fn
        ``(t, rows, z_h) -> δ̃_t`` at the guest.
    eta
        The interactive learning rate ``η_W``.
    seed
        Seed of the shares, the masks and the initial weight components.

    Returns
    -------
    SplitRun
        The run, with its channels still open (close with ``run.trio.close()``).
    """
    trio = make_trio(pk, sk)
    guest, host = make_layers(trio, spec, pk)
    rng = np.random.default_rng(seed)
    std = math.sqrt(1.0 / (spec.d + spec.k))  # W_0^X ~ N(0, σ_0²/2), σ_0² = 2/(d + k)
    w0_g, w0_h = rng.normal(0, std, (spec.d, spec.k)), rng.normal(0, std, (spec.d, spec.k))
    with seeded(seed) as hook:
        run = SplitRun(trio, spec, guest, host, hook, eta, w0_guest=w0_g, w0_host=w0_h)

        def host_side() -> None:
            host.init(w0_h)
            run.e.append(host.e.copy())
            run.enc_wg.append(host.enc_wg.values.copy())
            for t in range(steps):
                rows = host.rows_of(host.recv(SplitTag.BATCH, t), spec.batch)
                alpha, g = host.step(t, rows, functools.partial(alpha_fn, t))
                run.alphas.append(alpha)
                run.g.append(g)
                run.e.append(host.e.copy())
                run.enc_wg.append(host.enc_wg.values.copy())
                host.wait_ack(t)

        def guest_side() -> None:
            guest.init(w0_g)
            run.counts_after_init = snapshot()  # H's part of the init ends with INIT_E
            run.rho_after_init = (guest.pool.handed_out, host.pool.handed_out)
            run.wg.append(guest.wg.copy())
            run.enc_e.append(guest.enc_e.values.copy())
            for t in range(steps):
                rows = (np.arange(spec.batch) + t * spec.batch) % ROWS
                run.rows.append(rows)
                z, delta = guest.step(t, rows, functools.partial(delta_fn, t, rows), eta)
                guest.ack(t)
                run.z.append(z)
                run.deltas.append(delta)
                run.wg.append(guest.wg.copy())
                run.enc_e.append(guest.enc_e.values.copy())

        errors = two_party(trio, guest_side, host_side)
        run.counts_at_end = snapshot()
    for err in errors:
        if err is not None:
            raise err
    return run


# ---------------------------------------------------------------------------------------------
# two datasets of the same shapes (S4): real host features + true labels, and random host
# features + permuted labels


ROWS = 64


@dataclass(frozen=True)
class Dataset:
    """Host features, labels and a fixed top vector; α and δ̃ of a step from them."""

    features: np.ndarray
    projection: np.ndarray
    labels: np.ndarray
    top: np.ndarray
    random_alpha_seed: int | None = None

    def alpha(self, t: int, rows: np.ndarray) -> np.ndarray:
        """The host embedding of ``rows`` (fresh random features if so configured)."""
        if self.random_alpha_seed is not None:
            rng = np.random.default_rng([self.random_alpha_seed, t])
            return rng.uniform(-1.0, 1.0, (rows.size, self.projection.shape[1]))
        out: np.ndarray = np.tanh(self.features[rows] @ self.projection)
        return out

    def delta(self, t: int, rows: np.ndarray, z_h: np.ndarray) -> np.ndarray:
        """δ = ∂L/∂z of a logistic top ``σ(z·u)`` with the mean cross-entropy loss."""
        p = 1.0 / (1.0 + np.exp(-(z_h @ self.top)))
        out: np.ndarray = np.outer((p - self.labels[rows]) / rows.size, self.top)
        return out


def dataset(d: int, k: int, *, real: bool, seed: int = 5) -> Dataset:
    """The real dataset, or the same shapes with random features and permuted labels."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(ROWS, 6))
    labels = (features[:, 0] - features[:, 2] + 0.3 * rng.normal(size=ROWS) > 0).astype(float)
    projection, top = rng.normal(0, 0.6, (6, d)), rng.normal(0, 1.0, k)
    if real:
        return Dataset(features, projection, labels, top)
    return Dataset(features, projection, rng.permutation(labels), top, random_alpha_seed=seed + 1)


# P0: d·k = 48 shares per step; P1: two packed blocks per row (k = 12 > S = 7 at 1024 bits)
MAIN_SHAPES = {SplitMode.P0: (4, 8, 6, 6), SplitMode.P1: (4, 8, 12, 8)}  # (B, d, k, steps)


@pytest.fixture(scope="module")
def runs(pk: PublicKey, sk: PrivateKey) -> Iterator[dict[tuple[SplitMode, bool], SplitRun]]:
    """P0 and P1 runs on the real dataset (``True``) and on the random one (``False``)."""
    out = {}
    for mode, (b, d, k, steps) in MAIN_SHAPES.items():
        for real in (True, False):
            data = dataset(d, k, real=real)
            out[(mode, real)] = run_split(
                pk,
                sk,
                job_spec(pk, mode, b, d, k, "views"),
                steps=steps,
                alpha_fn=data.alpha,
                delta_fn=data.delta,
                seed=11 if real else 12,
            )
    yield out
    for run in out.values():
        run.trio.close()


# ---------------------------------------------------------------------------------------------
# what A saw, and what each request carried


@dataclass(frozen=True)
class Decrypted:
    """One value A decrypted: ``y = Dec(c ⊕ R) = m + R mod n`` and the carried ``m``."""

    tag: str
    step: int
    y: int
    m: int


def request_order(run: SplitRun) -> dict[str, list[tuple[str, int]]]:
    """The masked decryptions each party thread made, in order (the protocol's order)."""
    guest = [(tag.value, t) for t in range(run.steps) for tag in (DecTag.Z_FWD, DecTag.V_WUPD)]
    return {GUEST_THREAD: guest, HOST_THREAD: [(DecTag.G_BWD.value, t) for t in range(run.steps)]}


def arbiter_view(run: SplitRun, sk: PrivateKey) -> list[Decrypted]:
    """Every value A decrypted in ``run``, decrypted from A's own transcript with the key.

    Each value is checked against the reply the requester received, and paired with the
    requester's mask (from the seeded hook) to recover the plaintext ``m`` it carried.
    """
    if run.view:
        return run.view
    n = int(run.n)
    requests = {
        (env.tag, env.step): env for env in run.trio.book.envelopes(ARBITER.party_id, tags=DEC_TAGS)
    }
    replies = {
        (env.tag, env.step): env
        for party in (BANK, RETAILER)
        for env in run.trio.book.envelopes(party.party_id, tags=DEC_TAGS, sender="arbiter")
    }
    out: list[Decrypted] = []
    for thread, order in request_order(run).items():
        masks = run.hook.masks[thread]
        assert len(masks) == len(order)
        for (tag, step), mask in zip(order, masks, strict=True):
            block = requests[(tag, step)].body
            assert isinstance(block, CipherBlock)
            tensor = EncryptedTensor.from_block(
                block, cipher=PaillierCipher(sk.public), key_id=sk.public.key_id
            )
            ys = [int(sk.decrypt(c)) for c in tensor.values.reshape(-1)]
            assert ys == plain_residues([replies[(tag, step)]], sk.public.n_bytes)
            assert len(mask) == len(ys)
            out.extend(
                Decrypted(tag, step, y, (y - int(r)) % n) for y, r in zip(ys, mask, strict=True)
            )
    run.view = out
    return out


def signed(values: Sequence[int], n: mpz) -> list[int]:
    """``λ``: residues to signed integers."""
    half = (int(n) - 1) // 2
    return [int(v) if int(v) <= half else int(v) - int(n) for v in values]


def flat_ints(arrays: Sequence[np.ndarray]) -> list[int]:
    """Every element of ``arrays`` as a Python int."""
    return [int(v) for a in arrays for v in np.asarray(a, dtype=object).reshape(-1)]


def residue_forms(values: Sequence[int], n: mpz) -> set[int]:
    """``values`` as signed integers and as residues mod n (how either might appear)."""
    return {int(v) for v in values} | {int(v) % int(n) for v in values}


def unpacked(
    run: SplitRun, residues: Sequence[int], shape: tuple[int, ...], width: int
) -> list[int]:
    """P1: the slot values of packed residues of ``shape``; P0: the signed values."""
    if run.spec.mode is SplitMode.P0:
        return signed(residues, run.n)
    arr = np.empty(len(residues), dtype=object)
    arr[:] = [mpz(v) for v in residues]
    ints = unpack_rows(
        arr.reshape(shape), run.n, slot_bits=run.spec.slot_bits, slots=run.spec.slots, width=width
    )
    return flat_ints([ints])


# ---------------------------------------------------------------------------------------------
# S4 — the arbiter's view


def uniform_and_uncorrelated(values: Sequence[int], underlying: Sequence[int], n: mpz) -> bool:
    """S4's criterion: ``values/n`` pass KS against U(0, 1) and ``|corr| < 4/√N`` with the data."""
    u = [int(v) / int(n) for v in values]
    return ks_pvalue(u, uniform01) > 0.01 and abs(pearson(u, scaled(underlying))) < corr_bound(
        len(u)
    )


@pytest.mark.parametrize("mode", [SplitMode.P0, SplitMode.P1])
def test_s4_arbiter_view_is_uniform_and_independent_of_the_data(
    mode: SplitMode, runs: dict[tuple[SplitMode, bool], SplitRun], sk: PrivateKey
) -> None:
    """S4: A's decrypted values are U(Z_n) and do not depend on the data.

    Two datasets of the same shapes (real host features and true labels; random host
    features and permuted labels). For each, over all values and per tag: one-sample KS of
    ``Y/n`` against U(0, 1) (p > 0.01) and ``|corr(Y/n, λ(m))| < 4/√N`` with ``m`` the
    plaintext the request carried; between the datasets, two-sample KS (p > 0.01).
    Control: the same criterion rejects the unmasked ``m`` of every tag.
    """
    views = {real: arbiter_view(runs[(mode, real)], sk) for real in (True, False)}
    n = runs[(mode, True)].n
    b, d, k, steps = MAIN_SHAPES[mode]
    spec = runs[(mode, True)].spec
    assert len(views[True]) == steps * (b * spec.kappa_k + d * spec.kappa_k + b * spec.kappa_d)
    for real, view in views.items():
        ys, ms = [v.y for v in view], [v.m for v in view]
        assert uniform_and_uncorrelated(ys, signed(ms, n), n), f"A's view (real={real})"
        for tag in DEC_TAGS - {DecTag.Z_EVAL.value}:
            group = [v for v in view if v.tag == tag]
            underlying = signed([v.m for v in group], n)
            assert uniform_and_uncorrelated([v.y for v in group], underlying, n), tag
            # control: had A seen the unmasked value, the same criterion would reject it
            assert not uniform_and_uncorrelated([v.m for v in group], underlying, n), tag
    p_two = ks_2samp_pvalue(
        [v.y / int(n) for v in views[True]], [v.y / int(n) for v in views[False]]
    )
    assert p_two > 0.01, "A's values differ in distribution between the two datasets"


# ---------------------------------------------------------------------------------------------
# S5 — the arbiter's transcript


SETUP_TAGS = {SetupTag.JOB_SPEC.value, SetupTag.RESUME.value}


@pytest.mark.parametrize("mode", [SplitMode.P0, SplitMode.P1])
def test_s5_arbiter_receives_only_decryption_requests_in_policy_counts(
    mode: SplitMode, runs: dict[tuple[SplitMode, bool], SplitRun]
) -> None:
    """S5: A's transcript holds the two ``JOB_SPEC``s and ``DEC_REQ``s only, in policy counts.

    Every request is a cipher block from the tag's one requester; the count per
    ``(step, tag)``, summed over chunks, equals the JOB_SPEC's policy, for every step and
    no other; A's audit log agrees.
    """
    run = runs[(mode, True)]
    entries = run.trio.book.of(ARBITER.party_id)
    assert entries and all(r.status == "accepted" for r in entries)
    setup = sorted(
        (r.envelope.tag, r.envelope.sender.party_id)
        for r in entries
        if r.envelope.tag in SETUP_TAGS
    )
    assert setup == [(SetupTag.JOB_SPEC.value, "bank"), (SetupTag.JOB_SPEC.value, "retailer")]
    requests = [r.envelope for r in entries if r.envelope.tag not in SETUP_TAGS]
    assert all(env.tag in DEC_TAGS and isinstance(env.body, CipherBlock) for env in requests)
    rules = {rule.tag: rule for rule in run.spec.policy().rules}
    assert all(env.sender.party_id == rules[env.tag].requester for env in requests)
    per_step: dict[tuple[int, str], int] = {}
    for env in requests:
        per_step[(env.step, env.tag)] = per_step.get((env.step, env.tag), 0) + cipher_count([env])
    training = (DecTag.Z_FWD.value, DecTag.G_BWD.value, DecTag.V_WUPD.value)
    assert per_step == {(t, tag): rules[tag].count for t in range(run.steps) for tag in training}
    assert run.trio.policy.counts(run.spec.job_id) == {
        tag: run.steps * rules[tag].count for tag in training
    }


def test_s5_repeat_is_served_from_cache_extra_requests_and_mismatched_specs_refused(
    pk: PublicKey, sk: PrivateKey
) -> None:
    """S5: after a real P1 step, A answers a byte-identical repeat from its cache.

    Replaying G's recorded ``Z_FWD`` request (the exact wire envelope) is acknowledged as a
    duplicate and answered with the cached reply, byte for byte, with no new decryption;
    a different request for the served ``(step, tag)`` is refused, also without a
    decryption; ``JOB_SPEC``s that disagree (sent over the wire) make A refuse the job at
    both parties, and requests for it. The service-level cases live in
    tests/protocols/crypto/test_arbiter.py (``test_identical_repeat_is_answered_from_cache``,
    ``test_non_identical_repeat_is_refused``, ``test_wrong_requester_and_wrong_count_are_refused``,
    ``test_mismatching_job_specs_refuse_the_job``).
    """
    spec = job_spec(pk, SplitMode.P1, 2, 2, 2, "cache")
    data = dataset(2, 2, real=True)
    run = run_split(pk, sk, spec, steps=1, alpha_fn=data.alpha, delta_fn=data.delta, seed=3)
    book, bank = run.trio.book, run.trio.channels["bank"]
    try:
        (request,) = book.envelopes("arbiter", tags={DecTag.Z_FWD.value})
        (reply,) = book.envelopes("bank", tags={DecTag.Z_FWD.value}, sender="arbiter")
        before, served = snapshot(), run.trio.policy.counts(spec.job_id)
        seen_a, seen_g = len(book.of("arbiter")), len(book.of("bank"))
        bank.send(request)  # seq already set: the original bytes again
        assert book.wait_for("arbiter", seen_a + 1)[-1].status == "duplicate"
        resent = book.wait_for("bank", seen_g + 1)[-1]
        assert resent.status == "duplicate" and resent.envelope == reply  # the cached reply
        assert snapshot().decryptions == before.decryptions  # no new decryption

        client = MaskedDecryptionClient(channel=bank, arbiter=ARBITER, cipher=run.guest.cipher)
        other = encrypt(
            run.guest.cipher,
            np.zeros((spec.batch, spec.kappa_k), dtype=object),
            pool=run.guest.pool,
            scale=0,
        )
        with pytest.raises(PolicyViolationError, match="already served"):
            client.decrypt(other, job_id=spec.job_id, tag=DecTag.Z_FWD, step=0, run_id="extra")
        assert snapshot().decryptions == before.decryptions
        assert run.trio.policy.counts(spec.job_id) == served

        mine = job_spec(pk, SplitMode.P1, 2, 2, 2, "mismatch")
        theirs = dataclasses.replace(mine, batch=4)
        answers = submit_specs(run.trio, mine, theirs)
        assert all("disagrees" in a.get("refused", "") for a in answers)
        with pytest.raises(PolicyViolationError, match="no registered decryption policy"):
            client.decrypt(other, job_id=mine.job_id, tag=DecTag.Z_FWD, step=0)
    finally:
        run.trio.close()


# ---------------------------------------------------------------------------------------------
# S6 — the guest's view


def unmasked(run: SplitRun, sk: PrivateKey, tag: DecTag, width: int) -> list[int]:
    """Everything the requester of ``tag`` learned from A: slot values (P1) or signed values."""
    out: list[int] = []
    view = arbiter_view(run, sk)
    for step in range(run.steps):
        ms = [v.m for v in view if v.tag == tag.value and v.step == step]
        (env,) = run.trio.book.envelopes("arbiter", tags={tag.value}, step=step)
        assert isinstance(env.body, CipherBlock)
        out.extend(unpacked(run, ms, env.body.shape, width))
    return out


def weights_flat(run: SplitRun) -> list[int]:
    """Every entry of every ``enc(W_t)``, ``t = 0 .. steps``, as signed integers."""
    return flat_ints([run.weights(t) for t in range(run.steps + 1)])


def weight_forms(run: SplitRun) -> set[int]:
    """Every entry of every ``enc(W_t)``, signed and mod n."""
    return residue_forms(weights_flat(run), run.n)


@pytest.mark.parametrize("mode", [SplitMode.P0, SplitMode.P1])
def test_s6_guest_view(
    mode: SplitMode, runs: dict[tuple[SplitMode, bool], SplitRun], pk: PublicKey, sk: PrivateKey
) -> None:
    """S6: G's transcript holds no ``enc(α)``; its weight-update shares are masked; no ``W_h``.

    * no plaintext G received or unmasked (``M_init``, A's replies, ``Ẑ``, ``V̂``) equals an
      entry of any ``enc_{f_a}(α_t)``;
    * P0: ``V̂`` is uniform mod n (KS p > 0.01); P1: ``W^G_t/2^L ~ U(−½, ½)`` and
      ``V̂/2^L ~ Triangular(−1, 0, 1)`` (KS p > 0.01, ``V̂`` of even steps, which share no
      ``E``) and ``|corr(V̂, η_W αᵀδ̃)| < 4/√N``; controls: the unmasked quantities fail;
    * no variable of G (any ``W^G_t``, ``V̂_t``, ``M_init``, ``Ẑ``) equals an entry of any
      ``enc(W_t)``.
    """
    run = runs[(mode, True)]
    n, steps, k = run.n, run.steps, run.spec.k
    received = plain_residues(run.trio.book.envelopes("bank"), pk.n_bytes)
    assert len(received) == run.spec.d * k + steps * run.spec.kappa_k * (
        run.spec.batch + run.spec.d
    )
    z_hat = unmasked(run, sk, DecTag.Z_FWD, k)
    v_hat = flat_ints([run.v_hat(t) for t in range(steps)])  # what G subtracted from W^G
    assert unmasked(run, sk, DecTag.V_WUPD, k) == (
        v_hat if mode is SplitMode.P1 else signed(v_hat, n)
    )  # ... is exactly what A's replies carried
    alpha_codes = residue_forms(
        flat_ints([encode(a, scale=FP.f_a, bound=FP.a_max) for a in run.alphas]), n
    )
    guest_plain = residue_forms(received, n) | residue_forms(signed(received, n), n)
    guest_plain |= residue_forms(z_hat, n) | residue_forms(v_hat, n)
    assert not guest_plain & alpha_codes, "G's view contains an encoded host embedding"

    updates = [encode(run.eta * dl, scale=FP.f_d, bound=FP.delta_max) for dl in run.deltas]
    data_part = [
        encode(a, scale=FP.f_a, bound=FP.a_max).T.dot(u)
        for a, u in zip(run.alphas, updates, strict=True)
    ]
    if mode is SplitMode.P0:
        assert ks_pvalue([v / int(n) for v in v_hat], uniform01) > 0.01
        control = [int(v) % int(n) / int(n) for v in flat_ints(data_part)]
        assert ks_pvalue(control, uniform01) < 1e-6  # V̂ without E' − E
    else:
        half = 1 << BIG_L
        wg = flat_ints(run.wg)
        assert ks_pvalue([v / half for v in wg], uniform_centred) > 0.01
        assert ks_pvalue([v / half for v in weights_flat(run)], uniform_centred) < 1e-6
        even = [t for t in range(steps) if t % 2 == 0]
        v_even = flat_ints([run.v_hat(t) for t in even])
        assert ks_pvalue([v / half for v in v_even], triangular) > 0.01
        assert (
            ks_pvalue([v / half for v in flat_ints([data_part[t] for t in even])], triangular)
            < 1e-6
        )
        grad = [
            run.eta * float(x) for t in even for x in (run.alphas[t].T @ run.deltas[t]).reshape(-1)
        ]
        assert abs(pearson(scaled(v_even), grad)) < corr_bound(len(grad))
        assert abs(pearson(scaled(flat_ints([data_part[t] for t in even])), grad)) > corr_bound(
            len(grad)
        )

    m_init = plain_residues(
        run.trio.book.envelopes("bank", tags={SplitTag.INIT_M.value}), pk.n_bytes
    )
    guest_vars = residue_forms(flat_ints(run.wg) + v_hat + z_hat + signed(m_init, n), n)
    assert not guest_vars & weight_forms(run), "G holds an entry of W_h"


# ---------------------------------------------------------------------------------------------
# S7 — the host's view


def decrypt_block(env: Envelope, run: SplitRun, sk: PrivateKey, width: int) -> np.ndarray:
    """The values a cipher block carries (test key), unpacked in P1, signed."""
    assert isinstance(env.body, CipherBlock)
    tensor = EncryptedTensor.from_block(env.body, cipher=run.guest.cipher, key_id=env.key_id)
    residues = [int(sk.decrypt(c)) for c in tensor.values.reshape(-1)]
    return np.array(unpacked(run, residues, env.body.shape, width), dtype=object).reshape(
        env.body.shape[0], width
    )


def float_weights(run: SplitRun, t: int) -> np.ndarray:
    """``W_t`` of float64 SGD from ``W_0 = W_0^G + W_0^H`` on the same ``α``, ``δ̃``."""
    w: np.ndarray = run.w0_guest + run.w0_host
    for s in range(t):
        w = w - run.eta * run.alphas[s].T @ run.deltas[s]
    return w


@pytest.mark.parametrize("mode", [SplitMode.P0, SplitMode.P1])
def test_s7_host_view(
    mode: SplitMode, runs: dict[tuple[SplitMode, bool], SplitRun], pk: PublicKey, sk: PrivateKey
) -> None:
    """S7: H receives no plaintext but ``Y2``; ``g_h = δ̃W_tᵀ``; ``[[D̂]]`` encodes ``η_W·δ̃``.

    * H's transcript: ciphertexts from G (``INIT_WG``, ``B1``, ``B2_1``), row indices
      (``BATCH``), ``STEP_ACK``, A's ``JOB_READY`` — and plaintext values only in A's
      ``G_BWD`` replies;
    * ``g_h`` equals ``dec(δ̂·enc(W_t)ᵀ)`` bit for bit and float64 ``δ̃W_tᵀ`` within 1e-7;
    * ``[[D̂]]`` decrypts (test key) to ``enc_{f_d}(η_W·δ̃)``;
    * no plaintext H received or unmasked equals an entry of ``enc(δ̃)``, ``D̂``, ``enc(y)``
      (at ``f_a``, ``f_d``, ``f_w``), any ``W^G_t`` or ``∇W_h`` (``âᵀδ̂``, ``âᵀD̂``).
    """
    run = runs[(mode, True)]
    n, k, d = run.n, run.spec.k, run.spec.d
    entries = run.trio.book.of("retailer")
    assert all(r.status == "accepted" for r in entries)
    kinds = {
        (r.envelope.tag, type(r.envelope.body).__name__, r.envelope.sender.party_id)
        for r in entries
    }
    assert kinds == {
        (SetupTag.JOB_READY.value, "ControlBlock", "arbiter"),
        (SplitTag.INIT_WG.value, "CipherBlock", "bank"),
        (SplitTag.BATCH.value, "IndexBlock", "bank"),
        (SplitTag.B1.value, "CipherBlock", "bank"),
        (SplitTag.B2_1.value, "CipherBlock", "bank"),
        (SplitTag.STEP_ACK.value, "ControlBlock", "bank"),
        (DecTag.G_BWD.value, "PlainBlock", "arbiter"),
    }
    for r in entries:
        body = r.envelope.body
        if isinstance(body, ControlBlock) and r.envelope.tag == SplitTag.STEP_ACK.value:
            assert body.obj() == {"step": r.envelope.step}
        if isinstance(body, IndexBlock):
            assert body.indices().tolist() == run.rows[r.envelope.step].tolist()

    grads: list[np.ndarray] = []
    for t in range(run.steps):
        d_hat = encode(run.deltas[t], scale=FP.f_d, bound=FP.delta_max)
        exact = decode(ring(d_hat.dot(run.weights(t).T), n), n, scale=FP.f_g, bound=FP.g_bound(k))
        assert np.array_equal(run.g[t], exact), f"g_h of step {t}"
        assert np.abs(run.g[t] - run.deltas[t] @ float_weights(run, t).T).max() < 1e-7
        big_d = encode(run.eta * run.deltas[t], scale=FP.f_d, bound=FP.delta_max)
        (b21,) = run.trio.book.envelopes("retailer", tags={SplitTag.B2_1.value}, step=t)
        assert (decrypt_block(b21, run, sk, k) == big_d).all(), f"D̂ of step {t}"
        a_hat = encode(run.alphas[t], scale=FP.f_a, bound=FP.a_max)
        grads += [d_hat, big_d, a_hat.T.dot(d_hat), a_hat.T.dot(big_d)]

    labels = dataset(d, k, real=True).labels[np.concatenate(run.rows)]
    label_codes = [encode(labels, scale=s, bound=1.0) for s in (FP.f_a, FP.f_d, FP.f_w)]
    forbidden = residue_forms(flat_ints(grads + label_codes + run.wg), n)
    received = plain_residues(run.trio.book.envelopes("retailer"), pk.n_bytes)
    assert len(received) == run.steps * run.spec.batch * run.spec.kappa_d
    g_hat = unmasked(run, sk, DecTag.G_BWD, d)
    host_plain = residue_forms(received + signed(received, n) + g_hat, n)
    assert not host_plain & forbidden, "H's view contains δ, y, W^G or ∇W_h"


# ---------------------------------------------------------------------------------------------
# S8 — share hygiene


@pytest.mark.parametrize("mode", [SplitMode.P0, SplitMode.P1])
def test_s8_share_hygiene(
    mode: SplitMode, runs: dict[tuple[SplitMode, bool], SplitRun], sk: PrivateKey
) -> None:
    """S8: shares are uniform (P0) / below ``2^L`` (P1), sum to ``enc(W_t)``, ``E`` is fresh.

    * P0: ``E_t`` and ``W^G_t`` of every step are each uniform mod n (KS p > 0.01); control:
      ``enc(W_t)`` mod n is not; P1: ``|E_t| <= 2^{L−1}`` and ``|W^G_t| < 2^L``;
    * ``W^G_t + E_t`` equals the integer reference's ``enc(W_t)`` at every step (mod n in P0);
    * every ``E`` entry of every step is new (no reuse); G's ``[[E_t]]`` decrypts to H's
      ``E_t`` and H's ``[[W^G_t]]`` to G's ``W^G_t`` (test key), first and last step.
    """
    run = runs[(mode, True)]
    n, steps = run.n, run.steps
    e_all, wg_all = flat_ints(run.e), flat_ints(run.wg)
    if mode is SplitMode.P0:
        assert ks_pvalue([v / int(n) for v in e_all], uniform01) > 0.01
        assert ks_pvalue([v / int(n) for v in wg_all], uniform01) > 0.01
        control = [v % int(n) / int(n) for v in weights_flat(run)]
        assert ks_pvalue(control, uniform01) < 1e-6
    else:
        assert max(abs(v) for v in e_all) <= 1 << (BIG_L - 1)
        assert max(abs(v) for v in wg_all) < 1 << BIG_L

    reference = InteractiveReference(mode=mode, n=n)
    shares = reference.init(run.w0_guest, run.w0_host)
    assert (run.weights(0) == reference.weights(shares)).all()
    for t in range(steps):
        a_hat, _ = reference.forward(shares, run.alphas[t])
        _, shares = reference.backward(shares, a_hat, run.deltas[t], eta=run.eta)
        assert (run.weights(t + 1) == reference.weights(shares)).all(), f"step {t}"

    assert len(set(e_all)) == len(e_all), "a share entry of E was reused"
    for t in (0, steps):
        cipher = run.guest.cipher
        enc_e = EncryptedTensor(cipher=cipher, values=run.enc_e[t], scale=FP.f_w)
        enc_wg = EncryptedTensor(cipher=cipher, values=run.enc_wg[t], scale=FP.f_w)
        e_dec = [int(sk.decrypt(c)) for c in enc_e.values.reshape(-1)]
        wg_dec = [int(sk.decrypt(c)) for c in enc_wg.values.reshape(-1)]
        if mode is SplitMode.P0:  # [[E]] at G holds Eᵀ, [[W^G]] at H holds W^G, as residues
            assert e_dec == flat_ints([run.e[t].T]) and wg_dec == flat_ints([run.wg[t]])
        else:  # column-packed Eᵀ and row-packed W^G
            assert unpacked(run, e_dec, enc_e.shape, run.spec.d) == flat_ints([run.e[t].T])
            assert unpacked(run, wg_dec, enc_wg.shape, run.spec.k) == flat_ints([run.wg[t]])


# ---------------------------------------------------------------------------------------------
# S9 — joint initialisation


def no_step(*_: Any) -> np.ndarray:
    """For runs without training steps."""
    raise AssertionError("no training step expected")


@pytest.mark.parametrize("mode", [SplitMode.P0, SplitMode.P1])
def test_s9_joint_init_hides_w0_from_both_parties(
    mode: SplitMode, pk: PublicKey, sk: PrivateKey
) -> None:
    """S9: neither party's state gives ``W_0``; H's init message is masked.

    d = k = 16 (N = 256 weights):

    * ``M_init`` in G's transcript is uniform mod n (P0) / ``λ(M_init)/2^L ~ U(−½, ½)``
      (P1), KS p > 0.01; control: ``enc(W_0^H)`` alone is not;
    * the shares sum to ``enc(W_0^G) + enc(W_0^H)`` exactly (each component encoded alone);
    * G's share differs from ``enc(W_0)`` in every entry and, like H's ``E_0``, is
      uncorrelated with it (``|corr| < 4/√N``);
    * each party's own component has correlation ``1/√2 ± 0.1`` with the ``W_0`` the
      protocol holds (neither component alone is ``W_0``).
    """
    spec = job_spec(pk, mode, 2, 16, 16, "init")
    run = run_split(pk, sk, spec, steps=0, alpha_fn=no_step, delta_fn=no_step, seed=9)
    try:
        n = run.n
        (init_m,) = run.trio.book.envelopes("bank", tags={SplitTag.INIT_M.value})
        m_init = plain_residues([init_m], pk.n_bytes)
        assert len(m_init) == 256
        w0_h = flat_ints([encode(run.w0_host, scale=FP.f_w, bound=FP.w_max)])
        if mode is SplitMode.P0:
            assert ks_pvalue([v / int(n) for v in m_init], uniform01) > 0.01
            assert ks_pvalue([v % int(n) / int(n) for v in w0_h], uniform01) < 1e-6
        else:
            half = 1 << BIG_L
            assert ks_pvalue([v / half for v in signed(m_init, n)], uniform_centred) > 0.01
            assert ks_pvalue([v / half for v in w0_h], uniform_centred) < 1e-6

        enc_w0 = encode(run.w0_guest, scale=FP.f_w, bound=FP.w_max) + encode(
            run.w0_host, scale=FP.f_w, bound=FP.w_max
        )
        assert (run.weights(0) == enc_w0).all()
        w0 = flat_ints([enc_w0])
        wg0 = flat_ints([run.wg[0]]) if mode is SplitMode.P1 else signed(flat_ints([run.wg[0]]), n)
        e0 = flat_ints([run.e[0]]) if mode is SplitMode.P1 else signed(flat_ints([run.e[0]]), n)
        assert all(a != b for a, b in zip(wg0, w0, strict=True))
        for share in (wg0, e0):
            assert abs(pearson(scaled(share), scaled(w0))) < corr_bound(len(w0))
        for own in (run.w0_guest, run.w0_host):
            assert abs(pearson(own.reshape(-1), scaled(w0)) - math.sqrt(0.5)) < 0.1
    finally:
        run.trio.close()


# ---------------------------------------------------------------------------------------------
# S10 — operation counts per step


COUNT_CASES = [  # (mode, (B, d, k), key bits)
    (SplitMode.P0, (8, 4, 3), 1024),
    (SplitMode.P1, (8, 4, 3), 1024),
    (SplitMode.P0, (32, 16, 8), 1024),
    (SplitMode.P1, (32, 16, 8), 1024),
    (SplitMode.P0, (64, 33, 17), 256),
    (SplitMode.P1, (64, 33, 17), 1024),
]


@pytest.mark.parametrize(
    ("mode", "shape", "bits"),
    COUNT_CASES,
    ids=[f"{m.value}-{b}x{d}x{k}" for m, (b, d, k), _ in COUNT_CASES],
)
def test_s10_instrumented_counts_equal_section_4_9(
    mode: SplitMode, shape: tuple[int, int, int], bits: int, keypair: tuple[PublicKey, PrivateKey]
) -> None:
    """S10: one real step's instrumented counts equal ``JobSpec.step_counts()`` (§4.9).

    Counted at the dispatch sites of the crypto layer (:mod:`protocols.crypto.counters`):
    scalar multiplications, fresh encryptions, obfuscations, ``ρ`` values taken (also per
    party, from each pool), the arbiter's decryptions and H's inversions; counted on the
    wire (transcripts): ciphertexts H→G, G→H and to A, plaintexts from A; and A's audit log.
    P0 at (64, 33, 17) runs under a 256-bit test key: P0's counts do not depend on the key
    size (P1's do, through S), and with the 1024-bit key this one step takes about 8 s.
    """
    pk, sk = keypair if bits == keypair[0].bits else fixed_keypair(bits=bits)
    b, d, k = shape
    spec = job_spec(pk, mode, b, d, k, "counts")

    def alpha(t: int, rows: np.ndarray) -> np.ndarray:
        return np.tanh(np.random.default_rng([b, d, k, t]).normal(size=(rows.size, d)))

    def delta(t: int, rows: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.random.default_rng([k, t]).normal(0, 0.05, (rows.size, k))

    run = run_split(pk, sk, spec, steps=1, alpha_fn=alpha, delta_fn=delta, seed=10)
    try:
        want = spec.step_counts()
        assert run.counts_at_end - run.counts_after_init == OpCounts(
            scalar_mults=want.scalar_mults,
            fresh_encryptions=want.fresh_encryptions,
            obfuscations=want.obfuscations,
            obfuscators=want.obfuscators,
            decryptions=want.decryptions,
            inverses=want.inverses,
        )
        kk, kd = spec.kappa_k, spec.kappa_d
        rho_g = run.guest.pool.handed_out - run.rho_after_init[0]
        rho_h = run.host.pool.handed_out - run.rho_after_init[1]
        assert (rho_g, rho_h) == (b * kk + b * kd, k * kd + b * kk + d * kk)  # §4.9 by party

        book = run.trio.book
        assert cipher_count(book.envelopes("bank", tags=STEP_TAGS, sender="retailer")) == (
            want.ciphertexts_host_to_guest
        )
        assert cipher_count(book.envelopes("retailer", tags=STEP_TAGS, sender="bank")) == (
            want.ciphertexts_guest_to_host
        )
        assert cipher_count(book.envelopes("arbiter", tags=DEC_TAGS)) == want.ciphertexts_to_arbiter
        replies = [
            env
            for party in ("bank", "retailer")
            for env in book.envelopes(party, tags=DEC_TAGS, sender="arbiter")
        ]
        assert len(plain_residues(replies, pk.n_bytes)) == want.decryptions
        assert run.trio.policy.counts(spec.job_id) == {
            DecTag.Z_FWD.value: b * kk,
            DecTag.G_BWD.value: b * kd,
            DecTag.V_WUPD.value: d * kk,
        }
    finally:
        run.trio.close()


# ---------------------------------------------------------------------------------------------
# S11 — obfuscation


def randomness(c: mpz, sk: PrivateKey) -> mpz:
    """``ρ = r^n`` of a ciphertext, as the key holder can extract it: ``c·(1 − m·n) mod n²``."""
    key = sk.public
    return c * (1 - sk.decrypt(c) * key.n) % key.n2


def products_rerandomised(
    out: np.ndarray, scalars: np.ndarray, bases: np.ndarray, sk: PrivateKey
) -> bool:
    """Whether no ``out[b, c]`` has the randomness of ``⊕_i scalars[b, i] ⊙ bases[i, c]``.

    A product that left a party without ``Obf`` keeps ``Π_i ρ(bases[i, c])^{scalars[b, i]}``
    (a plaintext addend changes no randomness), which A could test.
    """
    n2 = sk.public.n2
    rho_in = np.vectorize(lambda c: randomness(c, sk), otypes=[object])(bases)
    return all(
        randomness(out[b, c], sk)
        != multi_exp(list(rho_in[:, c]), [int(x) for x in scalars[b, :]], n2)
        for b in range(out.shape[0])
        for c in range(out.shape[1])
    )


def cipher_values(env: Envelope, cipher: Cipher) -> np.ndarray:
    """The ciphertexts of a cipher block."""
    assert isinstance(env.body, CipherBlock)
    return EncryptedTensor.from_block(env.body, cipher=cipher, key_id=env.key_id).values


def test_s11_evaluated_ciphertexts_are_rerandomised(
    pk: PublicKey, sk: PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S11: every evaluated ciphertext leaves obfuscated; a re-run gives new ciphertexts.

    Two P0 runs with the same inputs, shares and masks (so every plaintext is the same):

    * every tensor sent in ``INIT_WG``, ``F1``, ``B1``, ``B2_2`` had ``obfuscated=True``;
    * with the test key (what A could do): the randomness of each ``F1``, ``B1``, ``B2_2``
      ciphertext is not the product of its inputs' randomness raised to the scalars;
      control: an un-obfuscated product of the same inputs is caught;
    * every ciphertext of the second run (G, H and A transcripts) differs from the first
      run's at the same place, although it decrypts to the same value.
    """
    flags: dict[bytes, bool] = {}
    to_block = EncryptedTensor.to_block

    def recording(self: EncryptedTensor) -> CipherBlock:
        block = to_block(self)
        flags[block.data] = self.obfuscated
        return block

    monkeypatch.setattr(EncryptedTensor, "to_block", recording)
    data = dataset(3, 2, real=True)
    pair = [
        run_split(
            pk,
            sk,
            job_spec(pk, SplitMode.P0, 2, 3, 2, "obf"),
            steps=2,
            alpha_fn=data.alpha,
            delta_fn=data.delta,
            seed=21,
        )
        for _ in range(2)
    ]
    try:
        first, second = pair
        cipher = first.guest.cipher
        for run in pair:
            sent = [
                env
                for party in ("bank", "retailer")
                for env in run.trio.book.envelopes(party, tags=EVALUATED_TAGS)
            ]
            assert len(sent) == 1 + 3 * run.steps
            assert all(flags[env.payload] for env in sent)

        book = first.trio.book
        for t in range(first.steps):
            a_hat = encode(first.alphas[t], scale=FP.f_a, bound=FP.a_max)
            d_hat = encode(first.deltas[t], scale=FP.f_d, bound=FP.delta_max)
            (f1,) = book.envelopes("bank", tags={SplitTag.F1.value}, step=t)
            (b1,) = book.envelopes("retailer", tags={SplitTag.B1.value}, step=t)
            (b21,) = book.envelopes("retailer", tags={SplitTag.B2_1.value}, step=t)
            (b22,) = book.envelopes("bank", tags={SplitTag.B2_2.value}, step=t)
            f1_v, b21_v = cipher_values(f1, cipher), cipher_values(b21, cipher)
            assert products_rerandomised(f1_v, a_hat, first.enc_wg[t], sk)
            assert products_rerandomised(cipher_values(b1, cipher), d_hat, first.enc_e[t], sk)
            assert products_rerandomised(cipher_values(b22, cipher), a_hat.T, b21_v, sk)
        bare = plain_matmul(
            encode(first.alphas[0], scale=FP.f_a, bound=FP.a_max),
            EncryptedTensor(cipher=cipher, values=first.enc_wg[0], scale=FP.f_w),
            executor=InlineExecutor(),
            scale=FP.f_z,
        ).add_plain(np.ones((2, 2), dtype=object))
        assert not products_rerandomised(
            bare.values, encode(first.alphas[0], scale=FP.f_a, bound=FP.a_max), first.enc_wg[0], sk
        )  # control: a product sent without Obf is recognisable

        compared = 0
        for party in ("bank", "retailer", "arbiter"):
            one = {
                (e.tag, e.step): e
                for e in first.trio.book.envelopes(party)
                if isinstance(e.body, CipherBlock)
            }
            two = {
                (e.tag, e.step): e
                for e in second.trio.book.envelopes(party)
                if isinstance(e.body, CipherBlock)
            }
            assert one.keys() == two.keys()
            for key, env in one.items():
                c1, c2 = (
                    cipher_values(env, cipher).reshape(-1),
                    cipher_values(two[key], cipher).reshape(-1),
                )
                assert all(x != y for x, y in zip(c1, c2, strict=True)), key
                assert [sk.decrypt(x) for x in c1] == [sk.decrypt(y) for y in c2], key
                compared += c1.size
        assert compared == 2 * 6 + first.steps * (4 + 6 + 4 + 6 + 6 + 4 + 6 + 6)
    finally:
        for run in pair:
            run.trio.close()


# ---------------------------------------------------------------------------------------------
# S12 — bounds and robustness


def initialised(pk: PublicKey, sk: PrivateKey, mode: SplitMode, name: str) -> SplitRun:
    """A B = d = k = 2 job after the joint initialisation, channels open."""
    spec = job_spec(pk, mode, 2, 2, 2, name)
    return run_split(pk, sk, spec, steps=0, alpha_fn=no_step, delta_fn=no_step, seed=12)


def one_step(
    run: SplitRun, alpha: np.ndarray, delta: np.ndarray, eta: float = 0.1
) -> tuple[BaseException | None, BaseException | None]:
    """Step 0 of an initialised run with fixed ``α`` and ``δ̃``; each side's exception."""
    guest, host, rows = run.guest, run.host, np.arange(run.spec.batch)

    def guest_side() -> None:
        guest.step(0, rows, lambda z: delta, eta)
        guest.ack(0)

    def host_side() -> None:
        host.step(0, host.rows_of(host.recv(SplitTag.BATCH, 0), run.spec.batch), lambda r: alpha)
        host.wait_ack(0)

    with seeded(run.hook.seed + 1):
        return two_party(run.trio, guest_side, host_side)


def test_s12_host_embedding_above_a_max_fails_before_encryption(
    pk: PublicKey, sk: PrivateKey
) -> None:
    """S12: ``|α| > A_max`` raises at H before anything is multiplied, encrypted or sent."""
    run = initialised(pk, sk, SplitMode.P0, "amax")
    try:
        before, sent = snapshot(), len(run.trio.book.of("bank"))
        alpha = np.array([[0.5, -FP.a_max - 0.5], [0.1, 0.2]])
        with pytest.raises(EncodingBoundError, match="exceeds its bound"):
            run.host.step(0, np.arange(2), lambda rows: alpha)
        assert snapshot() == before  # no product, encryption, obfuscation or ρ
        assert len(run.trio.book.of("bank")) == sent  # and no F1
        # control: the same step with |α| = A_max runs to the end
        assert one_step(run, np.clip(alpha, -FP.a_max, FP.a_max), np.full((2, 2), 0.1)) == (
            None,
            None,
        )
    finally:
        run.trio.close()


def test_s12_gaussian_protection_is_clipped_and_never_aborts(pk: PublicKey, sk: PrivateKey) -> None:
    """S12: δ̃ with Gaussian noise far above ``Δ_max`` is clipped to ``±Δ_max``; no abort.

    Noise of σ = 50 makes most entries hit the clip; with ``η_W = 1`` (the largest allowed)
    ``D̂`` sits exactly at the bound of §2.2, and three steps complete.
    """
    config = ProtectConfig(
        mode=ProtectMode.GAUSSIAN, clip_norm=1.0, noise_multiplier=50.0, persistence=0.0
    )
    rng = np.random.default_rng(12)
    data = dataset(2, 2, real=True)

    def noisy(t: int, rows: np.ndarray, z: np.ndarray) -> np.ndarray:
        return protect(data.delta(t, rows, z), config, rng=rng)

    spec = job_spec(pk, SplitMode.P0, 4, 2, 2, "gauss")
    run = run_split(pk, sk, spec, steps=3, alpha_fn=data.alpha, delta_fn=noisy, eta=1.0, seed=4)
    try:
        deltas = np.stack(run.deltas)
        assert np.abs(deltas).max() == FP.delta_max  # clipped, and the clip was active
        for t in range(run.steps):
            (b21,) = run.trio.book.envelopes("retailer", tags={SplitTag.B2_1.value}, step=t)
            sent = decrypt_block(b21, run, sk, spec.k)
            assert max(abs(int(v)) for v in sent.reshape(-1)) <= int(FP.delta_max) << FP.f_d
    finally:
        run.trio.close()


def test_s12_eta_above_one_is_a_config_error() -> None:
    """S12: ``η_W > 1`` (or ``<= 0``) is refused by the configuration; ``η_W = 1`` is allowed."""
    with pytest.raises(ConfigError, match="eta_w"):
        TrainConfig(eta_w=1.5)
    with pytest.raises(ConfigError, match="eta_w"):
        TrainConfig(eta_w=0.0)
    assert TrainConfig(eta_w=1.0).eta_w == 1.0


BIG_W = 1e4  # far above W_max = 128


@pytest.mark.parametrize(
    ("mode", "quantity"),
    [
        (SplitMode.P0, "z_h"),
        (SplitMode.P0, "g_h"),
        (SplitMode.P1, "z_h"),
        (SplitMode.P1, "g_h"),
        (SplitMode.P1, "V"),
    ],
)
def test_s12_decoded_value_out_of_range_aborts(
    mode: SplitMode, quantity: str, pk: PublicKey, sk: PrivateKey
) -> None:
    """S12: a decoded value outside its §2.2 range aborts the party that decodes it.

    The invariant is broken on purpose after the initialisation: H's ``E`` (used in F1)
    or G's ``W^G`` (used in B1) is shifted by ``enc(10⁴) > enc(W_max)``, or (P1) H's ``E``
    is set near ``1.5·2^L`` so ``V̂`` leaves ``|V̂| < 2^L + B·2^{b_a+b_d}`` but stays inside
    its slot. ``z_h`` aborts G before B1; ``g_h`` aborts H's step (its ``θ_h`` backward
    never runs; B2-2 and B2-3 went out before, as §4.4.1 orders them); ``V̂`` aborts G before
    it updates ``W^G`` or acknowledges the step.
    """
    run = initialised(pk, sk, mode, f"range-{quantity}")
    shift = encode(np.full((2, 2), BIG_W), scale=FP.f_w, bound=BIG_W)
    alpha, delta = np.full((2, 2), 1.0), np.full((2, 2), 1.0)
    if quantity == "z_h":
        run.host.e = run.host.reduce(run.host.e + shift)
    elif quantity == "g_h":
        run.guest.wg = run.guest.reduce(run.guest.wg + shift)
    else:
        run.host.e = np.full((2, 2), (1 << BIG_L) + (1 << (BIG_L - 1)) - (1 << 120), dtype=object)
        alpha = np.zeros((2, 2))  # keeps Ẑ = â·(W^G + E) = 0 in range
    wg_before = run.guest.wg.copy()
    guest_err, host_err = one_step(run, alpha, delta)
    book = run.trio.book
    if quantity == "g_h":  # H has sent B2-2/B2-3 already (§4.4.1), G may finish its part
        assert type(host_err) is DecodingOverflowError, host_err
        assert guest_err is None or isinstance(guest_err, TransportError | TimeoutError)
    else:
        assert isinstance(host_err, TransportError | TimeoutError)
        if quantity == "z_h":
            assert type(guest_err) is DecodingOverflowError, guest_err
            assert not book.envelopes("retailer", tags={SplitTag.B1.value})
        else:
            assert type(guest_err) is ProtocolError and "V_WUPD" in str(guest_err), guest_err
            assert not book.envelopes("retailer", tags={SplitTag.STEP_ACK.value})
            assert (run.guest.wg == wg_before).all()


def test_s12_p0_weight_update_share_is_never_range_checked(
    runs: dict[tuple[SplitMode, bool], SplitRun],
) -> None:
    """S12: P0's ``V̂`` is a raw residue: G accepted values far outside any §2.2 bound.

    Every ``λ(V̂)`` G applied exceeds ``2^{b_a+b_d+⌈log2 B⌉}`` (the bound of ``âᵀD̂``) and
    most are of the size of n, yet every step completed.
    """
    run = runs[(SplitMode.P0, True)]
    values = signed(flat_ints([run.v_hat(t) for t in range(run.steps)]), run.n)
    assert len(run.wg) == run.steps + 1  # all steps completed
    assert min(abs(v) for v in values).bit_length() > 28 + 36 + 2
    assert max(abs(v) for v in values).bit_length() >= int(run.n).bit_length() - 2
