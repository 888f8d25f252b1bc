"""Run time of a split-NN job before it starts: §4.9 operation counts × primitive costs.

Behind ``vfl estimate job.toml``. Three parts:

1. :func:`measure_primitive_costs` times, in this process, every primitive one step of the
   interactive layer is made of, each through the engine's own code path
   (:func:`quick_costs`: the same with smaller samples and one repeat, about 2 s at 2048 bits,
   most of it the ``h_s`` table build):

   * ``decrypt_s``: :meth:`PrivateKey.decrypt` (CRT), what the arbiter's workers run;
   * ``obfuscator_s``: :func:`protocols.crypto.obfuscators.generate` with the fixed-base
     generator (``ρ = h_s^x``, ``x`` of ``|n| + 128`` bits), per ``ρ``, its ``h_s`` table
     already built; the table's one-off build is ``obfuscator_table_s``;
   * ``table_a_s`` / ``table_d_s``: one :class:`SignedFixedBase` (tables for ``c`` and
     ``c⁻¹`` plus one inversion) for a ciphertext multiplied by scalars of ``a_bits`` /
     ``d_bits`` bits, as :func:`protocols.crypto.tensor.plain_matmul` builds it per reused
     ciphertext; ``fixed_base_pow_a_s`` / ``fixed_base_pow_d_s``: one signed scalar from those
     tables. :meth:`PrimitiveCosts.fixed_base_mult_a_s` is the per-scalar cost with the table
     amortised over its reuses, ``pow + table / reuse``;
   * ``multi_exp_a_s`` / ``multi_exp_d_s``: :func:`protocols.crypto.fixed_base.multi_exp`
     (Pippenger buckets, positive and negative scalars apart, one inversion) over
     ``multi_exp_bases`` ciphertexts, divided by the number of bases: the per-scalar cost
     of a product whose ciphertexts are reused too rarely for tables (B2), the ``⊕`` of
     the terms included;
   * ``powmod_a_s`` / ``powmod_d_s``: ``gmpy2.powmod(c, |x|, n²)``, a small exponent on a
     ciphertext without any table (the sign would cost one inversion per output with the
     offset trick of §4.10, not counted);
   * ``mulmod_s`` (``⊕``, ``Obf``, ``c ⊕ m``), ``invert_s`` (``⊖``) and, for context only,
     ``rn_s`` = ``r^n mod n²`` (an obfuscator without the fixed base);
   * ``hash_to_curve_s`` and ``x25519_s``: the PSI's :func:`psi.ecdh.hash_to_curve` per id
     and :func:`psi.ecdh.mask` per point.

   Scalars are drawn uniformly with ``|x| < 2^a_bits`` (``â``, default 28) and
   ``|x| < 2^d_bits`` (``δ̂``, default 36), the strict bounds of §2.2. Real scalars are often
   shorter (``|α| < 8`` gives ``|â| < 2^27``; a mean-reduced loss gives ``δ̂`` far below its
   bound) and the engine sizes its tables to the largest scalar of the chunk, so a run can
   pass the bit lengths it actually saw.

   Timing: each figure is the median over ``repeats`` batches, read by default from
   ``time.thread_time`` (the calling thread's CPU time; everything measured runs in that
   thread), so other processes on the machine inflate it far less than wall time.

2. :func:`epoch_floor` multiplies the §4.9 counts of one step
   (:meth:`vfl.splitnn.spec.JobSpec.step_counts`) by these costs, times the steps, divided by
   the cores. Which method each product gets is decided exactly as ``plain_matmul`` does:
   a ciphertext multiplied by ``m >= TABLE_MIN_REUSE`` scalars gets tables, else the product
   is a multi-exponentiation:

   * F1 at H, ``â ⊙ [[W^G]]`` (B×d times d×κ_k): each of the ``d·κ_k`` ciphertexts of
     ``[[W^G]]`` serves all B rows ⇒ fixed base, one table pair per ciphertext per step,
     amortised over B;
   * B1 at G, ``δ̂ ⊙ [[E]]`` (B×k times k×κ_d): each of the ``k·κ_d`` ciphertexts of ``[[E]]``
     serves all B rows ⇒ fixed base, amortised over B (``d_bits`` scalars);
   * B2 at H, ``âᵀ ⊙ [[D̂]]`` (d×B times B×κ_k): each ``[[D̂]]`` ciphertext serves only d
     scalars (d < 48) ⇒ Pippenger multi-exponentiation, each output over the B/workers
     ciphertexts of one worker's slice (``multi_exp_bases``, 128 for B = 256 on 2 workers).
     ``few_reuse="powmod"`` costs these products as plain ``gmpy2.powmod`` instead,
     ``"fixed_base"`` as tables amortised over d.

   The three products' scalar counts add up to ``StepCounts.scalar_mults`` (checked).
   Also counted: one decryption per ``StepCounts.decryptions`` (A), one obfuscator per
   ``StepCounts.obfuscators`` (fresh encryptions and obfuscations, split between G and H),
   one ``mulmod`` per ``⊕`` (each table-path term into its output, each plaintext addend,
   each decryption mask ``c ⊕ R``, each use of a ``ρ``, each ``⊖``), one inversion per
   ``StepCounts.inverses`` (H's ``[[W^G]] ⊖ [[V̂]]``; the tables' own inversions are inside
   ``table_*_s``). Not counted: encoding, packing, unpacking, mask sampling, serialisation,
   transport, the combination of the workers' partial products, and the ``h_s`` tables
   (``obfuscator_tables`` adds some). The floor is CPU work divided by the cores, i.e.
   perfect balance of all three parties' work over the machine. :func:`eval_floor` does the
   same for evaluation batches (``EVAL_BATCH``/``EVAL_F1``/``Z_EVAL``: F1 at H, its
   obfuscation, one ``Z_EVAL`` decryption per packed output at A).

3. :func:`estimate_job` turns the floors into a run time, phase by phase
   (``total = psi + setup + epochs · (epoch + validation) + test``):

   * training: ``steps_per_epoch = train_rows // batch`` (the last partial batch is dropped),
     each step ``floor / step × EPOCH_OVERHEAD``; ``epochs`` is the job's, an upper bound
     since early stopping may end the job sooner;
   * validation after every epoch and the test at the end: ``⌈rows / batch_eval⌉``
     evaluation batches of exactly ``batch_eval`` rows (the session pads the last one) at
     their floor × ``EPOCH_OVERHEAD``; the validation's first ``POOL_TARGET`` obfuscators
     are taken as already in H's pool (it refills in the idle time of the epoch before);
   * setup (key, job start, preprocessing, JOB_SPEC, joint initialisation I1-I3, checkpoint
     0): ``SETUP_FIXED_S`` + the ``h_s`` tables of G's and H's generating processes
     (``cores`` each, on ``cores`` cores: ``2 · obfuscator_table_s``) + the initialisation's
     ``2·d·κ_k + k·κ_d`` obfuscators over the cores;
   * PSI, when run: ``PSI_FIXED_S`` + ``PSI_OVERHEAD`` × the PSI floor, each of the two
     parties hashing its ids to the curve and masking them, and masking the peer's:
     ``2 · rows · (hash_to_curve_s + 2 · x25519_s) / cores``.

   The constants are calibrated on the measured runs in ``benchmarks/results`` (2-core
   machine, Python 3.11, three ``vfl serve`` processes over mutual TLS); see each constant.
"""

