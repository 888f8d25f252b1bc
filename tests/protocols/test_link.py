"""The job link fills every routing field and answers on the request's route (both channels)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from protocols.envelope import CipherBlock, ControlBlock, Envelope
from protocols.errors import MalformedEnvelopeError
from protocols.link import JobLink, refusal
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
