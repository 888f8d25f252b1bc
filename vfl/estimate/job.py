"""The job estimate: a split-NN job's run time before it starts, phase by phase, and its report.

The last of the three parts of ``vfl estimate``: the floors of :mod:`vfl.estimate.costmodel`
(at the costs :mod:`vfl.estimate.measure` timed) scaled by calibrated overheads, plus the
set-up, the evaluation passes and the PSI; :func:`format_estimate` prints the result.

:func:`estimate_job` turns the floors into a run time, phase by phase
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
from dataclasses import asdict, dataclass
from typing import Any

from protocols.errors import ConfigError
from vfl.estimate.costmodel import epoch_floor, eval_floor
from vfl.estimate.measure import PrimitiveCosts
from vfl.splitnn.job import SplitJob
from vfl.splitnn.jobfile import TrainJobFile
from vfl.splitnn.spec import JobSpec, StepCounts

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
    may end the job sooner. See this module's docstring for the model and its calibration,
    :mod:`vfl.estimate.costmodel`'s for the floor.

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
