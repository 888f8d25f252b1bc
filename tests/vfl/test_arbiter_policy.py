"""The arbiter is no decryption oracle: each attack of issue 15 against its policy
(docs/protocol.md §2.6, rules P1-P9 of protocols.crypto.policy), and a property test that
an honest job is served exactly its §4.9 counts and nothing outside them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.crypto.policy import (
    Admission,
    DecryptionPolicy,
    JobPolicy,
    PolicyRule,
    StepWindow,
)
from protocols.crypto.policy_store import PolicyStore
from protocols.errors import ConfigError, PolicyViolationError
from vfl.splitnn.spec import DecTag, JobSpec, SplitMode
from vfl.transfer.session import SCORE_OFFSET, FtlDecTag, FtlSpec

KEY = bytes(32)
Z, G, V, E = (t.value for t in (DecTag.Z_FWD, DecTag.G_BWD, DecTag.V_WUPD, DecTag.Z_EVAL))


def spec(**overrides: object) -> JobSpec:
    fields: dict[str, object] = dict(
        job_id="job-1",
        key_id=KEY.hex(),
        key_bits=2048,
        mode=SplitMode.P1,
        batch=8,
        d=4,
        k=4,
        batch_eval=16,
        guest="bank",
        host="retailer",
        epochs=2,
        steps_per_epoch=5,
        eval_steps=7,
        eval_rewind=3,
    )
    fields.update(overrides)
    return JobSpec(**fields)  # type: ignore[arg-type]


def digest(tag: str, step: int, salt: bytes = b"") -> bytes:
    return hashlib.sha256(f"{tag}/{step}".encode() + salt).digest()


def registered(policy: JobPolicy, store: PolicyStore | None = None) -> DecryptionPolicy:
    p = DecryptionPolicy(store=store)
    assert p.propose(policy, submitter="bank") is False
    assert p.propose(policy, submitter="retailer") is True
    return p


def ask(p: DecryptionPolicy, policy: JobPolicy, tag: str, step: int, **kw: object) -> Admission:
    rule = policy.rule(tag)
    assert rule is not None
    args: dict[str, object] = dict(
        job_id=policy.job_id,
        step=step,
        tag=tag,
        requester=rule.requester,
        count=rule.count,
        digest=digest(tag, step),
    )
    args.update(kw)
    return p.admit(**args)  # type: ignore[arg-type]


# -- P1: registration bound to two different parties ------------------------------------


def test_a_guest_cannot_register_a_job_alone() -> None:
    """Attack 1: a JOB_SPEC naming the guest itself as host, or a proposal from the guest
    only, never activates a job."""
    with pytest.raises(ConfigError, match="different parties"):
        spec(host="bank")
    alone = JobPolicy(
        job_id="self",
        key_id=KEY,
        rules=(PolicyRule(Z, "bank", 4), PolicyRule(G, "bank", 4)),
        parties=("bank", "bank"),
    )
    p = DecryptionPolicy()
    with pytest.raises(PolicyViolationError, match="two different parties"):
        p.propose(alone, submitter="bank")
    honest = spec().policy()
    assert p.propose(honest, submitter="bank") is False
    with pytest.raises(PolicyViolationError, match="no registered decryption policy"):
        ask(p, honest, G, 0, requester="retailer")
    with pytest.raises(PolicyViolationError, match="not a party"):
        p.propose(honest, submitter="mallory")


def test_disagreeing_proposals_refuse_the_job() -> None:
    p = DecryptionPolicy()
    p.propose(spec().policy(), submitter="bank")
    with pytest.raises(PolicyViolationError, match="disagrees"):
        p.propose(spec(epochs=1000).policy(), submitter="retailer")


# -- P2-P5: the schedule ----------------------------------------------------------------


@pytest.mark.parametrize("step", [-1, 10, 10**6, 10**9, 10**12, 2**63 - 1])
def test_a_step_outside_the_schedule_is_refused(step: int) -> None:
    """Attack 2: steps 10^6, 10^9, 2^63 ... of G_BWD in an honest job."""
    policy = spec().policy()
    p = registered(policy)
    with pytest.raises(PolicyViolationError, match="outside the job's schedule"):
        ask(p, policy, G, step)


def test_steps_go_forward_and_are_served_once() -> None:
    policy = spec().policy()
    p = registered(policy)
    assert ask(p, policy, Z, 3) is Admission.NEW  # skipping ahead forfeits steps 0-2
    with pytest.raises(PolicyViolationError, match="behind step 3"):
        ask(p, policy, Z, 1)
    with pytest.raises(PolicyViolationError, match="already served"):  # a new run's request
        ask(p, policy, Z, 3, digest=digest(Z, 3, b"other run"))
    with pytest.raises(PolicyViolationError, match="values requested"):
        ask(p, policy, Z, 4, count=1)
    with pytest.raises(PolicyViolationError, match="may not request"):
        ask(p, policy, Z, 4, requester="retailer")


def test_an_identical_repeat_is_answered_and_not_counted() -> None:
    policy = spec().policy()
    p = registered(policy)
    assert ask(p, policy, Z, 0) is Admission.NEW
    assert ask(p, policy, Z, 0) is Admission.REPEAT  # no reply cached yet: decrypted again
    p.cache_reply(job_id=policy.job_id, step=0, tag=Z, reply="reply")
    assert ask(p, policy, Z, 0) is Admission.CACHED
    assert p.counts(policy.job_id) == {Z: policy.rule(Z).count}  # type: ignore[union-attr]


def test_resumes_rewind_at_most_two_steps_and_are_limited() -> None:
    policy = spec().policy(max_resumes=2)
    p = registered(policy)
    for step in range(6):
        ask(p, policy, Z, step)
    with pytest.raises(PolicyViolationError, match="more than 2 steps behind"):
        p.resume(policy.job_id, 2)
    p.resume(policy.job_id, 4)  # re-opens steps 4 and 5
    assert ask(p, policy, Z, 4, digest=digest(Z, 4, b"rerun")) is Admission.NEW
    p.resume(policy.job_id, 5)
    with pytest.raises(PolicyViolationError, match="resumed 2 times"):
        p.resume(policy.job_id, 5)
    with pytest.raises(PolicyViolationError, match="Z_EVAL lies more than 3"):
        registered(policy).resume(policy.job_id, 0, tag_steps={E: -1})


def test_the_budget_bounds_every_tag() -> None:
    rule = PolicyRule(Z, "bank", 4, window=StepWindow(stop=100), budget=8)
    policy = JobPolicy(job_id="b", key_id=KEY, rules=(rule,), parties=("bank", "retailer"))
    p = registered(policy)
    ask(p, policy, Z, 0)
    ask(p, policy, Z, 1)
    with pytest.raises(PolicyViolationError, match="budget of 8"):
        ask(p, policy, Z, 2)


def test_a_closed_job_decrypts_nothing_and_registers_its_model() -> None:
    policy = spec().policy()
    p = registered(policy)
    assert p.open_jobs() == [(policy.job_id, "bank")] and not p.closed(policy.job_id)
    model = p.close(policy.job_id)
    assert p.open_jobs() == [] and p.closed(policy.job_id)
    assert model is not None and (model.guest, model.host, model.kappa) == ("bank", "retailer", 1)
    with pytest.raises(PolicyViolationError, match="finished"):
        ask(p, policy, Z, 0)
    with pytest.raises(PolicyViolationError, match="finished"):
        p.resume(policy.job_id, 0)


def test_ftl_runs_are_numbered_apart_and_opened_by_both_parties() -> None:
    ftl = FtlSpec(
        job_id="ftl",
        key_id=KEY.hex(),
        key_bits=2048,
        batch=4,
        d=2,
        guest="bank",
        host="retailer",
        schedule=(2, 3, 2),
    ).policy(max_resumes=1)
    p = registered(ftl)
    k = FtlDecTag.K.value
    assert ask(p, ftl, k, (1 << 32) + 5) is Admission.NEW
    for bad in ((1 << 32) + 6, (3 << 32) + 0, (1 << 32) + SCORE_OFFSET + 2):
        with pytest.raises(PolicyViolationError, match="outside"):
            ask(p, ftl, k, bad)
    with pytest.raises(PolicyViolationError, match="run 2, which was not resumed"):
        ask(p, ftl, k, 2 << 32)  # a new run the other party never agreed to
    p.resume(ftl.job_id, 0, run=2)
    assert ask(p, ftl, k, 2 << 32) is Admission.NEW
    with pytest.raises(PolicyViolationError, match="behind"):
        ask(p, ftl, k, (1 << 32) + 5 - 1)
    with pytest.raises(PolicyViolationError, match="resumed 1 times"):
        p.resume(ftl.job_id, 0, run=3)


def test_a_repeat_is_decrypted_again_once_at_most() -> None:
    """After a restart a lost reply is decrypted again once; cycling repeats cannot make
    A decrypt again and again."""
    policy = spec().policy()
    p = registered(policy)
    for step in range(3):
        ask(p, policy, Z, step)
    assert ask(p, policy, Z, 1) is Admission.REPEAT
    with pytest.raises(PolicyViolationError, match="already answered"):
        ask(p, policy, Z, 1)


def test_pending_proposals_are_bounded() -> None:
    p = DecryptionPolicy()
    for i in range(64):
        p.propose(spec(job_id=f"pending-{i}").policy(), submitter="bank")
    with pytest.raises(PolicyViolationError, match="waiting for their other party"):
        p.propose(spec(job_id="pending-64").policy(), submitter="bank")
    assert p.propose(spec(job_id="pending-0").policy(), submitter="retailer") is True


# -- P8: scoring grants bound to the host's ciphertexts ---------------------------------


def grant(binder: str = "retailer", kappa: int = 2) -> tuple[DecryptionPolicy, JobPolicy]:
    policy = JobPolicy(
        job_id="m.scoring",
        key_id=KEY,
        rules=(PolicyRule(DecTag.INF_Z.value, "bank", 8 * kappa, unit=kappa),),
        quota=100 * kappa,
        cache_replies=False,
        binder=binder,
    )
    p = DecryptionPolicy()
    p.grant(policy)
    return p, policy


def items(n: int, salt: str = "") -> list[bytes]:
    return [hashlib.sha256(f"{salt}{i}".encode()).digest()[:16] for i in range(n)]


def inf(p: DecryptionPolicy, got: list[bytes], run: str = "s1") -> Admission:
    return p.admit(
        job_id="m.scoring",
        step=int.from_bytes(os.urandom(7), "big"),
        tag=DecTag.INF_Z.value,
        requester="bank",
        count=len(got),
        digest=os.urandom(32),
        run_id=run,
        items=got,
    )


def test_inf_z_decrypts_only_what_the_host_registered_once_within_its_cap() -> None:
    p, _ = grant()
    with pytest.raises(PolicyViolationError, match="no ciphertexts of this scoring session"):
        inf(p, items(2))
    with pytest.raises(PolicyViolationError, match="may not register"):
        p.bind(
            job_id="m.scoring", run_id="s1", group=0, cap_rows=1, items=items(2), submitter="bank"
        )
    bound = items(8)
    p.bind(
        job_id="m.scoring", run_id="s1", group=7, cap_rows=2, items=bound[:4], submitter="retailer"
    )
    p.bind(
        job_id="m.scoring", run_id="s1", group=8, cap_rows=1, items=bound[4:], submitter="retailer"
    )
    with pytest.raises(PolicyViolationError, match="not produced by the host"):
        inf(p, [bound[0], items(1, "training")[0]])  # e.g. [[E]] or [[W^G]]
    with pytest.raises(PolicyViolationError, match="different host answers"):
        inf(p, [bound[0], bound[4]])
    with pytest.raises(PolicyViolationError, match="no ciphertexts of this scoring session"):
        inf(p, bound[:2], run="another-session")
    assert inf(p, bound[:2]) is Admission.NEW
    with pytest.raises(PolicyViolationError, match="already decrypted"):
        inf(p, bound[:2])
    assert inf(p, bound[2:4]) is Admission.NEW
    with pytest.raises(PolicyViolationError, match="allows 1 rows"):  # online: 1 row a request
        inf(p, bound[4:8])
    assert inf(p, bound[4:6]) is Admission.NEW
    with pytest.raises(PolicyViolationError, match="not produced"):  # a spent answer is gone
        inf(p, bound[6:8])


def bind(
    p: DecryptionPolicy, run: str, group: int, cap: int, got: list[bytes], first: bool = True
) -> None:
    p.bind(
        job_id="m.scoring",
        run_id=run,
        group=group,
        cap_rows=cap,
        items=got,
        submitter="retailer",
        first=first,
    )


def test_a_host_cannot_widen_a_group_later() -> None:
    p, _ = grant()
    bind(p, "s", 1, 1, items(2))
    with pytest.raises(PolicyViolationError, match="changes its group's cap"):
        bind(p, "s", 1, 5, items(2, "x"), first=False)
    with pytest.raises(PolicyViolationError, match="exists already"):
        bind(p, "s", 1, 1, items(2, "y"))


def test_a_lost_answer_cannot_start_its_cap_again() -> None:
    """Attack: the bank spends a batch answer's cap, then has the session dropped (many new
    sessions, or an arbiter restart); the host's next chunk of that answer is refused."""
    p, _ = grant()
    batch = items(4, "batch")
    bind(p, "batch", 0, 1, batch[:2])
    assert inf(p, batch[:2], run="batch") is Admission.NEW
    for i in range(64):  # 64 online sessions push the batch session out
        bind(p, f"online-{i}", i, 1, items(2, f"o{i}"))
    with pytest.raises(PolicyViolationError, match="does not hold"):
        bind(p, "batch", 0, 1, batch[2:], first=False)


