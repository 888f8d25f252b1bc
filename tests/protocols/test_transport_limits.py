"""A configured peer that misbehaves cannot starve the others or the receiver's memory
(docs/protocol.md §2.9.1): stalled calls, reserved sizes, queue budgets, unknown jobs,
replay-journal descriptors and failed journal writes. No assertion here depends on how
fast anything runs: waits poll for a state with a generous bound."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from protocols.envelope import Envelope, PlainBlock, digest, encode
from protocols.errors import ReceiverBusyError, TransportError
from protocols.generated import transport_pb2 as pb
from protocols.roles import PartyAddress
from protocols.tags import TagRegistry
from protocols.transport import base as transport_base
from protocols.transport.base import DeliveryStatus, Mailbox
from protocols.transport.grpc_channel import GrpcChannel
from protocols.transport.grpc_client import DELIVER, PUSH, open_channel
from protocols.transport.options import ENVELOPE_OVERHEAD_BYTES, MiB, TransportOptions
from protocols.transport.replay import OPEN_JOURNALS, ReplayGuard, Verdict
from tests.conftest import ARBITER, BANK, RETAILER, Pki, TestTag

LIMITS = TransportOptions(
    retry_seconds=2.0,
    max_calls_per_peer=3,
    server_threads=9,
    max_envelope_bytes=24 * MiB,
    max_queued_bytes=32 * MiB,
)


def data(job_id: str, step: int, body: bytes = b"", sender=BANK) -> Envelope:  # type: ignore[no-untyped-def]
    return Envelope(
        job_id=job_id,
        sender=sender,
        receiver=RETAILER,
        tag=TestTag.DATA,
        step=step,
        seq=step + 1,
        body=PlainBlock(body),
    )


def wait_until(condition: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + 60
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"not reached within 60 s: {what}")
        time.sleep(0.02)


@pytest.fixture
def host(pki: Pki) -> Iterator[GrpcChannel]:
    ch = GrpcChannel(
        me=RETAILER, identity=pki.identity(RETAILER), tags=TagRegistry([TestTag]), options=LIMITS
    )
    ch.start()
    ch.add_peer(PartyAddress(BANK, "127.0.0.1:1"))
    ch.add_peer(PartyAddress(ARBITER, "127.0.0.1:1"))
    yield ch
    ch.close(grace=0.5)


class Stalled:
    """Push calls from one peer that send a frame header and then nothing."""

    def __init__(self, pki: Pki, host: GrpcChannel, *, sender=BANK) -> None:  # type: ignore[no-untyped-def]
        self.release = threading.Event()
        self.channel = open_channel(
            peer_id="retailer",
            address=f"127.0.0.1:{host.port}",
            identity=pki.identity(sender),
            options=LIMITS,
        )
        self.push = self.channel.stream_unary(PUSH)
        self.calls: list[grpc.Future] = []

    def open(self, job_id: str, step: int, size: int) -> grpc.Future:
        header, _ = encode(data(job_id, step))
        head = pb.Frame(header=header, payload_size=size).SerializeToString()

        def frames() -> Iterator[bytes]:
            yield head
            self.release.wait(120)

        call = self.push.future(frames(), timeout=120)
        self.calls.append(call)
        return call

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        self.channel.close()


def test_stalled_streams_at_the_cap_leave_other_peers_served(pki: Pki, host: GrpcChannel) -> None:
    stalled = Stalled(pki, host)
    try:
        for step in range(LIMITS.max_calls_per_peer):
            stalled.open("job-stall", step, 1024)
        mailbox = host._mailbox
        wait_until(
            lambda: mailbox.queued_bytes("bank") >= 3 * (1024 + ENVELOPE_OVERHEAD_BYTES),
            "the stalled headers reserved",
        )
        # one call more from the same peer is refused at once as busy, not queued
        extra = open_channel(
            peer_id="retailer",
            address=f"127.0.0.1:{host.port}",
            identity=pki.identity(BANK),
            options=LIMITS,
        )
        for _ in range(3):  # refusals do not give the peer its slots back
            with pytest.raises(grpc.RpcError) as info:
                extra.unary_unary(DELIVER)(b"", timeout=30)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "max_calls_per_peer" in (info.value.details() or "")
        extra.close()
        assert host._server._calls["bank"] == LIMITS.max_calls_per_peer
        refused = stalled.open("job-stall", 9, 1024)
        with pytest.raises(grpc.RpcError) as info:
            refused.result(timeout=30)
        assert "max_calls_per_peer" in (info.value.details() or "")
        # the arbiter, another peer, is served meanwhile
        honest = GrpcChannel(
            me=ARBITER, identity=pki.identity(ARBITER), tags=TagRegistry([TestTag]), options=LIMITS
        )
        honest.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{host.port}"))
        try:
            honest.send(data("job-honest", 0, b"on time", sender=ARBITER).with_seq(0))
        finally:
            honest.close(grace=0.1)
        got = host.recv(job_id="job-honest", sender=ARBITER, tag=TestTag.DATA, step=0, timeout=30)
        assert got.payload == b"on time"
    finally:
        stalled.close()


def test_a_stalled_stream_is_cancelled_by_the_receiver(pki: Pki) -> None:
    quick = TransportOptions(retry_seconds=2.0, stream_idle_seconds=0.5)
    host = GrpcChannel(
        me=RETAILER, identity=pki.identity(RETAILER), tags=TagRegistry([TestTag]), options=quick
    )
    host.start()
    host.add_peer(PartyAddress(BANK, "127.0.0.1:1"))
    stalled = Stalled(pki, host)
    try:
        call = stalled.open("job-idle", 0, 4 * MiB)
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=60)  # the receiver cancels; the client does not give up first
        assert info.value.code() is grpc.StatusCode.CANCELLED  # which the sender retries
        wait_until(lambda: host._mailbox.queued_bytes("bank") == 0, "the reservation released")
        wait_until(lambda: not host._server._calls, "the call slot given back")
    finally:
        stalled.close()
        host.close(grace=0.1)


def test_declared_sizes_are_reserved_before_the_body(pki: Pki, host: GrpcChannel) -> None:
    stalled = Stalled(pki, host)
    try:
        stalled.open("job-size", 0, 24 * MiB)
        wait_until(
            lambda: host._mailbox.queued_bytes("bank") >= 24 * MiB, "the first body reserved"
        )
        second = stalled.open("job-size", 1, 24 * MiB)
        with pytest.raises(grpc.RpcError) as info:
            second.result(timeout=30)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "not keeping up" in (info.value.details() or "")
    finally:
        stalled.close()


def mailbox(max_queued: int, journal_dir: Path | None = None) -> Mailbox:
    return Mailbox(
        me=RETAILER,
        tags=TagRegistry([TestTag]),
        replay=ReplayGuard(journal_dir=journal_dir),
        max_queued_bytes=max_queued,
        handler_threads=4,
        stale_mail_seconds=60,
    )


def put(box: Mailbox, envelope: Envelope) -> DeliveryStatus:
    header, payload = encode(envelope)
    return box.deliver(header, payload, digest(header, payload), authenticated=envelope.sender)


def charge(envelope: Envelope) -> int:
    header, payload = encode(envelope)
    return len(header) + len(payload) + ENVELOPE_OVERHEAD_BYTES


def test_empty_envelopes_are_charged_a_fixed_cost() -> None:
    box = mailbox(sum(charge(data("job-empty", step)) for step in range(8)))
    for step in range(8):
        put(box, data("job-empty", step))
    with pytest.raises(ReceiverBusyError, match="not keeping up"):
        put(box, data("job-empty", 8))
    box.take(("job-empty", "", "bank", TestTag.DATA.value, 7), timeout=1)
    assert put(box, data("job-empty", 8)) is DeliveryStatus.ACCEPTED  # room again once read
    box.close()


def test_a_message_a_receive_waits_for_is_admitted_over_budget() -> None:
    box = mailbox(sum(charge(data("job-junk", step)) for step in range(4)))
    for step in range(4):
        put(box, data("job-junk", step))
    with pytest.raises(ReceiverBusyError):
        put(box, data("job-wanted", 0, b"drains"))
    got: list[Envelope] = []
    waiter = threading.Thread(
        target=lambda: got.append(
            box.take(("job-wanted", "", "bank", TestTag.DATA.value, 0), timeout=60)
        )
    )
    waiter.start()
    wait_until(lambda: bool(box._waiting), "the receive is waiting")
    assert put(box, data("job-wanted", 0, b"drains")) is DeliveryStatus.ACCEPTED
    waiter.join()
    assert got[0].payload == b"drains"
    box.close()


def test_mail_of_jobs_nobody_here_uses_is_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(transport_base.time, "monotonic", lambda: clock[0])
    box = mailbox(1 * MiB)
    put(box, data("job-unknown", 0, b"junk"))
    put(box, data("job-active", 0, b"kept"))
    clock[0] += 61
    box.note_job("job-active")  # a local protocol sent or read a message of it
    put(box, data("job-active", 1, b"sweeps"))
    assert box.pending() == 2
    assert box.queued_bytes("bank") == charge(data("job-active", 0, b"kept")) + charge(
        data("job-active", 1, b"sweeps")
    )
    assert any("nothing here used the job" in r.message for r in caplog.records)
    box.close()


def test_insecure_senders_get_their_budget_back() -> None:
    box = mailbox(1 * MiB)
    envelope = data("job-insecure", 0, b"x")
    header, payload = encode(envelope)
    box.deliver(header, payload, digest(header, payload), authenticated=None)
    assert box.queued_bytes("") > 0
    box.take(("job-insecure", "", "bank", TestTag.DATA.value, 0), timeout=1)
    assert box.queued_bytes("") == 0
    box.close()


def test_one_sender_holds_at_most_half_the_handler_threads() -> None:
    box = mailbox(1 * MiB)  # handler_threads=4: two at a time per sender
    gate = threading.Event()
    handled: list[str] = []

    def slow(envelope: Envelope) -> None:
        if envelope.sender == BANK:
            gate.wait(60)
        handled.append(f"{envelope.sender.party_id}-{envelope.step}")

    box.add_handler(transport_base.MessageFilter.for_tags(TestTag.DATA), slow)
    for step in range(5):  # two run and block, three wait in the bank's own queue
        assert put(box, data("job-h", step)) is DeliveryStatus.ACCEPTED
    put(box, data("job-h", 0, sender=ARBITER))  # another sender is served meanwhile
    wait_until(lambda: handled == ["arbiter-0"], "the arbiter's envelope handled")
    assert box.queued_bytes("bank") > 0  # the bank's five are still charged
    gate.set()
    wait_until(lambda: len(handled) == 6, "the bank's backlog handled")
    assert box.queued_bytes("bank") == 0
    box.close()


def test_a_closing_mailbox_records_no_replay_mark() -> None:
    guard = ReplayGuard()
    box = Mailbox(me=RETAILER, tags=TagRegistry([TestTag]), replay=guard, max_queued_bytes=MiB)
    box.close()
    envelope = data("job-closing", 0, b"x")
    with pytest.raises(TransportError, match="shutting down"):
        put(box, envelope)
    assert guard.check(envelope, digest(*encode(envelope))) is Verdict.NEW


def test_journal_files_stay_few_and_a_failed_write_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = ReplayGuard(journal_dir=tmp_path)
    for job in range(3 * OPEN_JOURNALS):
        envelope = data(f"job-{job}", 0)
        guard.check(envelope, digest(*encode(envelope)))
        assert len(guard._journals) <= OPEN_JOURNALS
    assert len(list(tmp_path.glob("*.jsonl"))) == 3 * OPEN_JOURNALS

    envelope = data("job-full", 0, b"payload")
    real = ReplayGuard._append

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ReplayGuard, "_append", disk_full)
    with pytest.raises(ReceiverBusyError, match="retry"):
        guard.check(envelope, digest(*encode(envelope)))
    monkeypatch.setattr(ReplayGuard, "_append", real)
    assert guard.check(envelope, digest(*encode(envelope))) is Verdict.NEW  # delivered, not lost
    guard.close()
    again = ReplayGuard(journal_dir=tmp_path)  # and journaled
    assert again.check(envelope, digest(*encode(envelope))) is Verdict.DUPLICATE
    again.close()
