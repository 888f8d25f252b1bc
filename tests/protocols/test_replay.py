"""Replay marks: rules of §2.9 and survival across a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.envelope import Envelope, PlainBlock, digest, encode
from protocols.errors import MalformedEnvelopeError, ReplayConflictError
from protocols.transport.replay import ReplayGuard, Verdict
from tests.conftest import ARBITER, BANK, RETAILER


def env(seq: int, step: int = 0, data: bytes = b"x", job: str = "j", sender=BANK) -> Envelope:  # type: ignore[no-untyped-def]
    return Envelope(
        job_id=job,
        sender=sender,
        receiver=RETAILER,
        tag="test.DATA",
        step=step,
        seq=seq,
        body=PlainBlock(data),
    )


def check(guard: ReplayGuard, e: Envelope) -> Verdict:
    return guard.check(e, digest(*encode(e)))


def test_rules(tmp_path: Path) -> None:
    guard = ReplayGuard()
    assert check(guard, env(2, step=2)) is Verdict.NEW
    assert check(guard, env(1, step=1)) is Verdict.NEW  # any order
    assert check(guard, env(2, step=2)) is Verdict.DUPLICATE
    with pytest.raises(ReplayConflictError):
        check(guard, env(2, step=2, data=b"y"))
    with pytest.raises(ReplayConflictError):
        check(guard, env(3, step=2))
    assert check(guard, env(2, step=2, sender=ARBITER)) is Verdict.NEW  # per sender
    assert check(guard, env(2, step=2, job="other")) is Verdict.NEW  # per job
    with pytest.raises(MalformedEnvelopeError):
        check(guard, env(0))


def test_marks_survive_a_restart(tmp_path: Path) -> None:
    guard = ReplayGuard(journal_dir=tmp_path)
    check(guard, env(1, step=1))
    check(guard, env(2, step=2, job="other"))
    guard.close()
    again = ReplayGuard(journal_dir=tmp_path)
    assert check(again, env(1, step=1)) is Verdict.DUPLICATE
    with pytest.raises(ReplayConflictError):
        check(again, env(1, step=1, data=b"changed"))
    again.forget_job("other")
    assert check(again, env(2, step=2, job="other")) is Verdict.NEW
    again.close()


def test_torn_journal_line_is_dropped(tmp_path: Path) -> None:
    guard = ReplayGuard(journal_dir=tmp_path)
    check(guard, env(1, step=1))
    guard.close()
    (journal,) = tmp_path.glob("*.jsonl")
    with journal.open("a") as handle:
        handle.write('{"job":"j","sen')  # a crash while appending
    again = ReplayGuard(journal_dir=tmp_path)
    assert check(again, env(1, step=1)) is Verdict.DUPLICATE
    assert check(again, env(2, step=2)) is Verdict.NEW
    again.close()
    assert all(line.endswith("}") for line in journal.read_text().splitlines())
