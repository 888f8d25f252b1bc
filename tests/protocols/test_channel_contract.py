"""The Channel contract: every test runs on the in-memory and on the gRPC channel."""

from __future__ import annotations

import os
import threading
from enum import StrEnum

import numpy as np
import pytest

from protocols.envelope import (
    CipherBlock,
    ControlBlock,
    Envelope,
    IndexBlock,
    Packing,
    PlainBlock,
    PointBlock,
    Uint64Block,
)
from protocols.errors import (
    ProtocolError,
    ReplayConflictError,
    RunAbortedError,
    UnknownTagError,
    WrongReceiverError,
)
from protocols.roles import Party, Role
from protocols.transport.base import Channel, MessageFilter
from tests.conftest import ARBITER, BANK, RETAILER, TestTag


class SenderOnlyTag(StrEnum):
    ONLY = "senderonly.ONLY"


def env(job_id: str, sender: Party, receiver: Party, step: int = 0, **kw: object) -> Envelope:
    return Envelope(
        job_id=job_id,
        sender=sender,
        receiver=receiver,
        tag=kw.pop("tag", TestTag.DATA),
        step=step,
        **kw,
    )  # type: ignore[arg-type]


BODIES = [
    None,
    CipherBlock(
        os.urandom(512 * 6),
        shape=(2, 3),
        scale=24,
        packing=Packing(slot_bits=130, slots=15, axis=1),
    ),
    PlainBlock(os.urandom(256 * 4), shape=(4,), scale=56),
    PointBlock(os.urandom(32 * 5)),
    IndexBlock.from_indices(np.array([5, 0, 2**32 - 1])),
    Uint64Block(np.arange(6, dtype="<u8").tobytes(), shape=(3, 2)),
    ControlBlock.from_obj({"job": "x", "b": 32, "nested": {"k": [1, 2]}}),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_roundtrip_preserves_every_field(
    channels: dict[str, Channel], job_id: str, body: object
) -> None:
    sent = channels["bank"].send(
        env(
            job_id, BANK, RETAILER, 7, run_id="r1", epoch=3, batch=9, key_id=b"\x01" * 16, body=body
        )
    )
    got = channels["retailer"].recv(
        job_id=job_id, sender=BANK, tag=TestTag.DATA, step=7, run_id="r1", timeout=10
    )
    assert got == sent
    assert sent.seq == 1


def test_large_body_is_streamed_and_intact(channels: dict[str, Channel], job_id: str) -> None:
    data = os.urandom(9 << 20)
    channels["retailer"].send(env(job_id, RETAILER, ARBITER, 1, body=PlainBlock(data)))
    got = channels["arbiter"].recv(
        job_id=job_id, sender="retailer", tag=TestTag.DATA, step=1, timeout=30
    )
    assert got.payload == data


def test_recv_times_out(channels: dict[str, Channel], job_id: str) -> None:
    with pytest.raises(TimeoutError, match="no message"):
        channels["bank"].recv(job_id=job_id, sender=RETAILER, tag=TestTag.DATA, step=0, timeout=0.2)


def test_messages_may_arrive_in_any_order(channels: dict[str, Channel], job_id: str) -> None:
    for step in (3, 1, 2):
        channels["bank"].send(env(job_id, BANK, RETAILER, step))
    steps = [
        channels["retailer"]
        .recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=s, timeout=5)
        .step
        for s in (1, 2, 3)
    ]
    assert steps == [1, 2, 3]


def test_seq_increases_per_job_and_receiver(channels: dict[str, Channel], job_id: str) -> None:
    seqs = [channels["bank"].send(env(job_id, BANK, RETAILER, s)).seq for s in range(3)]
    other = channels["bank"].send(env(job_id, BANK, ARBITER, 0)).seq
    assert seqs == [1, 2, 3] and other == 1
    assert channels["bank"].stream_state(job_id) == {"retailer": 4, "arbiter": 2}


def test_restored_stream_state_continues_numbering(
    channels: dict[str, Channel], job_id: str
) -> None:
    channels["arbiter"].restore_stream_state(job_id, {"bank": 41})
    assert channels["arbiter"].send(env(job_id, ARBITER, BANK, 0)).seq == 41


def test_byte_identical_repeat_is_acknowledged_once(
    channels: dict[str, Channel], job_id: str
) -> None:
    sent = channels["bank"].send(env(job_id, BANK, RETAILER, 0, body=PlainBlock(b"abc")))
    channels["bank"].send(sent)  # a retransmission: same seq, same bytes
    channels["retailer"].recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=0, timeout=5)
    with pytest.raises(TimeoutError):
        channels["retailer"].recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=0, timeout=0.3)


def test_reused_seq_with_other_content_is_refused(
    channels: dict[str, Channel], job_id: str
) -> None:
    sent = channels["bank"].send(env(job_id, BANK, RETAILER, 0, body=PlainBlock(b"abc")))
    forged = env(job_id, BANK, RETAILER, 1, body=PlainBlock(b"abd")).with_seq(sent.seq)
    with pytest.raises(ReplayConflictError, match="already used"):
        channels["bank"].send(forged)


