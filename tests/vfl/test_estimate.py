"""vfl.estimate: run-time estimates from the §4.9 counts and primitive costs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.errors import ConfigError
from vfl.data.tables import split_rows
from vfl.estimate.costmodel import epoch_floor, eval_floor
from vfl.estimate.job import (
    EPOCH_OVERHEAD,
    POOL_TARGET,
    PSI_FIXED_S,
    JobEstimate,
    _job_spec,
    estimate_job,
    estimate_job_file,
    format_duration,
    format_estimate,
    psi_seconds,
    split_sizes,
)
from vfl.estimate.measure import (
    PSI_REFERENCE_HASH_S,
    PSI_REFERENCE_X25519_S,
    PrimitiveCosts,
    quick_costs,
)
from vfl.splitnn.job import SplitJob
from vfl.splitnn.jobfile import TrainJobFile, parse_job
from vfl.splitnn.spec import JobSpec, SplitMode
from vfl.splitnn.training import TrainConfig

ROOT = Path(__file__).resolve().parents[2]

# distinct costs, in the proportions of a 2048-bit measurement
COSTS = PrimitiveCosts(
    bits=2048,
    a_bits=28,
    d_bits=36,
    decrypt_s=3.5e-3,
    obfuscator_s=1.7e-3,
    obfuscator_table_s=1.5,
    table_a_s=2.5e-3,
    table_d_s=2.7e-3,
    fixed_base_pow_a_s=34e-6,
    fixed_base_pow_d_s=39e-6,
    multi_exp_a_s=53e-6,
    multi_exp_d_s=63e-6,
    multi_exp_bases=128,
    powmod_a_s=214e-6,
    powmod_d_s=257e-6,
    mulmod_s=6.5e-6,
    invert_s=42e-6,
    rn_s=13e-3,
    measure_s=2.0,
    clock="test",
    hash_to_curve_s=10e-6,
    x25519_s=40e-6,
)


def split_job(
    mode: SplitMode = SplitMode.P1,
    *,
    batch: int = 256,
    batch_eval: int = 1024,
    d: int = 8,
    k: int = 8,
    epochs: int = 12,
) -> SplitJob:
    return SplitJob(
        job_id="estimate-test",
        train=TrainConfig(d=d, k=k),
        mode=mode,
        batch=batch,
        batch_eval=batch_eval,
        epochs=epochs,
    )


def estimate(job: SplitJob | None = None, **kwargs: object) -> JobEstimate:
    args: dict[str, object] = {
        "job": job or split_job(),
        "train_rows": 23_999,
        "validation_rows": 3_001,
        "test_rows": 3_000,
        "costs": COSTS,
        "cores": 2,
    }
    args.update(kwargs)
    return estimate_job(**args)  # type: ignore[arg-type]


def job_file(test_fraction: float, validation_fraction: float) -> TrainJobFile:
    raw = {
        "job": {
            "guest_data": "credit",
            "host_data": "credit",
            "test_fraction": test_fraction,
            "validation_fraction": validation_fraction,
            "batch": 16,
            "batch_eval": 64,
            "epochs": 3,
        }
    }
    return parse_job(raw, source="test")


def test_epoch_is_steps_times_the_step_floor_with_overhead() -> None:
    e = estimate()
    assert e.steps_per_epoch == 23_999 // 256 == 93
    assert e.epochs == 12
    assert e.epoch_s == pytest.approx(e.steps_per_epoch * e.step_s)
    spec = _job_spec(split_job(), 2048)
    floor = epoch_floor(spec=spec, steps=1, costs=COSTS, cores=2)
    assert e.step_cpu_s == pytest.approx(floor.cpu_s_per_step)
    assert e.step_s == pytest.approx(floor.cpu_s_per_step / 2 * EPOCH_OVERHEAD)
    assert e.train_s == pytest.approx(12 * e.epoch_s)


def test_total_adds_up_the_phases() -> None:
    e = estimate(psi_rows=30_000)
    assert e.psi_s > 0 and e.setup_s > 0 and e.validation_s > 0 and e.test_s > 0
    assert e.total_s == pytest.approx(
        e.psi_s + e.setup_s + e.epochs * (e.epoch_s + e.validation_s) + e.test_s
    )
    assert estimate().psi_s == 0.0 and estimate().psi_rows == 0


def test_doubling_the_rows_doubles_the_training_time() -> None:
    one = estimate(train_rows=256 * 40)
    two = estimate(train_rows=256 * 80)
    assert two.steps_per_epoch == 2 * one.steps_per_epoch
    assert two.epoch_s == pytest.approx(2 * one.epoch_s)
    assert two.train_s == pytest.approx(2 * one.train_s)
    assert two.step_s == one.step_s and two.setup_s == one.setup_s


def test_more_cores_shorten_the_steps() -> None:
    assert estimate(cores=4).step_s == pytest.approx(estimate(cores=2).step_s / 2)


def test_p0_costs_more_than_p1() -> None:
    p0 = estimate(split_job(SplitMode.P0))
    p1 = estimate(split_job(SplitMode.P1))
    assert p0.step_s > 5 * p1.step_s
    assert p0.validation_s > p1.validation_s and p0.test_s > p1.test_s
    assert p0.total_s > p1.total_s


@pytest.mark.parametrize("mode", list(SplitMode))
@pytest.mark.parametrize(("batch", "d", "k"), [(256, 8, 8), (64, 32, 16), (128, 3, 40)])
def test_step_counts_are_the_specs(mode: SplitMode, batch: int, d: int, k: int) -> None:
    e = estimate(split_job(mode, batch=batch, d=d, k=k), train_rows=batch * 3)
    spec = JobSpec(
        job_id="x",
        key_id="00" * 16,
        key_bits=2048,
        mode=mode,
        batch=batch,
        d=d,
        k=k,
        batch_eval=1024,
        guest="g",
        host="h",
    )
    assert e.step_counts == spec.step_counts()
    assert (e.mode, e.batch, e.d, e.k, e.key_bits) == (mode.value, batch, d, k, 2048)


def test_evaluation_counts_padded_batches_and_the_pool() -> None:
    job = split_job(batch_eval=1024)
    spec = _job_spec(job, 2048)
    floor = eval_floor(spec=spec, batches=3, costs=COSTS, cores=2)
    items = {i.name.split(" (")[0]: i for i in floor.items}
    assert items["decryptions"].count_per_step == 1024  # κ_k = 1
    assert items["F1 â ⊙ [[W^G]]"].count_per_step == 1024 * 8
    e = estimate(job, validation_rows=2049, test_rows=2049)  # 3 padded batches each
    ready = min(POOL_TARGET, 3 * 1024)
    assert e.test_s == pytest.approx(floor.cpu_s / 2 * EPOCH_OVERHEAD)
    assert e.validation_s == pytest.approx(
        (floor.cpu_s - ready * COSTS.obfuscator_s) / 2 * EPOCH_OVERHEAD
    )
    assert estimate(job, validation_rows=3072).validation_s == pytest.approx(e.validation_s)
    none = estimate(job, validation_rows=0, test_rows=0)
    assert none.validation_s == 0.0 and none.test_s == 0.0


def test_psi_grows_with_the_ids() -> None:
    small = psi_seconds(rows=10_000, costs=COSTS, cores=2)
    large = psi_seconds(rows=20_000, costs=COSTS, cores=2)
    assert large - PSI_FIXED_S == pytest.approx(2 * (small - PSI_FIXED_S))
    assert estimate(psi_rows=10_000).psi_s == pytest.approx(small)


@pytest.mark.parametrize(
    ("rows", "test_fraction", "validation_fraction"),
    [(30_000, 0.1, 0.111111112), (1_000, 0.2, 0.1), (997, 0.15, 0.0), (333, 0.33, 0.25)],
)
def test_job_file_splits_match_split_rows(
    rows: int, test_fraction: float, validation_fraction: float
) -> None:
    labels = np.random.default_rng(rows).integers(0, 2, size=rows)
    splits = split_rows(
        labels, test_fraction=test_fraction, validation_fraction=validation_fraction, seed=0
    )
    jf = job_file(test_fraction, validation_fraction)
    e = estimate_job_file(jf, rows=rows, costs=COSTS, cores=2, run_psi=True)
    assert (e.train_rows, e.validation_rows, e.test_rows) == (
        len(splits.train),
        len(splits.validation),
        len(splits.test),
    )
    assert e.psi_rows == rows and e.epochs == 3 and e.steps_per_epoch == len(splits.train) // 16
    no_psi = estimate_job_file(jf, rows=rows, costs=COSTS, cores=2, run_psi=False)
    assert no_psi.psi_s == 0.0 and no_psi.total_s == pytest.approx(e.total_s - e.psi_s)


def test_estimates_and_costs_round_trip_through_json() -> None:
    e = estimate(psi_rows=30_000)
    assert JobEstimate.from_json(json.loads(json.dumps(e.to_json()))) == e
    assert PrimitiveCosts.from_json(json.loads(json.dumps(COSTS.to_json()))) == COSTS
    with pytest.raises(ConfigError, match="malformed"):
        JobEstimate.from_json({"mode": "p1"})


def test_costs_from_an_older_results_file_take_the_psi_defaults() -> None:
    old = {k: v for k, v in COSTS.to_json().items() if k not in ("hash_to_curve_s", "x25519_s")}
    costs = PrimitiveCosts.from_json(old)
    assert costs.hash_to_curve_s == PSI_REFERENCE_HASH_S
    assert costs.x25519_s == PSI_REFERENCE_X25519_S
    with pytest.raises(ConfigError, match="malformed"):
        PrimitiveCosts.from_json({**old, "decrypt_s": "fast"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_rows": 0}, "train_rows must be at least 1"),
        ({"train_rows": 255}, "fewer than one batch of 256"),
        ({"validation_rows": -1}, "must be >= 0"),
        ({"test_rows": -5}, "must be >= 0"),
        ({"psi_rows": 0}, "psi_rows must be at least 1"),
        ({"cores": 0}, "cores must be at least 1"),
    ],
)
def test_invalid_inputs_are_config_errors(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        estimate(**kwargs)


def test_invalid_job_file_inputs_are_config_errors() -> None:
    jf = job_file(0.2, 0.1)
    with pytest.raises(ConfigError, match="rows must be at least 1, got 0"):
        estimate_job_file(jf, rows=0, costs=COSTS, cores=2, run_psi=False)
    with pytest.raises(ConfigError, match="no training rows"):
        split_sizes(rows=1, test_fraction=0.5, validation_fraction=0.0)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        estimate_job_file(jf, rows=20, costs=COSTS, cores=2, run_psi=False)


def test_plaintext_jobs_and_foreign_key_sizes_are_refused() -> None:
    plain = dataclasses.replace(split_job(), encrypted=False)
    with pytest.raises(ConfigError, match="plaintext"):
        estimate(plain)
    spec = _job_spec(split_job(), 3072)
    with pytest.raises(ConfigError, match="bits"):
        epoch_floor(spec=spec, steps=1, costs=COSTS)


def test_format_estimate_says_it_is_an_upper_bound() -> None:
    text = format_estimate(estimate(psi_rows=30_000))
    assert "upper bound" in text and "early stopping" in text
    assert "93 steps/epoch × 12 epochs" in text and "PSI" in text
    assert "PSI" not in format_estimate(estimate())
    assert format_duration(42.4) == "42 s"
    assert format_duration(187.3) == "3 min 7 s"
    assert format_duration(2 * 3600 + 5 * 60 + 10) == "2 h 5 min"


def test_quick_costs_on_a_small_key(keypair: tuple[PublicKey, PrivateKey]) -> None:
    costs = quick_costs(keypair=keypair)  # checks decryption, tables, multi_exp
    values = dataclasses.asdict(costs)
    assert costs.bits == 1024 and costs.clock == "thread_time"
    assert all(v > 0 for k, v in values.items() if k.endswith("_s"))
    e = estimate_job(
        job=split_job(),
        train_rows=1024,
        validation_rows=100,
        test_rows=100,
        costs=costs,
        cores=2,
        psi_rows=1000,
    )
    assert e.key_bits == 1024 and e.steps_per_epoch == 4 and e.total_s > 0


def test_the_calibration_reproduces_the_benchmark_epoch() -> None:
    path = ROOT / "benchmarks" / "results" / "splitnn.json"
    if not path.is_file():
        pytest.skip("no benchmark results")
    result = json.loads(path.read_text())
    costs = PrimitiveCosts.from_json(result["costs"])
    job = split_job(batch=result["batch"], d=result["d"], k=result["k"], epochs=1)
    e = estimate(job, train_rows=result["rows"], costs=costs, cores=result["machine"]["cpus"])
    assert e.steps_per_epoch == result["steps"]
    assert math.isclose(e.epoch_s, result["epoch_wall_s"], rel_tol=0.1)