from __future__ import annotations

import math
import random
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import gmpy2
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from gmpy2 import mpz

from protocols.crypto.fixed_base import FixedBaseTable, SignedFixedBase, multi_exp
from protocols.crypto.obfuscators import (
    HS_WINDOW,
    ObfuscatorKind,
    exponent_bits,
    generate,
    hs_table,
)
from protocols.crypto.paillier import PrivateKey, PublicKey, generate_keypair
from protocols.crypto.tensor import TABLE_MIN_REUSE
from protocols.errors import ConfigError, CryptoError
from psi import ecdh
from vfl.splitnn.job import SplitJob
from vfl.splitnn.jobfile import TrainJobFile
from vfl.splitnn.spec import JobSpec, StepCounts

A_BITS = 28  # |â| < 2^28 (§2.2)
D_BITS = 36  # |δ̂|, |D̂| < 2^36 (§2.2)
FIXED_BASE_WINDOW = 5  # plain_matmul's window for reused ciphertexts
MULTI_EXP_BASES = 128  # B2's ciphertexts per worker: B = 256 over 2 workers

EPOCH_OVERHEAD = 1.155
"""Measured epoch wall time over its floor at the engine's own methods.

``benchmarks/results/splitnn.json``: ``epoch_wall_s`` 187.35 against ``floor_engine_s``
162.15 (B2 as multi-exponentiation, as ``plain_matmul`` does it), the primitive costs timed
in the same run: 187.35 / 162.15 = 1.155. It covers what the floor leaves out: encoding,
packing, serialisation and transport, the imbalance between the parties (the arbiter's
decryptions are 52 % of the work) and waiting. (The same file's ``floor_s`` 177.46 costs B2
as plain powmods, ratio 1.056; that floor overstates B2 wherever d < 48, so its ratio would
not carry over to other shapes.)"""

SETUP_FIXED_S = 2.7
"""Setup seconds besides the ``h_s`` tables and the initialisation's encryptions.

``benchmarks/results/splitnn.json``: ``setup_s`` 5.63 s, of which the two parties' table
builds (2 × ``obfuscator_table_s`` = 2 × 1.45 s, each party's 2 generating processes on the
2 cores) and the 24 initialisation obfuscators (0.02 s) are modelled: 5.63 − 2.90 − 0.02 ≈
2.7 s for the key fetch, job start, preprocessing, the arbiter's JOB_READY, the model set-up
and checkpoint 0."""

POOL_TARGET = 2000
"""Obfuscators each party keeps ready (``GuestSession``/``HostSession`` ``pool_target``).

The pool refills in the idle time of the epoch, so validation starts with it full: with
this credit the model gives 7.8 s for the benchmark's validation (3 batches of 1024, costs
of the same file) against ``eval_s`` 7.52 s measured, 9.8 s without. The test pass follows
the last validation at once, with the pool spent: no credit there."""

PSI_OVERHEAD = 1.1
"""PSI wall time over its floor: ``benchmarks/results/psi.json`` measured 1.096 (10^6 ids per
side over gRPC, 2 cores); ``psi_10m.json`` 1.057 at 10^7."""

PSI_FIXED_S = 1.5
"""PSI seconds independent of the ids (services' handshake, reading ids, writing results).

``benchmarks/results/splitnn.json``: ``psi_s`` 4.38 s for 30,000 ids per side, whose floor
at ``psi.json``'s per-id costs is 2 · 30,000 · (9.46 + 2 · 39.63) µs / 2 = 2.66 s:
4.38 − 1.1 · 2.66 ≈ 1.5 s."""

PSI_REFERENCE_HASH_S = 9.46e-6
"""Hash to curve per id, ``benchmarks/results/psi.json`` (default of costs built without it)."""

PSI_REFERENCE_X25519_S = 39.63e-6
"""One X25519 per point, ``benchmarks/results/psi.json`` (default of costs built without it)."""

FewReuse = Literal["multi_exp", "powmod", "fixed_base"]


def _per_op(
    fn: Callable[[], object],
    ops: int,
    repeats: int,
    clock: Callable[[], float],
    *,
    best: bool = False,
) -> float:
    """Median (``best``: minimum) over ``repeats`` runs of the time of ``fn()`` on ``clock``,
    divided by ``ops``."""
    times = []
    for _ in range(max(1, repeats)):
        start = clock()
        fn()
        times.append(clock() - start)
    return (min(times) if best else statistics.median(times)) / ops


def _signed_scalars(rng: random.Random, bits: int, count: int) -> list[int]:
    """``count`` integers uniform in ``(-2^bits, 2^bits)``, never zero."""
    top = (1 << bits) - 1
    out: list[int] = []
    while len(out) < count:
        x = rng.randint(-top, top)
        if x:
            out.append(x)
    return out


# -- 1. primitive costs --------------------------------------------------------------------


