"""The cost model: the §4.9 operation counts of one split-NN step times measured costs.

The second of the three parts of ``vfl estimate``: the floor (CPU seconds over the cores) of a
training epoch or an evaluation pass, from :meth:`vfl.splitnn.spec.JobSpec.step_counts` and
the :class:`~vfl.estimate.measure.PrimitiveCosts` of :mod:`vfl.estimate.measure`;
:mod:`vfl.estimate.job` turns floors into a job's run time.

:func:`epoch_floor` multiplies the §4.9 counts of one step
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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from protocols.crypto.tensor import TABLE_MIN_REUSE
from protocols.errors import ConfigError
from vfl.estimate.measure import FIXED_BASE_WINDOW, PrimitiveCosts
from vfl.splitnn.spec import JobSpec

FewReuse = Literal["multi_exp", "powmod", "fixed_base"]


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
