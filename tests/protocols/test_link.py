"""The job link fills every routing field and answers on the request's route (both channels)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from protocols.envelope import CipherBlock, ControlBlock, Envelope
from protocols.errors import (
    JobRefusedError,
    MalformedEnvelopeError,
    NoSpaceError,
    PolicyViolationError,
)
from protocols.link import JobLink, raise_if_refused, refusal
from protocols.transport.base import Channel
from tests.conftest import ARBITER, BANK, RETAILER, TestTag


def test_send_fills_routing_and_reply_uses_the_requests_route(
    channels: dict[str, Channel],
) -> None:
    bank = JobLink(channel=channels["bank"], job_id="link-job", run_id="run-1", timeout=10.0)
    retailer = JobLink(channel=channels["retailer"], job_id="link-job", timeout=10.0)
    sent = bank.send(RETAILER, TestTag.REQUEST, 7, {"ask": 1}, key_id=b"k1")
    assert (sent.job_id, sent.run_id, sent.sender, sent.receiver, sent.key_id) == (
        "link-job",
        "run-1",
        BANK,
        RETAILER,
        b"k1",
    )
    request = retailer.for_run("run-1").recv(BANK, TestTag.REQUEST, 7)
    assert isinstance(request.body, ControlBlock) and request.body.obj() == {"ask": 1}
    # the retailer's link has another run: the reply still follows the request's route
    retailer.reply(request, TestTag.REPLY, {"ok": True})
    assert bank.control(RETAILER, TestTag.REPLY, 7) == {"ok": True}


def test_refuse_is_a_short_peer_reason_and_ask_waits_for_the_answer(
    channels: dict[str, Channel],
) -> None:
    arbiter = JobLink(channel=channels["arbiter"], job_id="link-ask", run_id="r")
    bank = JobLink(channel=channels["bank"], job_id="link-ask", run_id="r", timeout=10.0)

    def serve() -> None:
        request = arbiter.recv(BANK, TestTag.REQUEST, 3, timeout=10.0)
        arbiter.refuse(request, TestTag.REPLY, "x" * 1000, rule="P1")

    thread = threading.Thread(target=serve)
    thread.start()
    answer = bank.ask(ARBITER, TestTag.REQUEST, TestTag.REPLY, 3)
    thread.join()
    assert answer["rule"] == "P1" and refusal(answer) == "x" * 300
    assert refusal({"ok": 1}) is None


def test_typed_receives_refuse_the_wrong_body(channels: dict[str, Channel]) -> None:
    bank = JobLink(channel=channels["bank"], job_id="link-typed", timeout=10.0)
    retailer = JobLink(channel=channels["retailer"], job_id="link-typed", timeout=10.0)
    bank.send(RETAILER, TestTag.DATA, 1, {"not": "ciphertexts"})
    with pytest.raises(MalformedEnvelopeError):
        retailer.cipher(BANK, TestTag.DATA, 1)
    block = CipherBlock(data=np.zeros(8, np.uint8).tobytes(), shape=(1,))
    bank.send(RETAILER, TestTag.DATA, 2, block)
    with pytest.raises(MalformedEnvelopeError):
        retailer.control(BANK, TestTag.DATA, 2)
    bank.send(RETAILER, TestTag.DATA, 3, block)
    assert retailer.cipher(BANK, TestTag.DATA, 3) == block
    with pytest.raises(TimeoutError):
        retailer.recv(BANK, TestTag.DATA, 4, timeout=0.05)
    assert isinstance(bank.envelope(RETAILER, TestTag.DATA), Envelope)


def test_recv_any_follows_the_peer_and_the_link_key_id_is_the_default(
    channels: dict[str, Channel],
) -> None:
    bank = JobLink(channel=channels["bank"], job_id="link-any", run_id="r", key_id=b"k2")
    retailer = JobLink(channel=channels["retailer"], job_id="link-any", run_id="r", timeout=10.0)
    bank.for_run("other").send(RETAILER, TestTag.DATA, 1, {"run": "other"})  # not this run's
    assert bank.send(RETAILER, TestTag.REQUEST, 5, {"n": 5}).key_id == b"k2"
    assert bank.send(RETAILER, TestTag.DATA, 6, {}, key_id=b"k3").key_id == b"k3"
    first = retailer.recv_any(BANK, (TestTag.DATA, TestTag.REQUEST))
    second = retailer.recv_any(BANK, [TestTag.DATA])
    assert (first.step, first.key_id, second.step) == (5, b"k2", 6)
    with pytest.raises(TimeoutError):
        retailer.recv_any(BANK, [TestTag.DATA], timeout=0.05)


def test_a_refusal_becomes_its_typed_error() -> None:
    """``no_space`` only from the flag (§4.4.1); a refused job is not retried."""
    assert raise_if_refused({"ok": 1}, sender=ARBITER, what="job j") == {"ok": 1}
    with pytest.raises(PolicyViolationError, match="arbiter .* refused job j: P2") as caught:
        raise_if_refused({"refused": "P2"}, sender=ARBITER, what="job j")
    assert not isinstance(caught.value, JobRefusedError | NoSpaceError)
    with pytest.raises(JobRefusedError, match=r"retailer refused job j: d.*\[accept\]"):
        raise_if_refused({"refused": "d"}, sender=RETAILER, what="job j", refuses_job=True)
    full = {"refused": "no space left", "no_space": True}
    with pytest.raises(NoSpaceError):
        raise_if_refused(full, sender=ARBITER, what="job j", refuses_job=True)
    with pytest.raises(JobRefusedError):  # the text alone is no flag
        raise_if_refused({"refused": "no space left"}, sender=ARBITER, what="j", refuses_job=True)
