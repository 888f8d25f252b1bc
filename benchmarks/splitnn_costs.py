"""Cost model of one split-NN training epoch: primitive costs, the §4.9 floor, a naive phe baseline.

A library for ``benchmarks/splitnn.py`` (nothing runs at import). Three parts:

1. :func:`measure_primitive_costs` times, in this process, every primitive one step of the
   interactive layer is made of, each through the engine's own code path:

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
     ``rn_s`` = ``r^n mod n²`` (an obfuscator without the fixed base).

   Scalars are drawn uniformly with ``|x| < 2^a_bits`` (``â``, default 28) and
   ``|x| < 2^d_bits`` (``δ̂``, default 36), the strict bounds of §2.2. Real scalars are often
   shorter (``|α| < 8`` gives ``|â| < 2^27``; a mean-reduced loss gives ``δ̂`` far below its
   bound) and the engine sizes its tables to the largest scalar of the chunk, so a run can
   pass the bit lengths it actually saw.

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
     ``few_reuse="powmod"`` costs these products as plain ``gmpy2.powmod`` instead (the
     issue's wording "powmod otherwise"), ``"fixed_base"`` as tables amortised over d.

   The three products' scalar counts add up to ``StepCounts.scalar_mults`` (checked).
   Also counted: one decryption per ``StepCounts.decryptions`` (A), one obfuscator per
   ``StepCounts.obfuscators`` (fresh encryptions and obfuscations, split between G and H),
   one ``mulmod`` per ``⊕`` (each table-path term into its output, each plaintext addend,
   each decryption mask ``c ⊕ R``, each use of a ``ρ``, each ``⊖``), one inversion per
   ``StepCounts.inverses`` (H's ``[[W^G]] ⊖ [[V̂]]``; the tables' own inversions are inside
   ``table_*_s``). Not counted: encoding, packing, unpacking, mask sampling, serialisation,
   transport, the combination of the workers' partial products, and the ``h_s`` tables
   (``obfuscator_tables`` adds some). The floor is CPU work divided by the cores, i.e.
   perfect balance of all three parties' work over the machine.

3. :func:`naive_phe_epoch_seconds` writes the same epoch's P0 flow (F1, F2/F3, B1-1..B1-3,
   B2-1..B2-4 and H's ``⊖`` of §4.4) straightforwardly with python-paillier's
   ``EncryptedNumber``: ``EncryptedNumber * int`` for the small scalars, ``+`` for sums and
   plaintext addends (uniform residues as ``EncodedNumber`` at exponent 0: phe's ``encode``
   refuses integers beyond ``n/3``), ``public_key.encrypt`` for fresh encryptions,
   ``ciphertext()`` of every result that is sent (phe re-obfuscates every not yet obfuscated
   result there: one ``r^n`` each) and ``decrypt_encoded`` at the arbiter (``decrypt`` would
   refuse the uniform masked residues). A masked decryption is ``(c + R).ciphertext()`` then a
   decryption: one ``r^n`` (the same work as a phe encryption of ``R``, not both) and one
   decryption per value; ``obfuscate_masked=False`` sends ``c + R`` unobfuscated, as §2.4
   allows (a decryption per value, no ``r^n``). Each message is timed on ``sample_rows``
   rows in one process and scaled linearly to a step and to ``steps`` steps; the scale
   factors are in the result.

Timing: each figure is the median over ``repeats`` batches (costs) or one pass over the
sample (naive), read by default from ``time.thread_time`` (the calling thread's CPU time;
everything measured runs in that thread), so other processes on the machine inflate it far
less than wall time; pass ``clock=time.perf_counter`` (``--wall``) for wall time.

Run ``python benchmarks/splitnn_costs.py`` for all three at 2048 bits (10-20 s).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import gmpy2
from gmpy2 import mpz
from phe import paillier as phe_paillier
from phe.encoding import EncodedNumber

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
from vfl.splitnn.spec import JobSpec, SplitMode

TRAIN_ROWS = 24_000
BATCH = 256
DEFAULT_STEPS = TRAIN_ROWS // BATCH  # 93: the last partial batch is dropped
A_BITS = 28  # |â| < 2^28 (§2.2)
D_BITS = 36  # |δ̂|, |D̂| < 2^36 (§2.2)
FIXED_BASE_WINDOW = 5  # plain_matmul's window for reused ciphertexts

FewReuse = Literal["multi_exp", "powmod", "fixed_base"]


def _median_per_op(
    fn: Callable[[], object], ops: int, repeats: int, clock: Callable[[], float]
) -> float:
    """Median over ``repeats`` runs of the time of ``fn()`` on ``clock``, divided by ``ops``."""
    times = []
    for _ in range(max(1, repeats)):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times) / ops


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


def measure_primitive_costs(
    *,
    public_key: PublicKey,
    private_key: PrivateKey,
    repeats: int = 3,
    a_bits: int = A_BITS,
    d_bits: int = D_BITS,
    multi_exp_bases: int = BATCH // 2,
    seed: int = 0,
    clock: Callable[[], float] = time.thread_time,
) -> PrimitiveCosts:
    """Time every primitive of a split-NN step through the engine's own code.

    Each figure is the median over ``repeats`` batches of operations. About 3-4 s at
    2048 bits, plus about 1.3 s to build the ``h_s`` table (about 120 MB at 2048 bits).
    The table is left in :func:`protocols.crypto.obfuscators.hs_table`'s cache, as any
    use of the generator would; if this process already had it, a second one is built
    and dropped, to time the build.

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

    Returns
    -------
    PrimitiveCosts
        Seconds per operation.
    """
    started = time.perf_counter()
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
    obf_count = 120
    rhos: list[mpz] = []

    def make_rhos() -> None:
        rhos.extend(generate(n, pk.h_s, pk.bits, ObfuscatorKind.FIXED_BASE, obf_count))

    obfuscator_s = _median_per_op(make_rhos, obf_count, repeats, clock)
    need = max(200, multi_exp_bases)
    if len(rhos) < need:  # untimed top-up: enough distinct ciphertexts for what follows
        rhos.extend(generate(n, pk.h_s, pk.bits, ObfuscatorKind.FIXED_BASE, need - len(rhos)))
    cts = [pk.encrypt(secrets.randbelow(int(n)), rho) for rho in rhos]
    ms = [secrets.randbelow(int(n)) for _ in range(8)]
    if [sk.decrypt(pk.encrypt(m, rho)) for m, rho in zip(ms, rhos, strict=False)] != ms:
        raise AssertionError("decryption of fresh encryptions failed")

    # decryption (the arbiter's path)
    dec_cts = cts[:48]
    decrypt_s = _median_per_op(
        lambda: [sk.decrypt(c) for c in dec_cts], len(dec_cts), repeats, clock
    )

    # fixed-base tables and pows, as plain_matmul builds them per reused ciphertext
    def table_costs(bits: int) -> tuple[float, float]:
        bases = cts[:8]
        tables: list[SignedFixedBase] = []

        def build() -> None:
            tables.clear()
            tables.extend(
                SignedFixedBase(c, n2, exp_bits=bits, window=FIXED_BASE_WINDOW) for c in bases
            )

        table_s = _median_per_op(build, len(bases), repeats, clock)
        xs = _signed_scalars(rng, bits, 400)
        pow_s = _median_per_op(
            lambda: [tables[i % len(tables)].pow(x) for i, x in enumerate(xs)],
            len(xs),
            repeats,
            clock,
        )
        if tables[0].pow(xs[0]) != pk.mul_scalar(bases[0], xs[0]):
            raise AssertionError("fixed-base table disagrees with powmod")
        return table_s, pow_s

    table_a_s, pow_a_s = table_costs(a_bits)
    table_d_s, pow_d_s = table_costs(d_bits)

    # Pippenger multi-exponentiation (B2's method), per scalar
    me_bases = cts[:multi_exp_bases]

    def multi_exp_cost(bits: int) -> float:
        outputs = 4
        exps = [_signed_scalars(rng, bits, len(me_bases)) for _ in range(outputs)]
        per_scalar = _median_per_op(
            lambda: [multi_exp(me_bases, x, n2) for x in exps],
            outputs * len(me_bases),
            repeats,
            clock,
        )
        check = mpz(1)
        for c, x in zip(me_bases[:6], exps[0][:6], strict=True):
            check = check * pk.mul_scalar(c, x) % n2
        if multi_exp(me_bases[:6], exps[0][:6], n2) != check:
            raise AssertionError("multi_exp disagrees with powmod")
        return per_scalar

    multi_exp_a_s = multi_exp_cost(a_bits)
    multi_exp_d_s = multi_exp_cost(d_bits)

    # plain powmod with a small exponent, mulmod, inversion, r^n
    def powmod_cost(bits: int) -> float:
        xs = [abs(x) for x in _signed_scalars(rng, bits, 150)]
        return _median_per_op(
            lambda: [gmpy2.powmod(cts[i % 64], x, n2) for i, x in enumerate(xs)],
            len(xs),
            repeats,
            clock,
        )

    powmod_a_s = powmod_cost(a_bits)
    powmod_d_s = powmod_cost(d_bits)
    pairs = list(zip(cts[:100], cts[100:200], strict=True))
    mulmod_s = _median_per_op(
        lambda: [a * b % n2 for _ in range(20) for a, b in pairs], 20 * len(pairs), repeats, clock
    )
    invert_s = _median_per_op(
        lambda: [gmpy2.invert(c, n2) for c in cts[:200]], len(cts[:200]), repeats, clock
    )
    rs = [mpz(secrets.randbelow(int(n) - 1) + 1) for _ in range(12)]
    rn_s = _median_per_op(lambda: [gmpy2.powmod(r, n, n2) for r in rs], len(rs), repeats, clock)

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
    """The §4.9 floor of one epoch.

    Attributes
    ----------
    mode, batch, d, k, slots
        The job's shape (``slots`` = 1 in P0).
    steps
        Training steps in the epoch.
    cores
        The CPU seconds are divided by this.
    few_reuse
        How products on rarely reused ciphertexts (B2) were costed.
    items
        The lines; their CPU seconds add up to ``cpu_s_per_step``.
    obfuscator_tables
        ``h_s`` tables counted as built during the epoch (a one-off each).
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
    """
    if steps < 0 or cores < 1:
        raise ValueError("steps must be >= 0 and cores >= 1")
    if not getattr(spec, "encrypted", True):
        raise ValueError("a plaintext-mode job has no cryptographic floor")
    if spec.key_bits != costs.bits:
        raise ValueError(f"costs were measured at {costs.bits} bits, the job uses {spec.key_bits}")
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


# -- 3. the naive phe baseline ------------------------------------------------------------


@dataclass(frozen=True)
class NaiveMessage:
    """One message type of the naive flow, timed on a sample and scaled to a step.

    Attributes
    ----------
    name
        Message (§4.4 numbering).
    party
        Who computes it (the arbiter's decryptions are inside the ``MD`` messages).
    unit
        What one sampled unit is (a batch row, or a row of a d×k matrix).
    ops_per_unit
        The phe operations of one unit.
    sampled_units
        Units timed.
    sampled_s
        Their time (see :attr:`NaiveEstimate.clock`).
    units_per_step
        Units in one step.
    """

    name: str
    party: str
    unit: str
    ops_per_unit: str
    sampled_units: int
    sampled_s: float
    units_per_step: int

    @property
    def scale(self) -> float:
        """Step / sample: ``units_per_step / sampled_units``."""
        return self.units_per_step / self.sampled_units

    @property
    def step_s(self) -> float:
        """Seconds per step, ``sampled_s · scale``."""
        return self.sampled_s * self.scale


@dataclass(frozen=True)
class NaiveEstimate:
    """The naive phe epoch: per-message seconds and how they were scaled.

    Attributes
    ----------
    bits, batch, d, k, steps
        The shape (P0, unpacked).
    sample_rows
        Units timed per message.
    obfuscate_masked
        Whether masked values were re-obfuscated before going to the arbiter.
    clock
        The clock the messages were timed on.
    messages
        Per-message timing and scale.
    """

    bits: int
    batch: int
    d: int
    k: int
    steps: int
    sample_rows: int
    obfuscate_masked: bool
    clock: str
    messages: tuple[NaiveMessage, ...]

    @property
    def step_s(self) -> float:
        """Seconds per step (one process)."""
        return sum(m.step_s for m in self.messages)

    @property
    def epoch_s(self) -> float:
        """Seconds per epoch, ``step_s · steps`` (one process)."""
        return self.step_s * self.steps

    @property
    def per_row_s(self) -> float:
        """Seconds per training row."""
        return self.step_s / self.batch

    def to_json(self) -> dict[str, Any]:
        """Everything, with the scale factors, for a results file."""
        return {
            "bits": self.bits,
            "batch": self.batch,
            "d": self.d,
            "k": self.k,
            "steps": self.steps,
            "sample_rows": self.sample_rows,
            "obfuscate_masked": self.obfuscate_masked,
            "clock": self.clock,
            "messages": [
                {
                    **asdict(m),
                    "scale": m.scale,
                    "step_s": m.step_s,
                    "epoch_s": m.step_s * self.steps,
                }
                for m in self.messages
            ],
            "step_s": self.step_s,
            "per_row_s": self.per_row_s,
            "epoch_s": self.epoch_s,
        }


def _timed_call(fn: Callable[[], list[Any]], clock: Callable[[], float]) -> tuple[float, list[Any]]:
    """Time of ``fn()`` on ``clock`` and its result."""
    start = clock()
    out = fn()
    return clock() - start, out


def naive_phe_epoch_seconds(
    *,
    bits: int = 2048,
    batch: int = BATCH,
    d: int = 8,
    k: int = 8,
    steps: int = DEFAULT_STEPS,
    sample_rows: int = 2,
    seed: int = 0,
    a_bits: int = A_BITS,
    d_bits: int = D_BITS,
    keypair: tuple[PublicKey, PrivateKey] | None = None,
    obfuscate_masked: bool = True,
    clock: Callable[[], float] = time.thread_time,
) -> NaiveEstimate:
    """The P0 epoch written straightforwardly with phe's ``EncryptedNumber``, timed and scaled.

    Every message of §4.4 (P0) is computed in this one process on ``sample_rows`` units
    (batch rows for the B-sized messages; rows of the d×k matrices for B2-2's finish,
    B2-3, B2-4 and H's update) and scaled by ``units_per_step / sampled_units``; the step
    by ``steps``. Inputs from the initialisation (``[[W^G]]``, ``[[E]]``, the shares) are
    made untimed. The decrypted ``Ẑ``, ``Ĝ`` and ``V̂`` are checked against plaintext
    arithmetic, so the timed code computes what the protocol computes.

    Parameters
    ----------
    bits
        Key size (a phe key is generated unless ``keypair`` is given).
    batch, d, k
        B, host embedding width, interactive width.
    steps
        Steps per epoch.
    sample_rows
        Units timed per message (at most ``batch``; at most ``d`` for the d×k messages).
    seed
        Seed of the scalars and shares (masks use the OS CSPRNG, as phe's obfuscators do).
    a_bits, d_bits
        ``|â| < 2^a_bits``, ``|δ̂|, |D̂| < 2^d_bits``.
    keypair
        The engine's keys to reuse (saves a key generation); ``bits`` is then ignored.
    obfuscate_masked
        Send ``c + R`` with ``ciphertext()`` (default: phe re-obfuscates it, one ``r^n``);
        ``False`` sends ``ciphertext(be_secure=False)``, which §2.4 allows for a masked
        value: a naive flow that knows this saves one ``r^n`` per decrypted value.
    clock
        By default this thread's CPU time (the one-process flow's duration on an idle
        machine); ``time.perf_counter`` for wall time.

    Returns
    -------
    NaiveEstimate
        Per-message seconds, scale factors, per-step and per-epoch seconds.
    """
    if not 1 <= sample_rows <= batch:
        raise ValueError("sample_rows must lie in [1, batch]")
    if keypair is None:
        ppk, psk = phe_paillier.generate_paillier_keypair(n_length=bits)
    else:
        ppk = phe_paillier.PaillierPublicKey(int(keypair[0].n))
        psk = phe_paillier.PaillierPrivateKey(ppk, int(keypair[1].p), int(keypair[1].q))
    n: int = int(ppk.n)
    n2 = n * n
    rng = random.Random(seed)
    rows = range(sample_rows)
    mat_rows = range(min(sample_rows, d))
    enc_number = phe_paillier.EncryptedNumber

    # untimed inputs: valid ciphertexts from a cheap chain of obfuscators
    rho0 = int(gmpy2.powmod(secrets.randbelow(n - 1) + 1, n, n2))
    chain = [rho0]

    def held(m: int) -> Any:
        chain[0] = chain[0] * rho0 % n2
        return enc_number(ppk, (1 + m % n * n) * chain[0] % n2, 0)

    def encoded(m: int) -> Any:
        """A residue as a phe plaintext (``encode`` refuses integers beyond n/3)."""
        return EncodedNumber(ppk, m % n, 0)

    def received(wire: int) -> Any:
        return enc_number(ppk, wire, 0)

    wg = [[rng.randrange(n) for _ in range(k)] for _ in range(d)]  # G's share, uniform in Z_n
    e = [[rng.randrange(n) for _ in range(k)] for _ in range(d)]  # H's share
    e_new = [[rng.randrange(n) for _ in range(k)] for _ in range(d)]  # H's E'
    enc_wg = [[held(v) for v in row] for row in wg]  # at H
    enc_e = [[held(v) for v in row] for row in e]  # at G
    a_hat = [_signed_scalars(rng, a_bits, d) for _ in rows]
    d_hat = [_signed_scalars(rng, d_bits, k) for _ in rows]  # δ̂ (B1)
    big_d = [_signed_scalars(rng, d_bits, k) for _ in rows]  # D̂ = enc(η_W·δ̃) (B2)
    v_acc: list[list[Any]] = [[None] * k for _ in range(d)]
    out: dict[str, list[Any]] = {}

    def masked_decrypt(wires: Sequence[int]) -> list[int]:
        """MD of §2.5 per value: the requester adds R and sends ciphertext(); A decrypts."""
        plain = []
        for wire in wires:
            mask = secrets.randbelow(n)
            sent = (received(wire) + encoded(mask)).ciphertext(be_secure=obfuscate_masked)
            y = psk.decrypt_encoded(received(sent)).encoding  # at A
            plain.append((y - mask) % n)
        return plain

    def f1() -> list[Any]:  # H: [[Ẑ_bj]] = Σ_i â_bi ⊙ [[W^G_ij]] ⊕ Σ_i â_bi E_ij
        sent = []
        for b in rows:
            for j in range(k):
                acc = enc_wg[0][j] * a_hat[b][0]
                for i in range(1, d):
                    acc = acc + enc_wg[i][j] * a_hat[b][i]
                sent.append(
                    (acc + encoded(sum(a_hat[b][i] * e[i][j] for i in range(d)))).ciphertext()
                )
        return sent

    def b1() -> list[Any]:  # G: [[Ĝ_bi]] = Σ_j δ̂_bj ⊙ [[E_ij]] ⊕ Σ_j δ̂_bj W^G_ij
        sent = []
        for b in rows:
            for i in range(d):
                acc = enc_e[i][0] * d_hat[b][0]
                for j in range(1, k):
                    acc = acc + enc_e[i][j] * d_hat[b][j]
                sent.append(
                    (acc + encoded(sum(d_hat[b][j] * wg[i][j] for j in range(k)))).ciphertext()
                )
        return sent

    def b2_terms() -> list[Any]:  # H: Σ_b â_bi ⊙ [[D̂_bj]], the sampled rows' terms
        for b in rows:
            for j in range(k):
                c = received(out["B2-1"][b * k + j])
                for i in range(d):
                    term = c * a_hat[b][i]
                    v_acc[i][j] = term if v_acc[i][j] is None else v_acc[i][j] + term
        return []

    cells = [(i, j) for i in mat_rows for j in range(k)]
    md = "ciphertext()" if obfuscate_masked else "ciphertext(be_secure=False)"

    def h_update() -> list[Any]:  # H: [[W^G]] ⊖ [[V̂]] with the ciphertext it sent
        return [enc_wg[i][j] - received(w) for (i, j), w in zip(cells, out["B2-2"], strict=True)]

    plan: list[tuple[str, str, str, str, bool, Callable[[], list[Any]]]] = [
        ("F1", "F1 [[Ẑ]]", "H", f"{d * k} x*int, {d * k} +, {k} ciphertext()", True, f1),
        ("F2/F3", "F2/F3 MD Z_FWD", "G+A", f"{k} x (+R, {md}, decrypt)", True,
         lambda: masked_decrypt(out["F1"])),
        ("B1-1", "B1-1 [[Ĝ]]", "G", f"{d * k} x*int, {d * k} +, {d} ciphertext()", True, b1),
        ("B1-2/3", "B1-2/B1-3 MD G_BWD", "H+A", f"{d} x (+R, {md}, decrypt)", True,
         lambda: masked_decrypt(out["B1-1"])),
        ("B2-1", "B2-1 [[D̂]]", "G", f"{k} encrypt", True,
         lambda: [ppk.encrypt(big_d[b][j]).ciphertext() for b in rows for j in range(k)]),
        ("B2-2 terms", "B2-2 terms âᵀ ⊙ [[D̂]]", "H", f"{d * k} x*int, {d * k} +", True,
         b2_terms),
        ("B2-2", "B2-2 [[V̂]] finish", "H", f"{k} + (E'-E), {k} ciphertext()", False,
         lambda: [(v_acc[i][j] + encoded(e_new[i][j] - e[i][j])).ciphertext() for i, j in cells]),
        ("B2-3", "B2-3 [[E']]", "H", f"{k} encrypt", False,
         lambda: [ppk.encrypt(encoded(e_new[i][j])).ciphertext() for i, j in cells]),
        ("B2-4", "B2-4 MD V_WUPD", "G+A", f"{k} x (+R, {md}, decrypt)", False,
         lambda: masked_decrypt(out["B2-2"])),
        ("H update", "H [[W^G]] ⊖ [[V̂]]", "H", f"{k} -", False, h_update),
    ]  # fmt: skip
    messages = []
    for key, name, party, ops, per_batch_row, fn in plan:
        seconds, out[key] = _timed_call(fn, clock)
        unit, units, per_step = (
            ("batch row", len(rows), batch) if per_batch_row else ("row of d×k", len(mat_rows), d)
        )
        messages.append(NaiveMessage(name, party, unit, ops, units, seconds, per_step))

    # the timed code computed the protocol's values
    z = [
        sum(a_hat[b][i] * (wg[i][j] + e[i][j]) for i in range(d)) % n
        for b in rows
        for j in range(k)
    ]
    g = [
        sum(d_hat[b][j] * (wg[i][j] + e[i][j]) for j in range(k)) % n
        for b in rows
        for i in range(d)
    ]
    v = [
        (sum(a_hat[b][i] * big_d[b][j] for b in rows) + e_new[i][j] - e[i][j]) % n for i, j in cells
    ]
    if out["F2/F3"] != z or out["B1-2/3"] != g or out["B2-4"] != v:
        raise AssertionError("the naive phe flow decrypted wrong values")

    return NaiveEstimate(
        bits=n.bit_length(),
        batch=batch,
        d=d,
        k=k,
        steps=steps,
        sample_rows=sample_rows,
        obfuscate_masked=obfuscate_masked,
        clock=getattr(clock, "__name__", repr(clock)),
        messages=tuple(messages),
    )


# -- standalone run -------------------------------------------------------------------------


def _print_costs(costs: PrimitiveCosts) -> None:
    us = 1e6
    rows = [
        ("CRT decryption (PrivateKey.decrypt)", costs.decrypt_s),
        ("fixed-base obfuscator h_s^x (generate)", costs.obfuscator_s),
        ("  h_s table build, once per process", costs.obfuscator_table_s),
        (f"c/c⁻¹ tables, {costs.a_bits}-bit scalars, per ciphertext", costs.table_a_s),
        (f"c/c⁻¹ tables, {costs.d_bits}-bit scalars, per ciphertext", costs.table_d_s),
        (f"fixed-base pow, |x| < 2^{costs.a_bits}", costs.fixed_base_pow_a_s),
        (f"fixed-base pow, |x| < 2^{costs.d_bits}", costs.fixed_base_pow_d_s),
        ("  incl. table / 256 reuses, a", costs.fixed_base_mult_a_s(BATCH)),
        ("  incl. table / 256 reuses, d", costs.fixed_base_mult_d_s(BATCH)),
        (f"multi_exp per scalar, {costs.multi_exp_bases} bases, a", costs.multi_exp_a_s),
        (f"multi_exp per scalar, {costs.multi_exp_bases} bases, d", costs.multi_exp_d_s),
        (f"gmpy2.powmod, {costs.a_bits}-bit exponent", costs.powmod_a_s),
        (f"gmpy2.powmod, {costs.d_bits}-bit exponent", costs.powmod_d_s),
        ("mulmod (⊕)", costs.mulmod_s),
        ("invert mod n²", costs.invert_s),
        ("r^n mod n² (context)", costs.rn_s),
    ]
    print(
        f"\nPrimitive costs, {costs.bits}-bit key, {costs.clock} "
        f"(measured in {costs.measure_s:.1f} s)"
    )
    for label, seconds in rows:
        print(f"  {label:<52} {seconds * us:>12.1f} µs")


def _print_floor(floor: FloorBreakdown) -> None:
    print(
        f"\nFloor, {floor.mode.upper()} B={floor.batch} d={floor.d} k={floor.k} "
        f"S={floor.slots}, {floor.steps} steps, {floor.cores} cores, few_reuse={floor.few_reuse}"
    )
    print(f"  {'item':<38} {'party':<5} {'count/step':>10} {'cost µs':>9} {'CPU s/epoch':>12}")
    for item in floor.items:
        print(
            f"  {item.name:<38} {item.party:<5} {item.count_per_step:>10} "
            f"{item.cost_s * 1e6:>9.1f} {item.cpu_s_per_step * floor.steps:>12.2f}"
        )
        print(f"      {item.method}")
    parties = ", ".join(f"{p} {s:.1f} s" for p, s in sorted(floor.by_party().items()))
    print(f"  CPU per step {floor.cpu_s_per_step:.3f} s; per epoch {floor.cpu_s:.1f} s ({parties})")
    print(f"  floor_s = {floor.cpu_s:.1f} / {floor.cores} = {floor.floor_s:.1f} s")


def _print_naive(naive: NaiveEstimate) -> None:
    print(
        f"\nNaive phe P0 epoch, B={naive.batch} d={naive.d} k={naive.k}, {naive.steps} steps, "
        f"{naive.bits}-bit, one process, {naive.clock}"
    )
    print(f"  {'message':<24} {'party':<5} {'timed':>10} {'scale':>8} {'s/step':>9} {'s/epoch':>9}")
    for m in naive.messages:
        print(
            f"  {m.name:<24} {m.party:<5} {m.sampled_s:>9.3f}s {m.scale:>8.1f} "
            f"{m.step_s:>9.2f} {m.step_s * naive.steps:>9.1f}"
        )
        print(f"      {m.sampled_units} x {m.unit} of {m.units_per_step}/step: {m.ops_per_unit}")
    print(
        f"  per step {naive.step_s:.1f} s, per row {naive.per_row_s * 1e3:.0f} ms, "
        f"per epoch {naive.epoch_s:.0f} s ({naive.epoch_s / 3600:.2f} h)"
    )


def main() -> None:
    """Measure costs, print the floor of the default epoch and the naive phe estimate."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--mode", choices=[m.value for m in SplitMode], default="p1")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-rows", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print everything as JSON")
    parser.add_argument(
        "--wall", action="store_true", help="time on the wall clock instead of thread CPU time"
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.thread_time

    t = time.perf_counter()
    pk, sk = generate_keypair(bits=args.bits)
    print(f"key generation: {time.perf_counter() - t:.1f} s")
    costs = measure_primitive_costs(
        public_key=pk, private_key=sk, repeats=args.repeats, clock=clock
    )
    _print_costs(costs)
    spec = JobSpec(
        job_id="splitnn-costs",
        key_id=pk.key_id.hex(),
        key_bits=pk.bits,
        mode=SplitMode(args.mode),
        batch=args.batch,
        d=args.d,
        k=args.k,
        batch_eval=args.batch,
        guest="guest",
        host="host",
    )
    floor = epoch_floor(spec=spec, steps=args.steps, costs=costs, cores=args.cores)
    _print_floor(floor)
    alternatives = {
        few: epoch_floor(
            spec=spec, steps=args.steps, costs=costs, cores=args.cores, few_reuse=few
        ).floor_s
        for few in ("powmod", "fixed_base")
    }
    print(
        "  B2 costed otherwise: "
        + ", ".join(f"{few} -> floor {s:.1f} s" for few, s in alternatives.items())
    )
    t = time.perf_counter()
    naive = naive_phe_epoch_seconds(
        batch=args.batch,
        d=args.d,
        k=args.k,
        steps=args.steps,
        sample_rows=args.sample_rows,
        keypair=(pk, sk),
        clock=clock,
    )
    _print_naive(naive)
    print(f"  (timed in {time.perf_counter() - t:.1f} s)")
    lean = naive_phe_epoch_seconds(
        batch=args.batch,
        d=args.d,
        k=args.k,
        steps=args.steps,
        sample_rows=args.sample_rows,
        keypair=(pk, sk),
        obfuscate_masked=False,
        clock=clock,
    )
    print(
        f"  without re-obfuscating c + R (§2.4): per step {lean.step_s:.1f} s, "
        f"per epoch {lean.epoch_s:.0f} s"
    )
    print(
        f"\nnaive / floor = {naive.epoch_s / floor.floor_s:.0f}x; an epoch at 1.5 x floor "
        f"({1.5 * floor.floor_s:.0f} s) would be {naive.epoch_s / (1.5 * floor.floor_s):.0f}x "
        "faster than naive"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "costs": costs.to_json(),
                    "floor": floor.to_json(),
                    "floor_alternatives_s": alternatives,
                    "naive": naive.to_json(),
                    "naive_unobfuscated_masks": lean.to_json(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
