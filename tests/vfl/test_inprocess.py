"""The one in-process runner (vfl/common/inprocess.py): the first failure is raised and ends
the others' waits, a deadline holds, the arbiter's key is fresh and needs the test flag to be
small, and the state folder is private and temporary unless named."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from protocols.arbiter.service import SetupTag
from protocols.crypto.policy import JobPolicy
from protocols.envelope import ControlBlock, Envelope
from protocols.errors import InsecureConfigError, ProtocolError, TransportError
from protocols.executor import InlineExecutor
from tests.conftest import ARBITER, BANK, RETAILER, TestTag
from vfl.common.inprocess import InProcess


def runner(**kwargs: object) -> InProcess:
    return InProcess(
        parties=(BANK, RETAILER, ARBITER),
        tags=[TestTag, SetupTag],
        executor=InlineExecutor(),
        **kwargs,  # type: ignore[arg-type]
    )


def waits(run: InProcess, party: str) -> object:
    """Wait for a message that never comes (long timeout)."""
    return run.channels[party].recv(job_id="j", sender=BANK, tag=TestTag.DATA, step=0, timeout=60)


def test_outputs_by_party_and_messages_between_them() -> None:
    with runner() as run:

        def send() -> str:
            body = ControlBlock.from_obj({"hello": 1})
            run.channels["bank"].send(
                Envelope(job_id="j", sender=BANK, receiver=RETAILER, tag=TestTag.DATA, body=body)
            )
            return "sent"

        def receive() -> object:
            envelope = run.channels["retailer"].recv(
                job_id="j", sender=BANK, tag=TestTag.DATA, step=0, timeout=10
            )
            assert isinstance(envelope.body, ControlBlock)
            return envelope.body.obj()

        out = run.run({"bank": send, "retailer": receive}, timeout=20)
    assert out == {"bank": "sent", "retailer": {"hello": 1}}


def test_the_first_failure_is_raised_and_ends_the_others_waits() -> None:
    def fail() -> object:
        time.sleep(0.2)
        raise ValueError("the guest's own error")

    started = time.monotonic()
    with runner() as run, pytest.raises(ValueError, match="the guest's own error"):
        run.run({"bank": fail, "retailer": lambda: waits(run, "retailer")}, timeout=60)
    assert time.monotonic() - started < 20  # not the retailer's 60 s receive timeout


def test_without_close_on_failure_the_others_wait_until_the_deadline() -> None:
    outcome: list[BaseException] = []

    def fail() -> object:
        raise ValueError("first")

    def wait_then_note() -> object:
        try:
            return waits(run, "retailer")
        except BaseException as exc:
            outcome.append(exc)
            raise

    started = time.monotonic()
    with runner() as run, pytest.raises(ValueError, match="first"):
        run.run({"bank": fail, "retailer": wait_then_note}, timeout=1, close_on_failure=False)
    # the deadline, not the failure, closed the retailer's channel
    assert time.monotonic() - started >= 1
    assert len(outcome) == 1 and isinstance(outcome[0], TransportError)


def test_a_party_past_the_deadline_is_an_error() -> None:
    started = time.monotonic()
    with runner() as run, pytest.raises(ProtocolError, match="retailer still running after 0.5 s"):
        run.run({"bank": lambda: "done", "retailer": lambda: waits(run, "retailer")}, timeout=0.5)
    assert time.monotonic() - started < 20


def test_state_folders_are_private_and_temporary_unless_named(tmp_path: Path) -> None:
    with runner() as run:
        folder = run.state("bank")
        assert folder.parent == run.state_dir and folder.stat().st_mode & 0o777 == 0o700
        temporary = run.state_dir
    assert not temporary.exists()
    with runner(state_dir=tmp_path / "kept") as run:
        run.state("retailer")
    assert (tmp_path / "kept" / "retailer").is_dir()


def test_the_arbiter_key_is_fresh_and_small_only_with_the_test_flag() -> None:
    def policy(obj: dict[str, object]) -> JobPolicy:
        raise AssertionError("no job here")

    with runner() as run:
        with pytest.raises(InsecureConfigError, match="allow_test_key"):
            run.serve_arbiter(party_id="arbiter", tags=[], policy_of=policy, key_bits=1024)
        _, first = run.serve_arbiter(
            party_id="arbiter", tags=[], policy_of=policy, key_bits=1024, allow_test_key=True
        )
    with runner() as run:
        _, second = run.serve_arbiter(
            party_id="arbiter", tags=[], policy_of=policy, key_bits=1024, allow_test_key=True
        )
    assert first.bits == second.bits == 1024 and first.key_id != second.key_id