def test_a_request_holds_whole_rows() -> None:
    """Attack: one row's cap spent on the first block of several customers (κ = 2)."""
    p, _ = grant(kappa=2)
    rows = items(6, "rows")
    bind(p, "s", 3, 1, rows)
    with pytest.raises(PolicyViolationError, match="whole rows"):
        inf(p, [rows[0], rows[2]], run="s")
    with pytest.raises(PolicyViolationError, match="whole rows of 2"):
        bind(p, "s", 4, 1, items(3, "odd"))
    assert inf(p, rows[2:4], run="s") is Admission.NEW


def test_a_grant_never_replaces_a_registered_job() -> None:
    policy = spec(job_id="m.scoring").policy()
    p = registered(policy)
    with pytest.raises(PolicyViolationError, match="not a grant"):
        p.grant(grant()[1])


# -- P9: an arbiter restart forgets nothing ---------------------------------------------


def test_a_restarted_arbiter_keeps_schedule_marks_counts_and_models(tmp_path: Path) -> None:
    """Attack 4: served steps cannot be decrypted again after a restart; a byte-identical
    repeat is still answered (with the same plaintext, decrypted again)."""
    policy = spec().policy(max_resumes=3)
    store = PolicyStore(tmp_path / "policy")
    p = registered(policy, store)
    for step in range(3):
        ask(p, policy, Z, step)
    p.resume(policy.job_id, 2)
    ask(p, policy, Z, 2, digest=digest(Z, 2, b"second"))
    other = spec(job_id="job-2").policy()
    p2 = DecryptionPolicy(store=store)
    p2.propose(other, submitter="bank")
    p2.propose(other, submitter="retailer")
    p2.close("job-2")

    again = DecryptionPolicy(store=PolicyStore(tmp_path / "policy"))
    assert again.counts(policy.job_id) == {Z: 4 * policy.rule(Z).count}  # type: ignore[union-attr]
    assert ask(again, policy, Z, 2, digest=digest(Z, 2, b"second")) is Admission.REPEAT
    with pytest.raises(PolicyViolationError, match="already served"):
        ask(again, policy, Z, 2, digest=digest(Z, 2, b"third"))
    with pytest.raises(PolicyViolationError, match="already served"):
        ask(again, policy, Z, 1, digest=digest(Z, 1, b"new"))
    assert again.model("job-2") is not None and again.model(policy.job_id) is None
    with pytest.raises(PolicyViolationError, match="finished"):
        ask(again, other, Z, 0)
    again.resume(policy.job_id, 2)
    again.resume(policy.job_id, 2)
    with pytest.raises(PolicyViolationError, match="resumed 3 times"):  # 1 before the restart
        again.resume(policy.job_id, 2)
    for path in (tmp_path / "policy" / "jobs").iterdir():
        assert path.stat().st_mode & 0o077 == 0, path


