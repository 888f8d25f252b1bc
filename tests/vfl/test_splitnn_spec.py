"""JOB_SPEC: the arbiter's policy and the §4.9 counts (the worked example of the spec)."""

from __future__ import annotations

import pytest

from protocols.crypto.policy import DecryptionPolicy
from protocols.errors import ConfigError, PolicyViolationError
from vfl.splitnn.spec import DecTag, JobSpec, SplitMode


def spec(mode: SplitMode, **kw: object) -> JobSpec:
    base: dict[str, object] = dict(
        job_id="j",
        key_id="ab" * 16,
        key_bits=2048,
        mode=mode,
        batch=256,
        d=32,
        k=16,
        batch_eval=512,
        guest="bank",
        host="retailer",
    )
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def test_worked_example_p1() -> None:
    s = spec(SplitMode.P1)
    assert (s.slot_bits, s.slots, s.kappa_k, s.kappa_d) == (130, 15, 2, 3)
    c = s.step_counts()
    assert c.scalar_mults == 45_056 and c.decryptions == 1_344 and c.obfuscators == 1_904
    assert (
        c.ciphertexts_host_to_guest + c.ciphertexts_guest_to_host + c.ciphertexts_to_arbiter
        == 3_248
    )


def test_worked_example_p0() -> None:
    c = spec(SplitMode.P0).step_counts()
    assert c.scalar_mults == 393_216 and c.decryptions == 12_800 and c.obfuscators == 17_408
    assert (
        c.ciphertexts_host_to_guest + c.ciphertexts_guest_to_host + c.ciphertexts_to_arbiter
        == 30_208
    )


@pytest.mark.parametrize("bkd", [(8, 4, 3), (32, 16, 8), (64, 33, 17)])
def test_policy_counts_follow_section_2_6(bkd: tuple[int, int, int]) -> None:
    b, d, k = bkd
    for mode in SplitMode:
        s = spec(mode, batch=b, d=d, k=k, batch_eval=b)
        rules = {r.tag: (r.requester, r.count) for r in s.policy().rules}
        kk, kd = (k, d) if mode is SplitMode.P0 else (-(-k // s.slots), -(-d // s.slots))
        assert rules[DecTag.Z_FWD] == ("bank", b * kk)
        assert rules[DecTag.G_BWD] == ("retailer", b * kd)
        assert rules[DecTag.V_WUPD] == ("bank", d * kk)
        assert rules[DecTag.Z_EVAL] == ("bank", b * kk)


def test_job_spec_round_trip_and_agreement() -> None:
    s = spec(SplitMode.P1)
    assert JobSpec.from_json(s.to_json()) == s
    policy = DecryptionPolicy()
    assert policy.propose(s.policy(), submitter="bank") is False
    with pytest.raises(PolicyViolationError, match="disagrees"):
        policy.propose(spec(SplitMode.P1, batch=128).policy(), submitter="retailer")
    with pytest.raises(ConfigError, match="lacks field"):
        JobSpec.from_json({"job_id": "j"})
    with pytest.raises(ConfigError, match="positive"):
        spec(SplitMode.P0, d=0)