@dataclass(frozen=True)
class PrimitiveCosts:
    """Seconds per operation, measured in one process (see the module docstring).

    Attributes
    ----------
    bits
        Key size.
    a_bits, d_bits
        Scalar sizes used: ``|â| < 2^a_bits`` (F1, B2), ``|δ̂| < 2^d_bits`` (B1).
    decrypt_s
        One CRT decryption (:meth:`PrivateKey.decrypt`).
    obfuscator_s
        One fixed-base ``ρ`` from the engine's generator, table already built.
    obfuscator_table_s
        Building the ``h_s`` table once (per process and key; not per ``ρ``).
    table_a_s, table_d_s
        One :class:`SignedFixedBase` (``c`` and ``c⁻¹`` tables, one inversion) for
        ``a_bits`` / ``d_bits`` scalars, window 5.
    fixed_base_pow_a_s, fixed_base_pow_d_s
        One signed scalar from such tables (the ``⊕`` into the output not included).
    multi_exp_a_s, multi_exp_d_s
        Per scalar of a Pippenger multi-exponentiation over ``multi_exp_bases`` ciphertexts
        with ``a_bits`` / ``d_bits`` scalars (its ``⊕`` and final inversion included).
    multi_exp_bases
        Number of ciphertexts per multi-exponentiation measured.
    powmod_a_s, powmod_d_s
        ``gmpy2.powmod(c, |x|, n²)``.
    mulmod_s
        ``c·c' mod n²`` on ``mpz``.
    invert_s
        ``c⁻¹ mod n²``.
    rn_s
        ``r^n mod n²`` (context: an obfuscator without the fixed base).
    measure_s
        Wall time of the whole measurement.
    clock
        The clock the costs were read from (``thread_time``: CPU time of the thread).
    hash_to_curve_s
        The PSI's hash of one id to Curve25519 (default: ``PSI_REFERENCE_HASH_S``).
    x25519_s
        One X25519 masking of a point (default: ``PSI_REFERENCE_X25519_S``).
    """

    bits: int
    a_bits: int
    d_bits: int
    decrypt_s: float
    obfuscator_s: float
    obfuscator_table_s: float
    table_a_s: float
    table_d_s: float
    fixed_base_pow_a_s: float
    fixed_base_pow_d_s: float
    multi_exp_a_s: float
    multi_exp_d_s: float
    multi_exp_bases: int
    powmod_a_s: float
    powmod_d_s: float
    mulmod_s: float
    invert_s: float
    rn_s: float
    measure_s: float
    clock: str
    hash_to_curve_s: float = PSI_REFERENCE_HASH_S
    x25519_s: float = PSI_REFERENCE_X25519_S

    def fixed_base_mult_a_s(self, reuse: int) -> float:
        """Per-scalar cost of an ``a_bits`` product on a ciphertext reused ``reuse`` times.

        Parameters
        ----------
        reuse
            Scalars each table pair serves (B for F1).

        Returns
        -------
        float
            ``fixed_base_pow_a_s + table_a_s / reuse`` seconds.
        """
        return self.fixed_base_pow_a_s + self.table_a_s / max(1, reuse)

    def fixed_base_mult_d_s(self, reuse: int) -> float:
        """Per-scalar cost of a ``d_bits`` product on a ciphertext reused ``reuse`` times.

        Parameters
        ----------
        reuse
            Scalars each table pair serves (B for B1).

        Returns
        -------
        float
            ``fixed_base_pow_d_s + table_d_s / reuse`` seconds.
        """
        return self.fixed_base_pow_d_s + self.table_d_s / max(1, reuse)

    def to_json(self) -> dict[str, Any]:
        """All fields (seconds), for a results file."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PrimitiveCosts:
        """Read :meth:`to_json` back (fields missing from older files take their defaults).

        Parameters
        ----------
        obj
            A ``costs`` object of a results file.

        Returns
        -------
        PrimitiveCosts
            The costs.

        Raises
        ------
        ConfigError
            If a required field is missing or not a number.
        """
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        try:
            for name, value in obj.items():
                if name not in known:
                    continue
                kind = known[name].type
                values[name] = (
                    str(value) if kind == "str" else int(value) if kind == "int" else float(value)
                )
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"primitive costs are malformed: {exc}") from None


@dataclass(frozen=True)
class _Samples:
    """Operations timed per repeat (full measurement or quick)."""

    obfuscators: int
    decryptions: int
    table_bases: int
    table_scalars: int
    multi_exp_outputs: int
    powmods: int
    mulmod_rounds: int
    inverts: int
    rn: int
    psi_ids: int


_FULL = _Samples(120, 48, 8, 400, 4, 150, 20, 200, 12, 2000)
_QUICK = _Samples(40, 16, 4, 100, 1, 30, 4, 50, 3, 300)


def measure_primitive_costs(
    *,
    public_key: PublicKey,
    private_key: PrivateKey,
    repeats: int = 3,
    a_bits: int = A_BITS,
    d_bits: int = D_BITS,
    multi_exp_bases: int = MULTI_EXP_BASES,
    seed: int = 0,
    clock: Callable[[], float] = time.thread_time,
    quick: bool = False,
    best: bool = False,
) -> PrimitiveCosts:
    """Time every primitive of a split-NN step (and of the PSI) through the engine's own code.

    Each figure is the median over ``repeats`` batches of operations. About 2.5 s at
    2048 bits, plus about 1.4 s to build the ``h_s`` table (about 120 MB at 2048 bits);
    ``quick=True`` times smaller batches (about 0.4 s plus the table). The table is left in
    :func:`protocols.crypto.obfuscators.hs_table`'s cache, as any use of the generator
    would; if this process already had it, a second one is built and dropped, to time the
    build.

    Parameters
    ----------
    public_key, private_key
        The engine's key pair (:func:`protocols.crypto.paillier.generate_keypair`).
    repeats
        Batches per figure; the median is kept.
    a_bits, d_bits
        Scalar sizes: ``|â| < 2^a_bits``, ``|δ̂| < 2^d_bits``.
    multi_exp_bases
        Ciphertexts per multi-exponentiation (B / workers in the engine's B2).
    seed
        Seed of the scalars (the ciphertexts and obfuscators use the OS CSPRNG).
    clock
        What is timed: by default this thread's CPU time, i.e. the CPU work of each
        operation (everything runs in the calling thread), which other processes on a
        shared machine disturb far less than wall time; ``time.perf_counter`` for wall time
        (equal on an idle machine).
    quick
        Time about a quarter as many operations per batch (for :func:`quick_costs`).

    Returns
    -------
    PrimitiveCosts
        Seconds per operation.

    Raises
    ------
    ConfigError
        If ``repeats`` or ``multi_exp_bases`` is below 1 or a scalar size below 2 bits.
    CryptoError
        If a self-check fails (decryption, tables or multi-exponentiation against powmod).
    """

    def _per(fn: Callable[[], object], ops: int, repeats: int, clock: Callable[[], float]) -> float:
        return _per_op(fn, ops, repeats, clock, best=best)

    if repeats < 1 or multi_exp_bases < 1 or min(a_bits, d_bits) < 2:
        raise ConfigError("repeats and multi_exp_bases must be >= 1, a_bits and d_bits >= 2")
    started = time.perf_counter()
    sample = _QUICK if quick else _FULL
    pk, sk = public_key, private_key
    n, n2 = pk.n, pk.n2
    rng = random.Random(seed)

    # obfuscators: the h_s table (one-off), then the generator per ρ
    exp_bits = exponent_bits(pk.bits, ObfuscatorKind.FIXED_BASE)
    misses = hs_table.cache_info().misses
    t = clock()
    hs_table(n, pk.h_s, exp_bits)
    table_build_s = clock() - t
    if hs_table.cache_info().misses == misses:  # already cached here: time a fresh build
        t = clock()
        FixedBaseTable(pk.h_s, n2, exp_bits=exp_bits, window=HS_WINDOW)
        table_build_s = clock() - t
    obf_count = sample.obfuscators
    rhos: list[mpz] = []

    def make_rhos() -> None:
        rhos.extend(generate(n, pk.h_s, pk.bits, ObfuscatorKind.FIXED_BASE, obf_count))

    obfuscator_s = _per(make_rhos, obf_count, repeats, clock)
    # untimed: enough distinct ciphertexts for what follows (random messages make them
    # distinct even where a ρ serves twice; only their timing matters here)
    need = max(200, multi_exp_bases)
    cts = [pk.encrypt(secrets.randbelow(int(n)), rhos[i % len(rhos)]) for i in range(need)]
    ms = [secrets.randbelow(int(n)) for _ in range(8)]
    if [sk.decrypt(pk.encrypt(m, rho)) for m, rho in zip(ms, rhos, strict=False)] != ms:
        raise CryptoError("decryption of fresh encryptions failed")

    # decryption (the arbiter's path)
    dec_cts = cts[: sample.decryptions]
    decrypt_s = _per(lambda: [sk.decrypt(c) for c in dec_cts], len(dec_cts), repeats, clock)

    # fixed-base tables and pows, as plain_matmul builds them per reused ciphertext
    def table_costs(bits: int) -> tuple[float, float]:
        bases = cts[: sample.table_bases]
        tables: list[SignedFixedBase] = []

        def build() -> None:
            tables.clear()
            tables.extend(
                SignedFixedBase(c, n2, exp_bits=bits, window=FIXED_BASE_WINDOW) for c in bases
            )

        table_s = _per(build, len(bases), repeats, clock)
        xs = _signed_scalars(rng, bits, sample.table_scalars)
        pow_s = _per(
            lambda: [tables[i % len(tables)].pow(x) for i, x in enumerate(xs)],
            len(xs),
            repeats,
            clock,
        )
        if tables[0].pow(xs[0]) != pk.mul_scalar(bases[0], xs[0]):
            raise CryptoError("fixed-base table disagrees with powmod")
        return table_s, pow_s

    table_a_s, pow_a_s = table_costs(a_bits)
    table_d_s, pow_d_s = table_costs(d_bits)

    # Pippenger multi-exponentiation (B2's method), per scalar
    me_bases = cts[:multi_exp_bases]

    def multi_exp_cost(bits: int) -> float:
        outputs = sample.multi_exp_outputs
        exps = [_signed_scalars(rng, bits, len(me_bases)) for _ in range(outputs)]
        per_scalar = _per(
            lambda: [multi_exp(me_bases, x, n2) for x in exps],
            outputs * len(me_bases),
            repeats,
            clock,
        )
        check = mpz(1)
        for c, x in zip(me_bases[:6], exps[0][:6], strict=False):
            check = check * pk.mul_scalar(c, x) % n2
        if multi_exp(me_bases[:6], exps[0][:6], n2) != check:
            raise CryptoError("multi_exp disagrees with powmod")
        return per_scalar

    multi_exp_a_s = multi_exp_cost(a_bits)
    multi_exp_d_s = multi_exp_cost(d_bits)

    # plain powmod with a small exponent, mulmod, inversion, r^n
    def powmod_cost(bits: int) -> float:
        xs = [abs(x) for x in _signed_scalars(rng, bits, sample.powmods)]
        return _per(
            lambda: [gmpy2.powmod(cts[i % 64], x, n2) for i, x in enumerate(xs)],
            len(xs),
            repeats,
            clock,
        )

    powmod_a_s = powmod_cost(a_bits)
    powmod_d_s = powmod_cost(d_bits)
    pairs = list(zip(cts[:100], cts[100:200], strict=True))
    rounds = sample.mulmod_rounds
    mulmod_s = _per(
        lambda: [a * b % n2 for _ in range(rounds) for a, b in pairs],
        rounds * len(pairs),
        repeats,
        clock,
    )
    inv_cts = cts[: sample.inverts]
    invert_s = _per(lambda: [gmpy2.invert(c, n2) for c in inv_cts], len(inv_cts), repeats, clock)
    rs = [mpz(secrets.randbelow(int(n) - 1) + 1) for _ in range(sample.rn)]
    rn_s = _per(lambda: [gmpy2.powmod(r, n, n2) for r in rs], len(rs), repeats, clock)
    hash_s, x25519_s = _psi_costs(sample.psi_ids, repeats, clock)

    return PrimitiveCosts(
        bits=pk.bits,
        a_bits=a_bits,
        d_bits=d_bits,
        decrypt_s=decrypt_s,
        obfuscator_s=obfuscator_s,
        obfuscator_table_s=table_build_s,
        table_a_s=table_a_s,
        table_d_s=table_d_s,
        fixed_base_pow_a_s=pow_a_s,
        fixed_base_pow_d_s=pow_d_s,
        multi_exp_a_s=multi_exp_a_s,
        multi_exp_d_s=multi_exp_d_s,
        multi_exp_bases=len(me_bases),
        powmod_a_s=powmod_a_s,
        powmod_d_s=powmod_d_s,
        mulmod_s=mulmod_s,
        invert_s=invert_s,
        rn_s=rn_s,
        measure_s=time.perf_counter() - started,
        clock=getattr(clock, "__name__", repr(clock)),
        hash_to_curve_s=hash_s,
        x25519_s=x25519_s,
    )


def _psi_costs(ids: int, repeats: int, clock: Callable[[], float]) -> tuple[float, float]:
    """Per-id :func:`psi.ecdh.hash_to_curve` and per-point :func:`psi.ecdh.mask` seconds."""
    sample = [f"customer{i:09d}@bank.example".encode() for i in range(ids)]
    prefix = ecdh.dst("email") + bytes(ecdh.SALT_BYTES)
    points: list[bytes] = []

    def hash_all() -> None:
        points.clear()
        points.extend(ecdh.hash_to_curve(c, prefix=prefix) for c in sample)

    hash_s = _per_op(hash_all, ids, repeats, clock)
    key = X25519PrivateKey.generate()
    joined = b"".join(points)
    x25519_s = _per_op(lambda: ecdh.mask(key, joined), ids, repeats, clock)
    return hash_s, x25519_s


def quick_costs(
    *,
    key_bits: int = 2048,
    keypair: tuple[PublicKey, PrivateKey] | None = None,
    allow_test_key: bool = False,
    repeats: int = 3,
    clock: Callable[[], float] = time.thread_time,
) -> PrimitiveCosts:
    """The primitive costs in about 2-3 s at 2048 bits (what ``vfl estimate`` measures).

    :func:`measure_primitive_costs` with ``quick=True`` (a quarter of the operations per
    figure), keeping the fastest of ``repeats`` batches per figure (other work on a shared
    machine only slows a batch down). The ``h_s`` table build (about 1.4 s at 2048 bits,
    120 MB) is most of the time and is needed anyway to time the fixed-base obfuscators.
    The key is only a measuring device: a fresh one (about 0.1 s) unless ``keypair`` is
    given. On this 2-core machine the figures still move by up to 1.5x between runs a
    minute apart (the machine's own speed varies), and the estimate with them.

    Parameters
    ----------
    key_bits
        Size of the key generated when ``keypair`` is None (the arbiter's key size).
    keypair
        An existing key pair to measure with (``key_bits`` is then ignored).
    allow_test_key
        Allow ``key_bits`` below 2048 (tests).
    repeats
        Batches per figure (the fastest is kept).
    clock
        This thread's CPU time by default (see :func:`measure_primitive_costs`).

    Returns
    -------
    PrimitiveCosts
        Seconds per operation at the key's size.

    Raises
    ------
    ConfigError
        If ``key_bits`` is not an allowed key size (:class:`InsecureConfigError` for a small
        key without ``allow_test_key``).
    """
    if keypair is None:
        keypair = generate_keypair(bits=key_bits, allow_test_key=allow_test_key)
    public_key, private_key = keypair
    return measure_primitive_costs(
        public_key=public_key,
        private_key=private_key,
        repeats=repeats,
        clock=clock,
        quick=True,
        best=True,
    )


# -- 2. the floor ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FloorItem:
    """One line of the floor: ``count_per_step`` operations at ``cost_s`` each.

    Attributes
    ----------
    name
        What is counted.
    party
        Who does it: ``"G"``, ``"H"`` or ``"A"``.
    method
        How the engine does it (and how the cost was measured).
    count_per_step
        Operations per training step.
    cost_s
        Seconds per operation.
    """

    name: str
    party: str
    method: str
    count_per_step: int
    cost_s: float

    @property
    def cpu_s_per_step(self) -> float:
        """CPU seconds per step."""
        return self.count_per_step * self.cost_s


@dataclass(frozen=True)
class FloorBreakdown:
    """The §4.9 floor of one epoch (or of an evaluation pass, one "step" per batch).

    Attributes
    ----------
    mode, batch, d, k, slots
        The job's shape (``slots`` = 1 in P0; ``batch`` is ``batch_eval`` for evaluation).
    steps
        Training steps in the epoch (evaluation batches in a pass).
    cores
        The CPU seconds are divided by this.
    few_reuse
        How products on rarely reused ciphertexts (B2) were costed.
    items
        The lines; their CPU seconds add up to ``cpu_s_per_step``.
    obfuscator_tables
        ``h_s`` tables counted as built during the epoch (a one-off each).
    obfuscator_table_s
        Seconds per such table.
    """

    mode: str
    batch: int
    d: int
    k: int
    slots: int
    steps: int
    cores: int
    few_reuse: str
    items: tuple[FloorItem, ...]
    obfuscator_tables: int
    obfuscator_table_s: float

    @property
    def cpu_s_per_step(self) -> float:
        """CPU seconds of one step, all parties."""
        return sum(item.cpu_s_per_step for item in self.items)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the epoch, all parties (table builds included)."""
        return self.cpu_s_per_step * self.steps + self.obfuscator_tables * self.obfuscator_table_s

    @property
    def floor_s(self) -> float:
        """The floor: epoch CPU seconds divided by the cores."""
        return self.cpu_s / self.cores

    def by_party(self) -> dict[str, float]:
        """CPU seconds of the epoch per party (tables not included)."""
        out: dict[str, float] = {}
        for item in self.items:
            out[item.party] = out.get(item.party, 0.0) + item.cpu_s_per_step * self.steps
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything, with per-item epoch seconds, for a results file."""
        return {
            "mode": self.mode,
            "batch": self.batch,
            "d": self.d,
            "k": self.k,
            "slots": self.slots,
            "steps": self.steps,
            "cores": self.cores,
            "few_reuse": self.few_reuse,
            "items": [
                {
                    **asdict(item),
                    "cpu_s_per_step": item.cpu_s_per_step,
                    "cpu_s_epoch": item.cpu_s_per_step * self.steps,
                }
                for item in self.items
            ],
            "obfuscator_tables": self.obfuscator_tables,
            "cpu_s_per_step": self.cpu_s_per_step,
            "cpu_s": self.cpu_s,
            "cpu_s_by_party": self.by_party(),
            "floor_s": self.floor_s,
        }


def _product_item(
    *,
    name: str,
    party: str,
    scalars: int,
    reuse: int,
    small: bool,
    costs: PrimitiveCosts,
    few_reuse: FewReuse,
) -> tuple[FloorItem, bool]:
    """Cost one product the way ``plain_matmul`` evaluates it (``small``: ``a_bits`` scalars).

    Returns the item and whether it takes the table path, where each term costs one more
    ``⊕`` into its output (a multi-exponentiation includes its own).
    """
    tables = reuse >= TABLE_MIN_REUSE or few_reuse == "fixed_base"
    if tables:
        cost = costs.fixed_base_mult_a_s(reuse) if small else costs.fixed_base_mult_d_s(reuse)
        table = costs.table_a_s if small else costs.table_d_s
        method = (
            f"fixed-base pow (w={FIXED_BASE_WINDOW}) + c/c⁻¹ table "
            f"({table * 1e3:.2f} ms) / {reuse} reuses"
        )
    elif few_reuse == "multi_exp":
        cost = costs.multi_exp_a_s if small else costs.multi_exp_d_s
        method = f"Pippenger multi_exp over {costs.multi_exp_bases} ciphertexts, per scalar"
    else:
        cost = costs.powmod_a_s if small else costs.powmod_d_s
        method = "gmpy2.powmod, small exponent"
    return FloorItem(name, party, method, scalars, cost), tables


def _check_floor_args(*, spec: JobSpec, steps: int, costs: PrimitiveCosts, cores: int) -> None:
    if steps < 0 or cores < 1:
        raise ConfigError(f"steps must be >= 0 and cores >= 1 (got {steps} and {cores})")
    if not spec.encrypted:
        raise ConfigError("a plaintext-mode job has no cryptographic floor")
    if spec.key_bits != costs.bits:
        raise ConfigError(f"costs were measured at {costs.bits} bits, the job uses {spec.key_bits}")


def epoch_floor(
    *,
    spec: JobSpec,
    steps: int,
    costs: PrimitiveCosts,
    cores: int = 2,
    few_reuse: FewReuse = "multi_exp",
    obfuscator_tables: int = 0,
) -> FloorBreakdown:
    """The §4.9 operation counts of ``steps`` training steps times measured costs, per core.

    Parameters
    ----------
    spec
        The job (mode, B, d, k, slots); its :meth:`JobSpec.step_counts` gives the counts.
    steps
        Training steps in the epoch (93 for 24,000 rows at B = 256).
    costs
        From :func:`measure_primitive_costs`, same key size.
    cores
        CPU cores the work is spread over.
    few_reuse
        Method for products whose ciphertexts serve fewer than ``TABLE_MIN_REUSE`` scalars
        (B2 at d < 48): ``"multi_exp"`` (what ``plain_matmul`` does, default), ``"powmod"``
        or ``"fixed_base"`` (tables amortised over the few reuses).
    obfuscator_tables
        ``h_s`` tables built during the epoch (0: built at set-up by the initialisation's
        encryptions in every generating process).

    Returns
    -------
    FloorBreakdown
        Items per party and category, and the total.

    Raises
    ------
    ConfigError
        For negative steps, no cores, a plaintext job or costs of another key size.
    """
    _check_floor_args(spec=spec, steps=steps, costs=costs, cores=cores)
    counts = spec.step_counts()
    b, d, k, kk, kd = spec.batch, spec.d, spec.k, spec.kappa_k, spec.kappa_d
    f1, f1_tables = _product_item(
        name="F1 â ⊙ [[W^G]]",
        party="H",
        scalars=b * d * kk,
        reuse=b,
        small=True,
        costs=costs,
        few_reuse=few_reuse,
    )
    b1, b1_tables = _product_item(
        name="B1 δ̂ ⊙ [[E]]",
        party="G",
        scalars=b * k * kd,
        reuse=b,
        small=False,
        costs=costs,
        few_reuse=few_reuse,
    )
    b2, b2_tables = _product_item(
        name="B2 âᵀ ⊙ [[D̂]]",
        party="H",
        scalars=d * b * kk,
        reuse=d,
        small=True,
        costs=costs,
        few_reuse=few_reuse,
    )
    products = (f1, b1, b2)
    if sum(p.count_per_step for p in products) != counts.scalar_mults:
        raise AssertionError("the products' scalars do not add up to StepCounts.scalar_mults")

    # decryptions per tag (A), and the obfuscators each data party consumes
    dec_z, dec_g, dec_v = b * kk, b * kd, d * kk
    if dec_z + dec_g + dec_v != counts.decryptions:
        raise AssertionError("decryptions per tag do not add up to StepCounts.decryptions")
    rho_g = b * kk + b * kd  # D̂ fresh (B2-1), Obf of Ĝ (B1-1)
    rho_h = k * kd + b * kk + d * kk  # E' fresh (B2-3), Obf of Ẑ (F1) and V̂ (B2-2)
    if rho_g + rho_h != counts.obfuscators:
        raise AssertionError("obfuscators per party do not add up to StepCounts.obfuscators")

    # ⊕ (mulmod): table-path terms into their outputs, plaintext addends, masks, ρ, ⊖
    terms_g = b1.count_per_step * b1_tables
    terms_h = f1.count_per_step * f1_tables + b2.count_per_step * b2_tables
    mul_g = terms_g + b * kd + dec_z + dec_v + rho_g
    mul_h = terms_h + b * kk + d * kk + dec_g + rho_h + counts.inverses

    fixed = "fixed-base h_s^x, x of |n|+128 bits, table built"
    items = (
        FloorItem(
            "decryptions (Z_FWD, G_BWD, V_WUPD)", "A", "CRT", counts.decryptions, costs.decrypt_s
        ),
        FloorItem("obfuscators (D̂ fresh, Obf Ĝ)", "G", fixed, rho_g, costs.obfuscator_s),
        FloorItem("obfuscators (E' fresh, Obf Ẑ, V̂)", "H", fixed, rho_h, costs.obfuscator_s),
        *products,
        FloorItem("⊕ terms, addends, masks, ρ", "G", "mulmod", mul_g, costs.mulmod_s),
        FloorItem("⊕ terms, addends, masks, ρ, ⊖", "H", "mulmod", mul_h, costs.mulmod_s),
        FloorItem(
            "inverses ([[W^G]] ⊖ [[V̂]])", "H", "gmpy2.invert", counts.inverses, costs.invert_s
        ),
    )
    return FloorBreakdown(
        mode=spec.mode.value,
        batch=b,
        d=d,
        k=k,
        slots=spec.slots,
        steps=steps,
        cores=cores,
        few_reuse=few_reuse,
        items=items,
        obfuscator_tables=obfuscator_tables,
        obfuscator_table_s=costs.obfuscator_table_s,
    )


def eval_floor(
    *,
    spec: JobSpec,
    batches: int,
    costs: PrimitiveCosts,
    cores: int = 2,
    few_reuse: FewReuse = "multi_exp",
) -> FloorBreakdown:
    """The floor of ``batches`` evaluation batches of ``spec.batch_eval`` rows each.

    Per batch (``EVAL_BATCH``, ``EVAL_F1``, ``Z_EVAL``; no state changes): H's F1 product
    ``â ⊙ [[W^G]]`` (``batch_eval·d·κ_k`` scalars, tables amortised over ``batch_eval``),
    its plaintext addend and obfuscation (``batch_eval·κ_k`` each), G's mask ``c ⊕ R`` and
    A's decryption per packed output (``batch_eval·κ_k``).

    Parameters
    ----------
    spec
        The job; ``batch_eval``, ``d``, ``κ_k`` are used.
    batches
        Evaluation batches (``⌈rows / batch_eval⌉``; the session pads the last one).
    costs
        From :func:`measure_primitive_costs`, same key size.
    cores
        CPU cores the work is spread over.
    few_reuse
        As for :func:`epoch_floor` (matters only for ``batch_eval < TABLE_MIN_REUSE``).

    Returns
    -------
    FloorBreakdown
        Per-batch items (``steps`` = ``batches``, ``batch`` = ``batch_eval``).

    Raises
    ------
    ConfigError
        For negative batches, no cores, a plaintext job or costs of another key size.
    """
    _check_floor_args(spec=spec, steps=batches, costs=costs, cores=cores)
    b, d, kk = spec.batch_eval, spec.d, spec.kappa_k
    f1, tables = _product_item(
        name="F1 â ⊙ [[W^G]] (EVAL_F1)",
        party="H",
        scalars=b * d * kk,
        reuse=b,
        small=True,
        costs=costs,
        few_reuse=few_reuse,
    )
    outputs = b * kk
    items = (
        FloorItem("decryptions (Z_EVAL)", "A", "CRT", outputs, costs.decrypt_s),
        FloorItem(
            "obfuscators (Obf Ẑ)",
            "H",
            "fixed-base h_s^x, x of |n|+128 bits, table built",
            outputs,
            costs.obfuscator_s,
        ),
        f1,
        FloorItem("⊕ masks", "G", "mulmod", outputs, costs.mulmod_s),
        FloorItem(
            "⊕ terms, addends, ρ",
            "H",
            "mulmod",
            f1.count_per_step * tables + 2 * outputs,
            costs.mulmod_s,
        ),
    )
    return FloorBreakdown(
        mode=spec.mode.value,
        batch=b,
        d=d,
        k=spec.k,
        slots=spec.slots,
        steps=batches,
        cores=cores,
        few_reuse=few_reuse,
        items=items,
        obfuscator_tables=0,
        obfuscator_table_s=costs.obfuscator_table_s,
    )


# -- 3. the job estimate --------------------------------------------------------------------


@dataclass(frozen=True)
class JobEstimate:
    """Predicted run time of a split-NN job, per phase (seconds, wall clock).

    ``total_s = psi_s + setup_s + epochs · (epoch_s + validation_s) + test_s``. ``epochs``
    is the job's maximum: early stopping (``patience`` epochs without a better validation
    metric) may end the job sooner, so ``total_s`` is an upper bound in epochs.

    Attributes
    ----------
    mode, key_bits, batch, batch_eval, d, k
        The job's shape and the key size the costs were measured at.
    cores
        Cores the work was spread over.
    train_rows, validation_rows, test_rows
        Rows of each split.
    psi_rows
        Ids per side the PSI runs on (0: no PSI).
    steps_per_epoch
        ``train_rows // batch`` (the last partial batch is dropped).
    epochs
        The job's ``epochs`` (an upper bound, see above).
    step_counts
        §4.9 counts of one training step (:meth:`JobSpec.step_counts`).
    step_cpu_s
        CPU seconds of one step, all parties, at the floor.
    step_s
        Wall seconds per training step (floor per step / cores × ``overhead``).
    epoch_s
        ``steps_per_epoch · step_s``.
    setup_s
        Key, job start, preprocessing, registration and joint initialisation.
    validation_s
        Validation after each epoch (0 without validation rows).
    test_s
        The held-out test rows at the end (0 without test rows).
    psi_s
        The PSI before the job (0 if it does not run).
    total_s
        Everything, with all ``epochs`` run.
    overhead
        The factor applied to the floors (``EPOCH_OVERHEAD``).
    """

    mode: str
    key_bits: int
    batch: int
    batch_eval: int
    d: int
    k: int
    cores: int
    train_rows: int
    validation_rows: int
    test_rows: int
    psi_rows: int
    steps_per_epoch: int
    epochs: int
    step_counts: StepCounts
    step_cpu_s: float
    step_s: float
    epoch_s: float
    setup_s: float
    validation_s: float
    test_s: float
    psi_s: float
    total_s: float
    overhead: float

    @property
    def train_s(self) -> float:
        """All training steps of all ``epochs``."""
        return self.epochs * self.epoch_s

    def to_json(self) -> dict[str, Any]:
        """Every field (``step_counts`` as an object), for ``vfl estimate --json``."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> JobEstimate:
        """Read :meth:`to_json` back.

        Parameters
        ----------
        obj
            What :meth:`to_json` returned (possibly through ``json``).

        Returns
        -------
        JobEstimate
            The estimate.

        Raises
        ------
        ConfigError
            If a field is missing or malformed.
        """
        try:
            values = dict(obj)
            values["step_counts"] = StepCounts(**values["step_counts"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"job estimate is malformed: {exc}") from None


def _job_spec(job: SplitJob, key_bits: int) -> JobSpec:
    """The JOB_SPEC the job would send, for a key of ``key_bits`` bits (ids are dummies)."""
    return JobSpec(
        job_id=job.job_id,
        key_id="00" * 16,
        key_bits=key_bits,
        mode=job.mode,
        batch=job.batch,
        d=job.train.d,
        k=job.train.k,
        batch_eval=job.batch_eval,
        guest="guest",
        host="host",
        encrypted=job.encrypted,
    )


def psi_seconds(*, rows: int, costs: PrimitiveCosts, cores: int) -> float:
    """Wall seconds of a PSI on ``rows`` ids per side.

    Parameters
    ----------
    rows
        Ids on each side (the mean of the two sides if they differ).
    costs
        ``hash_to_curve_s`` and ``x25519_s`` are used.
    cores
        Cores per party (both parties share them on one machine as in the benchmark).

    Returns
    -------
    float
        ``PSI_FIXED_S + PSI_OVERHEAD · 2 · rows · (hash + 2 · x25519) / cores``.

    Raises
    ------
    ConfigError
        If ``rows`` or ``cores`` is below 1.
    """
    if rows < 1 or cores < 1:
        raise ConfigError(f"PSI rows and cores must be at least 1 (got {rows} and {cores})")
    floor = 2 * rows * (costs.hash_to_curve_s + 2 * costs.x25519_s) / cores
    return PSI_FIXED_S + PSI_OVERHEAD * floor


def estimate_job(
    *,
    job: SplitJob,
    train_rows: int,
    validation_rows: int,
    test_rows: int,
    costs: PrimitiveCosts,
    cores: int,
    psi_rows: int | None = None,
) -> JobEstimate:
    """Predict the run time of ``job`` from the §4.9 counts and measured primitive costs.

    The key size is the costs' (``costs.bits``, i.e. the arbiter's key the costs were
    measured with). The number of epochs is ``job.epochs``, an upper bound: early stopping
    may end the job sooner. See the module docstring for the model and its calibration.

    Parameters
    ----------
    job
        The job (mode, batch, batch_eval, epochs, d, k).
    train_rows, validation_rows, test_rows
        Rows of each split (:func:`vfl.data.tables.split_rows`).
    costs
        From :func:`measure_primitive_costs` or :func:`quick_costs`.
    cores
        Cores shared by the three parties (one machine, as in the benchmark; for parties
        on separate machines, the cores of the busiest one is a conservative choice).
    psi_rows
        Ids per side if a PSI runs first; None: no PSI.

    Returns
    -------
    JobEstimate
        Seconds per phase and the total.

    Raises
    ------
    ConfigError
        If a row count or ``cores`` is out of range, the training rows are fewer than one
        batch, or the job is a plaintext experiment (no cryptographic cost model).
    """
    if train_rows < 1:
        raise ConfigError(f"train_rows must be at least 1, got {train_rows}")
    if validation_rows < 0 or test_rows < 0:
        raise ConfigError(
            f"validation_rows and test_rows must be >= 0, got {validation_rows} and {test_rows}"
        )
    if psi_rows is not None and psi_rows < 1:
        raise ConfigError(f"psi_rows must be at least 1 (or None: no PSI), got {psi_rows}")
    if cores < 1:
        raise ConfigError(f"cores must be at least 1, got {cores}")
    if not job.encrypted:
        raise ConfigError("a plaintext job has no cryptographic cost to estimate")
    steps = train_rows // job.batch
    if steps < 1:
        raise ConfigError(
            f"{train_rows} training rows are fewer than one batch of {job.batch}: nothing to train"
        )
    spec = _job_spec(job, costs.bits)
    step = epoch_floor(spec=spec, steps=1, costs=costs, cores=cores)
    step_s = step.floor_s * EPOCH_OVERHEAD

    def eval_s(rows: int, pooled: int) -> float:
        batches = math.ceil(rows / job.batch_eval)
        floor = eval_floor(spec=spec, batches=batches, costs=costs, cores=cores)
        ready = min(pooled, batches * job.batch_eval * spec.kappa_k)
        return (floor.cpu_s - ready * costs.obfuscator_s) / cores * EPOCH_OVERHEAD

    init_rhos = 2 * spec.d * spec.kappa_k + spec.k * spec.kappa_d  # I2 Enc + Obf, I3 Enc
    setup_s = SETUP_FIXED_S + 2 * costs.obfuscator_table_s
    setup_s += init_rhos * (costs.obfuscator_s + costs.mulmod_s) / cores
    validation_s = eval_s(validation_rows, POOL_TARGET)
    test_s = eval_s(test_rows, 0)
    psi_s = 0.0 if psi_rows is None else psi_seconds(rows=psi_rows, costs=costs, cores=cores)
    epoch_s = steps * step_s
    total_s = psi_s + setup_s + job.epochs * (epoch_s + validation_s) + test_s
    return JobEstimate(
        mode=spec.mode.value,
        key_bits=spec.key_bits,
        batch=spec.batch,
        batch_eval=spec.batch_eval,
        d=spec.d,
        k=spec.k,
        cores=cores,
        train_rows=train_rows,
        validation_rows=validation_rows,
        test_rows=test_rows,
        psi_rows=psi_rows or 0,
        steps_per_epoch=steps,
        epochs=job.epochs,
        step_counts=spec.step_counts(),
        step_cpu_s=step.cpu_s_per_step,
        step_s=step_s,
        epoch_s=epoch_s,
        setup_s=setup_s,
        validation_s=validation_s,
        test_s=test_s,
        psi_s=psi_s,
        total_s=total_s,
        overhead=EPOCH_OVERHEAD,
    )


def split_sizes(
    *, rows: int, test_fraction: float, validation_fraction: float
) -> tuple[int, int, int]:
    """Train, validation and test sizes :func:`vfl.data.tables.split_rows` gives ``rows``.

    It holds out ``⌈test_fraction · rows⌉`` test rows, then ``⌈validation_fraction · rest⌉``
    validation rows of the rest (scikit-learn's ``train_test_split`` rounding, stratified or
    not).

    Parameters
    ----------
    rows
        Aligned rows (or an upper bound before the PSI).
    test_fraction, validation_fraction
        As in the job file.

    Returns
    -------
    tuple[int, int, int]
        ``(train, validation, test)``.

    Raises
    ------
    ConfigError
        If ``rows < 1``, a fraction is out of range, or no training row is left.
    """
    if rows < 1:
        raise ConfigError(f"rows must be at least 1, got {rows}")
    if not (0 < test_fraction < 1 and 0 <= validation_fraction < 1):
        raise ConfigError("test_fraction must lie in (0, 1) and validation_fraction in [0, 1)")
    test = math.ceil(test_fraction * rows)
    train = rows - test
    validation = math.ceil(validation_fraction * train) if validation_fraction > 0 else 0
    train -= validation
    if train < 1:
        raise ConfigError(
            f"{rows} rows leave no training rows at test_fraction {test_fraction} and "
            f"validation_fraction {validation_fraction}"
        )
    return train, validation, test


def estimate_job_file(
    job_file: TrainJobFile, *, rows: int, costs: PrimitiveCosts, cores: int, run_psi: bool
) -> JobEstimate:
    """:func:`estimate_job` for a job file, its splits applied to ``rows``.

    Parameters
    ----------
    job_file
        The parsed job file (:func:`vfl.splitnn.jobfile.load_job_file`).
    rows
        The aligned row count or, before the PSI, an upper bound (e.g. the guest's rows).
    costs
        From :func:`quick_costs` or :func:`measure_primitive_costs`.
    cores
        Cores shared by the parties.
    run_psi
        Whether a PSI on ``rows`` ids per side runs first (the job file names no
        ``psi_job``).

    Returns
    -------
    JobEstimate
        Seconds per phase and the total (all ``epochs``; early stopping may end sooner).

    Raises
    ------
    ConfigError
        As :func:`split_sizes` and :func:`estimate_job`.
    """
    train, validation, test = split_sizes(
        rows=rows,
        test_fraction=job_file.test_fraction,
        validation_fraction=job_file.validation_fraction,
    )
    return estimate_job(
        job=job_file.job,
        train_rows=train,
        validation_rows=validation,
        test_rows=test,
        costs=costs,
        cores=cores,
        psi_rows=rows if run_psi else None,
    )


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 7 s"``, ``"2 h 5 min"``.

    Parameters
    ----------
    seconds
        A duration (negative values are shown as 0 s).

    Returns
    -------
    str
        Rounded to the second below an hour, to the minute above.
    """
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m} min {s} s" if s else f"{m} min"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m} min" if m else f"{h} h"


def format_estimate(e: JobEstimate) -> str:
    """A short human-readable summary of an estimate.

    Parameters
    ----------
    e
        From :func:`estimate_job` or :func:`estimate_job_file`.

    Returns
    -------
    str
        A few lines: the total (an upper bound), the phases, the shape.
    """
    fmt = format_duration

    def count(n: int, word: str) -> str:
        return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"

    psi = f"PSI {fmt(e.psi_s)} ({count(e.psi_rows, 'id')} per side) · " if e.psi_rows else ""
    validation = (
        f"validation {fmt(e.validation_s)} after each epoch ({count(e.validation_rows, 'row')})"
        if e.validation_rows
        else "no validation rows (no early stopping)"
    )
    lines = [
        f"Estimated run time ≈ {fmt(e.total_s)} (upper bound: all {count(e.epochs, 'epoch')}; "
        "early stopping may end sooner)",
        f"  {psi}setup {fmt(e.setup_s)}",
        f"  training {e.steps_per_epoch} steps/epoch × {count(e.epochs, 'epoch')} at "
        f"{e.step_s:.1f} s/step = {fmt(e.epoch_s)} per epoch",
        f"  {validation} · test {fmt(e.test_s)} ({count(e.test_rows, 'row')})",
        f"  {e.mode.upper()}, B={e.batch}, d={e.d}, k={e.k}, {e.key_bits}-bit key, "
        f"{count(e.train_rows, 'training row')}, {count(e.cores, 'core')}",
    ]
    return "\n".join(lines)
