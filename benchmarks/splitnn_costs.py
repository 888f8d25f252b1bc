"""Cost model of one split-NN training epoch: primitive costs, the §4.9 floor, a naive phe baseline.

A library for ``benchmarks/splitnn.py`` (nothing runs at import). Three parts:

1. :func:`vfl.estimate.measure.measure_primitive_costs` times, in this process, every
   primitive one step of the interactive layer is made of, each through the engine's own
   code path (CRT decryption, fixed-base obfuscators, signed fixed-base tables and pows,
   Pippenger multi-exponentiation, powmod, mulmod, inversion; see that module);
2. :func:`vfl.estimate.costmodel.epoch_floor` multiplies the §4.9 counts of one step
   (:meth:`vfl.splitnn.spec.JobSpec.step_counts`) by these costs, times the steps, divided by
   the cores, each product costed by the method ``plain_matmul`` uses (``few_reuse`` costs
   B2 otherwise). Both live in :mod:`vfl.estimate` (behind ``vfl estimate``) and
   are imported from there;
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

Run ``python -m benchmarks.splitnn_costs`` for all three at 2048 bits (10-20 s).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where benchmarks/psi.py would shadow
# the psi package that vfl.estimate.measure imports: drop the folder (as splitnn.py does).
if __name__ == "__main__":
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import json
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gmpy2
from phe import paillier as phe_paillier
from phe.encoding import EncodedNumber

from protocols.crypto.paillier import PrivateKey, PublicKey, generate_keypair
from vfl.estimate.costmodel import FloorBreakdown, epoch_floor
from vfl.estimate.measure import (
    A_BITS,
    D_BITS,
    PrimitiveCosts,
    measure_primitive_costs,
    signed_scalars,
)
from vfl.splitnn.spec import JobSpec, SplitMode

__all__ = [
    "A_BITS",
    "BATCH",
    "D_BITS",
    "DEFAULT_STEPS",
    "TRAIN_ROWS",
    "FloorBreakdown",
    "NaiveEstimate",
    "NaiveMessage",
    "PrimitiveCosts",
    "epoch_floor",
    "measure_primitive_costs",
    "naive_phe_epoch_seconds",
]

TRAIN_ROWS = 24_000
BATCH = 256
DEFAULT_STEPS = TRAIN_ROWS // BATCH  # 93: the last partial batch is dropped


# -- the naive phe baseline --- ------------------------------------------------------------


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
    a_hat = [signed_scalars(rng, bits=a_bits, count=d) for _ in rows]
    d_hat = [signed_scalars(rng, bits=d_bits, count=k) for _ in rows]  # δ̂ (B1)
    big_d = [signed_scalars(rng, bits=d_bits, count=k) for _ in rows]  # D̂ = enc(η_W·δ̃) (B2)
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
        ("PSI hash to curve, per id", costs.hash_to_curve_s),
        ("PSI X25519 mask, per point", costs.x25519_s),
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
