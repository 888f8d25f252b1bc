"""gRPC-only behaviour: processes, identity refusals, malformed input, retries, shutdown."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protocols.envelope import ControlBlock, Envelope, PlainBlock, encode
from protocols.errors import (
    HandshakeError,
    HandshakeFailure,
    InsecureConfigError,
    PeerIdentityError,
    PeerUnavailableError,
    TransportError,
)
from protocols.generated import transport_pb2 as pb
from protocols.roles import Party, PartyAddress, Role
from protocols.tags import TagRegistry
from protocols.transport.grpc_channel import GrpcChannel
from protocols.transport.grpc_client import DELIVER, PUSH, open_channel
from protocols.transport.options import TransportOptions
from protocols.transport.tls import TlsIdentity
from tests.conftest import ARBITER, BANK, RETAILER, Pki, TestTag

ROOT = Path(__file__).resolve().parents[2]
FAST = TransportOptions(retry_seconds=2.0)


def data(
    job_id: str, sender: Party, receiver: Party, step: int = 0, body: PlainBlock | None = None
) -> Envelope:
    return Envelope(
        job_id=job_id, sender=sender, receiver=receiver, tag=TestTag.DATA, step=step, body=body
    )


def channel_for(identity: TlsIdentity, me: Party | None = None, **kw: object) -> GrpcChannel:
    ch = GrpcChannel(
        me=me or identity.party, identity=identity, tags=TagRegistry([TestTag]), options=FAST, **kw
    )  # type: ignore[arg-type]
    ch.start()
    return ch


@pytest.fixture
def host(pki: Pki) -> Iterator[GrpcChannel]:
    """A fresh retailer channel that knows bank (pinned) and arbiter."""
    ch = channel_for(pki.identity(RETAILER))
    ch.add_peer(PartyAddress(BANK, "127.0.0.1:1", (pki.dir / "bank.pem").read_bytes()))
    ch.add_peer(PartyAddress(ARBITER, "127.0.0.1:1", (pki.dir / "arbiter.pem").read_bytes()))
    yield ch
    ch.close(grace=0.5)


def send_as(
    identity: TlsIdentity, host: GrpcChannel, envelope: Envelope, me: Party | None = None
) -> None:
    sender = channel_for(identity, me=me)
    try:
        sender.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{host.port}"))
        sender.send(envelope)
    finally:
        sender.close(grace=0.1)


# ---------------------------------------------------------------- processes


def test_64_mib_body_between_two_processes(pki: Pki, job_id: str) -> None:
    body = os.urandom(64 << 20)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("receiver_process.py")),
            str(pki.dir),
            "retailer",
            "bank",
            job_id,
            "2",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdin and proc.stdout
    try:
        port = int(proc.stdout.readline())
        bank = channel_for(pki.identity(BANK))
        proc.stdin.write(f"127.0.0.1:{bank.port}\n")
        proc.stdin.flush()
        bank.add_peer(
            PartyAddress(RETAILER, f"127.0.0.1:{port}", (pki.dir / "retailer.pem").read_bytes())
        )
        bank.send(data(job_id, BANK, RETAILER, 0, PlainBlock(body)))
        bank.send(data(job_id, BANK, RETAILER, 1, PlainBlock(b"small")))
        lines = [proc.stdout.readline().split() for _ in range(2)]
        assert lines[0] == ["0", str(len(body)), hashlib.sha256(body).hexdigest()]
        assert lines[1][:2] == ["1", "5"]
        assert proc.wait(30) == 0
        bank.close(grace=0.5)
    finally:
        proc.kill()


# ---------------------------------------------------------------- identity


def test_client_certificate_from_another_ca_is_rejected(
    pki: Pki, host: GrpcChannel, job_id: str
) -> None:
    foreign = dataclasses.replace(
        pki.other_ca_identity(BANK), ca_pem=(pki.dir / "ca.pem").read_bytes()
    )
    with pytest.raises(HandshakeError) as info:  # we trust the server; it does not trust us
        send_as(foreign, host, data(job_id, BANK, RETAILER))
    assert info.value.reason is HandshakeFailure.REJECTED_BY_PEER


def test_server_certificate_from_another_ca_is_untrusted(pki: Pki, job_id: str) -> None:
    other_host = channel_for(pki.other_ca_identity(RETAILER))
    bank = channel_for(pki.identity(BANK))
    try:
        bank.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{other_host.port}"))
        with pytest.raises(HandshakeError) as info:
            bank.send(data(job_id, BANK, RETAILER))
        assert info.value.reason is HandshakeFailure.UNTRUSTED_CERTIFICATE
    finally:
        bank.close(grace=0.1)
        other_host.close(grace=0.1)


def test_expired_client_certificate_is_rejected(pki: Pki, host: GrpcChannel, job_id: str) -> None:
    with pytest.raises(HandshakeError) as info:
        send_as(pki.expired_identity(BANK), host, data(job_id, BANK, RETAILER))
    assert info.value.reason is HandshakeFailure.REJECTED_BY_PEER


def test_expired_certificate_is_refused_when_loaded(pki: Pki, tmp_path: Path) -> None:
    from protocols.errors import ConfigError
    from protocols.transport import tls

    ident = pki.expired_identity(BANK)
    (tmp_path / "c.pem").write_bytes(ident.certificate_pem)
    (tmp_path / "c.key").write_bytes(ident.key_pem)
    with pytest.raises(ConfigError, match="expired"):
        tls.load_identity(
            certificate=tmp_path / "c.pem", key=tmp_path / "c.key", ca=pki.dir / "ca.pem"
        )


def test_no_client_certificate_is_rejected(pki: Pki, host: GrpcChannel) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(pki.dir / "ca.pem").read_bytes())
    ch = grpc.secure_channel(
        f"127.0.0.1:{host.port}", creds, options=[("grpc.ssl_target_name_override", "retailer")]
    )
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary(DELIVER)(b"", timeout=5)
    ch.close()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_peer_reached_under_another_name_is_refused(
    pki: Pki, host: GrpcChannel, job_id: str
) -> None:
    bank = channel_for(pki.identity(BANK))
    try:  # arbiter's address actually reaches the retailer
        bank.add_peer(PartyAddress(ARBITER, f"127.0.0.1:{host.port}"))
        with pytest.raises(HandshakeError) as info:
            bank.send(data(job_id, BANK, ARBITER))
        assert info.value.reason is HandshakeFailure.WRONG_PEER_NAME
    finally:
        bank.close(grace=0.1)


def test_certificate_other_than_the_pinned_one_is_refused(
    pki: Pki, host: GrpcChannel, job_id: str
) -> None:
    impostor = pki.extra_identity("impostor", BANK)  # same CA, same name, other key
    with pytest.raises(PeerIdentityError, match="pinned"):
        send_as(impostor, host, data(job_id, BANK, RETAILER))


def test_certificate_naming_another_role_is_refused(
    pki: Pki, host: GrpcChannel, job_id: str
) -> None:
    bank_as_host = Party("bank", Role.HOST)
    ident = pki.extra_identity("bank-as-host", bank_as_host)
    with pytest.raises(PeerIdentityError, match="configured as bank \\(guest\\)"):
        send_as(ident, host, data(job_id, bank_as_host, RETAILER), me=bank_as_host)


def test_unknown_party_is_refused(pki: Pki, host: GrpcChannel, job_id: str) -> None:
    stranger = Party("stranger", Role.GUEST)
    ident = pki.extra_identity("stranger", stranger)
    with pytest.raises(PeerIdentityError, match="not a configured peer"):
        send_as(ident, host, data(job_id, stranger, RETAILER), me=stranger)


def test_refusals_are_logged_at_the_server(
    pki: Pki, host: GrpcChannel, job_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(PeerIdentityError):
        send_as(pki.extra_identity("impostor2", BANK), host, data(job_id, BANK, RETAILER))
    assert any("refused a call" in r.message and "pinned" in r.message for r in caplog.records)


def test_missing_identity_needs_the_insecure_flag(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(InsecureConfigError, match="mutual TLS is required"):
        GrpcChannel(me=BANK, identity=None, tags=TagRegistry([TestTag]))
    ch = GrpcChannel(me=BANK, identity=None, tags=TagRegistry([TestTag]), insecure=True)
    ch.close(grace=0)
    assert any("INSECURE TRANSPORT" in r.message for r in caplog.records)


# ---------------------------------------------------------------- malformed input


@pytest.fixture
def raw_bank(pki: Pki, host: GrpcChannel) -> Iterator[grpc.Channel]:
    """A bare gRPC channel with the bank's certificate, to send hand-made frames."""
    ch = open_channel(
        peer_id="retailer",
        address=f"127.0.0.1:{host.port}",
        identity=pki.identity(BANK),
        options=FAST,
    )
    yield ch
    ch.close()


