"""benchmarks/splitnn_costs.py: the floor's arithmetic against hand counts, and small-key runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from protocols.crypto.paillier import generate_keypair
from vfl.splitnn.spec import JobSpec, SplitMode

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "splitnn_costs", ROOT / "benchmarks" / "splitnn_costs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["splitnn_costs"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


sc = _load()

# distinct, exactly representable costs so every line can be recognised in the total
COSTS = sc.PrimitiveCosts(
    bits=2048,
    a_bits=28,
    d_bits=36,
    decrypt_s=1.0,
    obfuscator_s=0.5,
    obfuscator_table_s=64.0,
    table_a_s=256.0,
    table_d_s=512.0,
    fixed_base_pow_a_s=0.125,
    fixed_base_pow_d_s=0.25,
    multi_exp_a_s=0.0625,
    multi_exp_d_s=0.03125,
    multi_exp_bases=128,
    powmod_a_s=2.0,
    powmod_d_s=4.0,
    mulmod_s=0.001,
    invert_s=8.0,
    rn_s=16.0,
    measure_s=0.0,
    clock="test",
)


def job(mode: SplitMode, batch: int, d: int, k: int, bits: int = 2048) -> JobSpec:
    return JobSpec(
        job_id="j",
        key_id="00" * 16,
        key_bits=bits,
        mode=mode,
        batch=batch,
        d=d,
        k=k,
        batch_eval=batch,
        guest="g",
        host="h",
    )


def test_p1_floor_of_the_benchmark_epoch_matches_hand_counts() -> None:
    # B=256, d=k=8, S=15: κ_k = κ_d = 1
    floor = sc.epoch_floor(spec=job(SplitMode.P1, 256, 8, 8), steps=93, costs=COSTS, cores=2)
    items = {item.name.split(" ")[0] + item.party: item for item in floor.items}
    assert items["decryptionsA"].count_per_step == 256 + 256 + 8
    assert items["obfuscatorsG"].count_per_step == 256 + 256  # D̂ fresh, Obf Ĝ
    assert items["obfuscatorsH"].count_per_step == 8 + 256 + 8  # E' fresh, Obf Ẑ, Obf V̂
    assert items["F1H"].cost_s == 0.125 + 256.0 / 256  # tables amortised over B
    assert items["B1G"].cost_s == 0.25 + 512.0 / 256
    assert items["B2H"].cost_s == 0.0625  # d = 8 reuses < 48: multi_exp, as plain_matmul
    # G: B1 terms 2048 + B1 addends 256 + masks Z 256 + V 8 + ρ 512
    assert items["⊕G"].count_per_step == 3080
    # H: F1 terms 2048 + addends F1 256, B2 8 + masks G 256 + ρ 272 + ⊖ 8
    assert items["⊕H"].count_per_step == 2848
    per_step = (
        520 * 1.0
        + 784 * 0.5
        + 2048 * (0.125 + 1.0)
        + 2048 * (0.25 + 2.0)
        + 2048 * 0.0625
        + (3080 + 2848) * 0.001
        + 8 * 8.0
    )
    assert floor.cpu_s_per_step == pytest.approx(per_step)
    assert floor.floor_s == pytest.approx(per_step * 93 / 2)
    assert sum(floor.by_party().values()) == pytest.approx(per_step * 93)


def test_p0_floor_with_few_reuses_everywhere() -> None:
    # B=4 < 48: even F1 and B1 are multi-exponentiations in plain_matmul
    floor = sc.epoch_floor(spec=job(SplitMode.P0, 4, 2, 3), steps=5, costs=COSTS, cores=1)
    scalars = {i.name.split(" ")[0]: i for i in floor.items if i.name[:2] in ("F1", "B1", "B2")}
    assert {k: v.count_per_step for k, v in scalars.items()} == {"F1": 24, "B1": 24, "B2": 24}
    assert scalars["B1"].cost_s == 0.03125  # d_bits multi_exp
    dec = 4 * 3 + 2 * 3 + 4 * 2
    rho = (4 * 3 + 2 * 3) + (4 * 3 + 2 * 3 + 4 * 2)
    mulmods = (4 * 2 + 12 + 6 + 20) + (12 + 6 + 8 + 24 + 6)  # no table-path terms
    per_step = dec + rho * 0.5 + 24 * (0.0625 + 0.03125 + 0.0625) + mulmods * 0.001 + 6 * 8.0
    assert floor.cpu_s_per_step == pytest.approx(per_step)
    with_tables = sc.epoch_floor(
        spec=job(SplitMode.P0, 4, 2, 3), steps=5, costs=COSTS, cores=1, obfuscator_tables=2
    )
    assert with_tables.floor_s == pytest.approx(per_step * 5 + 2 * 64.0)


def test_b2_alternatives_change_only_b2() -> None:
    spec = job(SplitMode.P1, 256, 8, 8)
    base = sc.epoch_floor(spec=spec, steps=1, costs=COSTS)
    powmod = sc.epoch_floor(spec=spec, steps=1, costs=COSTS, few_reuse="powmod")
    assert powmod.cpu_s_per_step - base.cpu_s_per_step == pytest.approx(2048 * (2.0 - 0.0625))
    tables = sc.epoch_floor(spec=spec, steps=1, costs=COSTS, few_reuse="fixed_base")
    b2 = next(i for i in tables.items if i.name.startswith("B2"))
    assert b2.cost_s == 0.125 + 256.0 / 8  # tables amortised over only d reuses
    with pytest.raises(ValueError, match="bits"):
        sc.epoch_floor(spec=job(SplitMode.P1, 256, 8, 8, bits=3072), steps=1, costs=COSTS)


@pytest.mark.parametrize("obfuscate_masked", [True, False])
def test_naive_flow_is_checked_and_scaled_on_a_small_key(obfuscate_masked: bool) -> None:
    pk, sk = generate_keypair(bits=512, allow_test_key=True)
    est = sc.naive_phe_epoch_seconds(
        batch=6,
        d=3,
        k=2,
        steps=7,
        sample_rows=2,
        keypair=(pk, sk),
        obfuscate_masked=obfuscate_masked,
    )  # raises if any masked decryption came out wrong
    scales = {m.name.split(" ")[0]: m.scale for m in est.messages}
    assert scales["F1"] == 3.0 and scales["B2-3"] == 1.5
    assert est.step_s == pytest.approx(sum(m.sampled_s * m.scale for m in est.messages))
    assert est.epoch_s == pytest.approx(7 * est.step_s)


def test_measured_costs_on_a_small_key() -> None:
    pk, sk = generate_keypair(bits=512, allow_test_key=True)
    costs = sc.measure_primitive_costs(
        public_key=pk, private_key=sk, repeats=1, multi_exp_bases=16
    )  # checks tables and multi_exp against powmod, and decryption
    values = dataclasses.asdict(costs)
    assert values["bits"] == 512 and values["multi_exp_bases"] == 16
    assert values["clock"] == "thread_time"
    assert all(v > 0 for k, v in values.items() if k.endswith("_s"))