def test_a_torn_journal_line_is_cut_and_a_corrupt_one_stops_the_arbiter(tmp_path: Path) -> None:
    """A crash mid-append leaves a torn last line: it is cut off, so the next record is
    read back; a damaged line inside the journal stops A with the file and line named."""
    policy = spec().policy()
    store = PolicyStore(tmp_path / "policy")
    p = registered(policy, store)
    ask(p, policy, Z, 0)
    (log,) = (tmp_path / "policy" / "jobs").glob("*.log")
    with log.open("ab") as handle:
        handle.write(b'{"served":"splitnn.Z_FWD","st')  # torn
    again = DecryptionPolicy(store=PolicyStore(tmp_path / "policy"))
    ask(again, policy, Z, 1)
    third = DecryptionPolicy(store=PolicyStore(tmp_path / "policy"))
    with pytest.raises(PolicyViolationError, match="already served"):
        ask(third, policy, Z, 1, digest=digest(Z, 1, b"other"))
    log.write_bytes(b"garbage\n" + log.read_bytes())
    with pytest.raises(ConfigError, match="line 1, is unreadable"):
        DecryptionPolicy(store=PolicyStore(tmp_path / "policy"))


def test_a_fragment_left_by_a_failed_write_never_ends_up_inside_the_journal(
    tmp_path: Path,
) -> None:
    """A write that failed and could not be cut back leaves a fragment at the end while A
    keeps running: the next record is appended after cutting it, so the journal still reads
    back after a restart (not "restore from backup")."""
    policy = spec().policy()
    store = PolicyStore(tmp_path / "policy")
    p = registered(policy, store)
    ask(p, policy, Z, 0)
    (log,) = (tmp_path / "policy" / "jobs").glob("*.log")
    with log.open("ab") as handle:
        handle.write(b'{"served":"splitnn.Z_FWD","st')  # the failed write's fragment
    ask(p, policy, Z, 1)  # the same process goes on
    assert all(line.endswith("}") for line in log.read_text().splitlines())
    again = DecryptionPolicy(store=PolicyStore(tmp_path / "policy"))
    with pytest.raises(PolicyViolationError, match="already served"):
        ask(again, policy, Z, 1, digest=digest(Z, 1, b"other"))