def frame(envelope: Envelope) -> bytes:
    header, payload = encode(envelope)
    return bytes(
        pb.Frame(header=header, payload_size=len(payload), payload=payload).SerializeToString()
    )


BAD_INPUT = {
    "garbage frame": (b"\xff\xfe\x00garbage", grpc.StatusCode.INVALID_ARGUMENT),
    "garbage header": (
        pb.Frame(header=b"\x0a\xff").SerializeToString(),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "size mismatch": (
        pb.Frame(header=b"", payload_size=10, payload=b"x").SerializeToString(),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_malformed_frames_are_refused_and_service_goes_on(
    name: str, raw_bank: grpc.Channel, pki: Pki, host: GrpcChannel, job_id: str
) -> None:
    request, code = BAD_INPUT[name]
    with pytest.raises(grpc.RpcError) as info:
        raw_bank.unary_unary(DELIVER)(request, timeout=5)
    assert info.value.code() is code
    send_as(pki.identity(BANK), host, data(job_id, BANK, RETAILER, 0, PlainBlock(b"still serving")))
    assert (
        host.recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=0, timeout=5).payload
        == b"still serving"
    )


def test_envelope_checks_over_the_wire(raw_bank: grpc.Channel, job_id: str) -> None:
    deliver = raw_bank.unary_unary(DELIVER)
    cases = [
        (
            data(job_id, RETAILER, RETAILER).with_seq(1),
            grpc.StatusCode.PERMISSION_DENIED,
        ),  # claims another sender
        (
            data(job_id, BANK, ARBITER).with_seq(1),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),  # wrong receiver
        (
            dataclasses.replace(data(job_id, BANK, RETAILER), tag="nobody.KNOWS", seq=1),
            grpc.StatusCode.UNIMPLEMENTED,
        ),
        (data(job_id, BANK, RETAILER), grpc.StatusCode.INVALID_ARGUMENT),  # no seq
    ]
    for envelope, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            deliver(frame(envelope), timeout=5)
        assert info.value.code() is code, envelope
    bad_control = pb.Envelope(
        job_id=job_id,
        sender=pb.GUEST,
        receiver=pb.HOST,
        sender_id="bank",
        receiver_id="retailer",
        tag="test.DATA",
        seq=9,
    )
    bad_control.control.SetInParent()
    request = pb.Frame(
        header=bad_control.SerializeToString(), payload_size=3, payload=b"[1]"
    ).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        deliver(request, timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "JSON object" in (
        info.value.details() or ""
    )


def test_truncated_and_overlong_streams_are_refused(raw_bank: grpc.Channel, job_id: str) -> None:
    header, _ = encode(data(job_id, BANK, RETAILER, 0, PlainBlock(b"")).with_seq(1))
    push = raw_bank.stream_unary(PUSH)
    head = pb.Frame(header=header, payload_size=3 << 20).SerializeToString()
    for chunks, needle in (
        ([b"a" * (1 << 20)], "truncated"),
        ([b"a" * (1 << 20)] * 4, "more than"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            push(iter([head, *chunks]), timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and needle in (
            info.value.details() or ""
        )


def test_oversized_envelope_is_refused(pki: Pki, job_id: str) -> None:
    small = TransportOptions(retry_seconds=2.0, chunk_bytes=1 << 20, max_envelope_bytes=2 << 20)
    host = GrpcChannel(
        me=RETAILER, identity=pki.identity(RETAILER), tags=TagRegistry([TestTag]), options=small
    )
    host.start()
    host.add_peer(PartyAddress(BANK, "127.0.0.1:1"))
    try:
        from protocols.errors import OversizedEnvelopeError

        with pytest.raises(OversizedEnvelopeError, match="exceeds"):
            send_as(
                pki.identity(BANK),
                host,
                data(job_id, BANK, RETAILER, 0, PlainBlock(b"x" * (3 << 20))),
            )
    finally:
        host.close(grace=0.1)


# ---------------------------------------------------------------- retries and shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_send_retries_until_the_peer_comes_up(pki: Pki, job_id: str) -> None:
    port = free_port()
    bank = channel_for(pki.identity(BANK))
    bank.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{port}"))
    started: list[GrpcChannel] = []

    def late_start() -> None:
        time.sleep(0.6)
        ch = GrpcChannel(
            me=RETAILER,
            identity=pki.identity(RETAILER),
            tags=TagRegistry([TestTag]),
            listen=f"127.0.0.1:{port}",
        )
        ch.add_peer(PartyAddress(BANK, f"127.0.0.1:{bank.port}"))
        ch.start()
        started.append(ch)

    t = threading.Thread(target=late_start)
    t.start()
    try:
        bank.send(data(job_id, BANK, RETAILER, 0, PlainBlock(b"eventually")))
        t.join()
        assert (
            started[0].recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=0, timeout=5).payload
            == b"eventually"
        )
    finally:
        t.join()
        bank.close(grace=0.1)
        for ch in started:
            ch.close(grace=0.1)


def test_a_send_follows_the_peer_to_its_new_address(pki: Pki, job_id: str) -> None:
    """The peer's service restarted on another port while a send to the old one was still
    retrying: once the operator gives the new address (``add_peer``), that send goes there
    instead of failing (a lost reply would leave the requester waiting for good)."""
    bank = channel_for(pki.identity(BANK))
    bank.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{free_port()}"))
    moved: list[GrpcChannel] = []

    def move() -> None:
        time.sleep(0.6)  # the send is retrying against the old address by now
        ch = channel_for(pki.identity(RETAILER))
        ch.add_peer(PartyAddress(BANK, f"127.0.0.1:{bank.port}"))
        moved.append(ch)
        bank.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{ch.port}"))

    t = threading.Thread(target=move)
    t.start()
    try:
        bank.send(data(job_id, BANK, RETAILER, 0, PlainBlock(b"followed")))
        t.join()
        got = moved[0].recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=0, timeout=5)
        assert got.payload == b"followed"
    finally:
        t.join()
        bank.close(grace=0.1)
        for ch in moved:
            ch.close(grace=0.1)


def test_unreachable_peer_gives_up_with_a_clear_error(pki: Pki, job_id: str) -> None:
    bank = channel_for(pki.identity(BANK))
    bank.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(PeerUnavailableError, match="is its service running"):
            bank.send(data(job_id, BANK, RETAILER))
    finally:
        bank.close(grace=0.1)


def test_lost_reply_is_retried_and_acknowledged_as_duplicate(pki: Pki, job_id: str) -> None:
    slow = TransportOptions(retry_seconds=10.0, base_deadline_seconds=0.5)
    host = GrpcChannel(me=RETAILER, identity=pki.identity(RETAILER), tags=TagRegistry([TestTag]))
    host.add_peer(PartyAddress(BANK, "127.0.0.1:1"))
    host.start()
    mailbox = host._mailbox  # delay the first reply past the sender's deadline
    real_deliver = mailbox.deliver
    calls: list[str] = []

    def delayed(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        status = real_deliver(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(status.value)
        if len(calls) == 1:
            time.sleep(1.0)
        return status

    mailbox.deliver = delayed  # type: ignore[method-assign]
    bank = GrpcChannel(
        me=BANK, identity=pki.identity(BANK), tags=TagRegistry([TestTag]), options=slow
    )
    bank.start()
    bank.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{host.port}"))
    try:
        bank.send(data(job_id, BANK, RETAILER, 0, PlainBlock(b"once")))
        assert calls[:2] == ["accepted", "duplicate"]
        assert (
            host.recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=0, timeout=5).payload
            == b"once"
        )
        assert host._mailbox.pending() == 0
    finally:
        bank.close(grace=0.1)
        host.close(grace=0.1)


def test_clean_shutdown_loses_no_accepted_message(pki: Pki, job_id: str) -> None:
    host = channel_for(pki.identity(RETAILER))
    host.add_peer(PartyAddress(BANK, "127.0.0.1:1"))
    bank = channel_for(pki.identity(BANK))
    bank.add_peer(PartyAddress(RETAILER, f"127.0.0.1:{host.port}"))
    accepted: list[int] = []
    failures: list[BaseException] = []

    def pump() -> None:
        for step in range(10_000):
            try:
                bank.send(data(job_id, BANK, RETAILER, step, PlainBlock(os.urandom(64 << 10))))
                accepted.append(step)
            except TransportError as exc:
                failures.append(exc)
                return

    t = threading.Thread(target=pump)
    t.start()
    time.sleep(0.5)
    host.close(grace=2.0)
    t.join(30)
    bank.close(grace=0.1)
    assert accepted and failures, "the sender should have been cut off mid-stream"
    # every envelope the sender saw accepted is in the mailbox; at most one more may have
    # arrived whose reply was cut off (the sender would retransmit it, deduplicated by seq)
    assert host._mailbox.pending() in (len(accepted), len(accepted) + 1)
    for step in accepted:
        host.recv(job_id=job_id, sender=BANK, tag=TestTag.DATA, step=step, timeout=0)
    assert isinstance(failures[0], TransportError)
    assert ControlBlock  # noqa: B018 - imported for the contract module's parity
