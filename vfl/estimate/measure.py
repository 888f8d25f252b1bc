"""Cost measurement: every primitive of a split-NN step and of the PSI, timed in this process.

The first of the three parts of ``vfl estimate``: these seconds per operation are what
:mod:`vfl.estimate.costmodel` multiplies the §4.9 operation counts by, and
:mod:`vfl.estimate.job` turns the result into a job's run time.

:func:`measure_primitive_costs` times, in this process, every primitive one step of the
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
"""

from __future__ import annotations

import random
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

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
from protocols.errors import ConfigError, CryptoError
from psi import ecdh

A_BITS = 28  # |â| < 2^28 (§2.2)
D_BITS = 36  # |δ̂|, |D̂| < 2^36 (§2.2)
FIXED_BASE_WINDOW = 5  # plain_matmul's window for reused ciphertexts
MULTI_EXP_BASES = 128  # B2's ciphertexts per worker: B = 256 over 2 workers

PSI_REFERENCE_HASH_S = 9.46e-6
"""Hash to curve per id, ``benchmarks/results/psi.json`` (default of costs built without it)."""

PSI_REFERENCE_X25519_S = 39.63e-6
"""One X25519 per point, ``benchmarks/results/psi.json`` (default of costs built without it)."""


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


def signed_scalars(rng: random.Random, *, bits: int, count: int) -> list[int]:
    """``count`` integers uniform in ``(-2^bits, 2^bits)``, never zero.

    Parameters
    ----------
    rng
        Where the scalars come from (seeded: the costs do not depend on their values).
    bits
        Scalar size: ``|x| < 2^bits`` (``a_bits`` or ``d_bits``).
    count
        How many.

    Returns
    -------
    list[int]
        The scalars, as the interactive layer's ``â``, ``δ̂`` or ``D̂`` would be.
    """
    top = (1 << bits) - 1
    out: list[int] = []
    while len(out) < count:
        x = rng.randint(-top, top)
        if x:
            out.append(x)
    return out


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
        xs = signed_scalars(rng, bits=bits, count=sample.table_scalars)
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
        exps = [signed_scalars(rng, bits=bits, count=len(me_bases)) for _ in range(outputs)]
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
        xs = [abs(x) for x in signed_scalars(rng, bits=bits, count=sample.powmods)]
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