# -- the property: an honest job gets exactly §4.9, nothing else -------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    epochs=st.integers(1, 3),
    spe=st.integers(1, 6),
    eval_rounds=st.integers(1, 3),
    mode=st.sampled_from(list(SplitMode)),
    d=st.integers(1, 20),
    k=st.integers(1, 20),
    attacks=st.lists(
        st.tuples(
            st.sampled_from([Z, G, V, E, DecTag.INF_Z.value, "splitnn.OTHER"]),
            st.integers(-3, 2**40),
            st.sampled_from(["bank", "retailer", "arbiter", "mallory"]),
            st.integers(0, 400),
        ),
        max_size=40,
    ),
)
def test_an_honest_job_is_served_exactly_its_counts_and_nothing_else(
    epochs: int,
    spe: int,
    eval_rounds: int,
    mode: SplitMode,
    d: int,
    k: int,
    attacks: list[tuple[str, int, str, int]],
) -> None:
    s = spec(
        mode=mode,
        d=d,
        k=k,
        epochs=epochs,
        steps_per_epoch=spe,
        eval_steps=eval_rounds * (epochs + 1),
        eval_rewind=eval_rounds,
    )
    policy = s.policy()
    p = registered(policy)
    for step in range(epochs * spe):
        for tag in (Z, G, V):
            assert ask(p, policy, tag, step) is Admission.NEW
    for step in range(eval_rounds * (epochs + 1)):
        assert ask(p, policy, E, step) is Admission.NEW
    counts = s.step_counts()
    served = p.counts(policy.job_id)
    assert served[Z] + served[G] + served[V] == counts.decryptions * epochs * spe
    assert served[E] == 16 * s.kappa_k * eval_rounds * (epochs + 1)
    for tag, step, requester, count in attacks:  # every further request is refused
        with pytest.raises(PolicyViolationError):
            p.admit(
                job_id=policy.job_id,
                step=step,
                tag=tag,
                requester=requester,
                count=count,
                digest=digest(tag, step, b"attack"),
            )
    assert p.counts(policy.job_id) == served