def test_second_message_for_same_step_and_tag_is_refused(
    channels: dict[str, Channel], job_id: str
) -> None:
    channels["bank"].send(env(job_id, BANK, RETAILER, 5, body=PlainBlock(b"one")))
    with pytest.raises(ReplayConflictError, match="already received"):
        channels["bank"].send(env(job_id, BANK, RETAILER, 5, body=PlainBlock(b"two")))
    # another run of the same job may reuse the step (after a RESUME)
    channels["bank"].send(env(job_id, BANK, RETAILER, 5, run_id="resumed", body=PlainBlock(b"two")))


def test_unknown_tag_is_refused_by_the_receiver(channels: dict[str, Channel], job_id: str) -> None:
    channels["bank"].tags.register(SenderOnlyTag)  # the receiver never registered it
    with pytest.raises(UnknownTagError, match="senderonly.ONLY"):
        channels["bank"].send(env(job_id, BANK, RETAILER, 0, tag=SenderOnlyTag.ONLY))


def test_tag_unknown_to_the_sender_is_refused_before_sending(
    channels: dict[str, Channel], job_id: str
) -> None:
    with pytest.raises(UnknownTagError):
        channels["bank"].send(env(job_id, BANK, RETAILER, 0, tag="nobody.KNOWS"))


def test_wrong_receiver_role_is_refused(channels: dict[str, Channel], job_id: str) -> None:
    with pytest.raises(WrongReceiverError):
        channels["bank"].send(env(job_id, BANK, Party("retailer", Role.ARBITER), 0))


def test_cannot_send_as_another_party(channels: dict[str, Channel], job_id: str) -> None:
    with pytest.raises(ProtocolError, match="cannot send"):
        channels["bank"].send(env(job_id, RETAILER, ARBITER, 0))


def test_handler_and_recv_any(channels: dict[str, Channel], job_id: str) -> None:
    seen: list[Envelope] = []
    done = threading.Event()

    def on_request(e: Envelope) -> None:
        seen.append(e)
        channels["arbiter"].send(
            env(e.job_id, ARBITER, e.sender, e.step, tag=TestTag.REPLY, body=e.body)
        )
        done.set()

    channels["arbiter"].add_handler(
        MessageFilter.for_tags(TestTag.REQUEST, job_id=job_id), on_request
    )
    channels["bank"].send(
        env(job_id, BANK, ARBITER, 4, tag=TestTag.REQUEST, body=ControlBlock.from_obj({"q": 1}))
    )
    reply = channels["bank"].recv_any(MessageFilter(job_id=job_id, sender="arbiter"), timeout=10)
    assert done.wait(5) and reply.tag == TestTag.REPLY and reply.step == 4
    assert isinstance(reply.body, ControlBlock) and reply.body.obj() == {"q": 1}
    assert len(seen) == 1


def test_three_parties_concurrently_in_both_directions(
    channels: dict[str, Channel], job_id: str
) -> None:
    parties = {"bank": BANK, "retailer": RETAILER, "arbiter": ARBITER}
    pairs = [(a, b) for a in parties for b in parties if a != b]
    n = 15
    errors: list[BaseException] = []

    def sender(a: str, b: str) -> None:
        try:
            for step in range(n):
                size = 256 if step % 5 else (2 << 20) + step  # some bodies are streamed
                body = PlainBlock(bytes([step]) * size)
                channels[a].send(env(job_id, parties[a], parties[b], step, body=body))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def receiver(a: str, b: str) -> None:
        try:
            for step in reversed(range(n)):
                got = channels[b].recv(
                    job_id=job_id, sender=a, tag=TestTag.DATA, step=step, timeout=60
                )
                assert got.payload[:1] == bytes([step])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=f, args=p) for p in pairs for f in (sender, receiver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_abort_run_wakes_its_receives_and_drops_its_messages(
    channels: dict[str, Channel], job_id: str
) -> None:
    """A stopped run (a newer run replaces it, or the service stops): its waiting and later
    receives raise, its unread messages and any that still arrive are dropped; other runs
    of the job are untouched."""
    bank, retailer = channels["bank"], channels["retailer"]
    bank.send(env(job_id, BANK, RETAILER, 1, run_id="old"))
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            retailer.recv(
                job_id=job_id, sender=BANK, tag=TestTag.DATA, step=2, run_id="old", timeout=10
            )
        except RunAbortedError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert retailer.abort_run(job_id, "old") == 1  # the unread step-1 message
    waiter.join(5)
    assert len(errors) == 1 and "was stopped" in str(errors[0])
    bank.send(env(job_id, BANK, RETAILER, 3, run_id="old"))  # arrives late: dropped
    bank.send(env(job_id, BANK, RETAILER, 3, run_id="new"))
    with pytest.raises(RunAbortedError):
        retailer.recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=3, run_id="old")
    with pytest.raises(RunAbortedError):
        retailer.recv_any(MessageFilter(job_id=job_id, run_id="old"), timeout=1)
    got = retailer.recv_any(MessageFilter(job_id=job_id, run_id="new"), timeout=5)
    assert (got.run_id, got.step) == ("new", 3)
