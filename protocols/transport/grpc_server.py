"""Server side of the gRPC transport: one server per party, receiving pushes.

The servicer is thin: it identifies the calling peer from its TLS certificate,
reassembles streamed payloads while hashing them, and hands header, payload and
digest to the :class:`~protocols.transport.base.Mailbox`, which applies the
receive steps. Every domain error becomes a status code in one place
(:mod:`protocols.transport.grpc_errors`); the server keeps serving.

Identity checks at the server, in order: the client certificate names a
configured peer (or this party itself, for admin calls) with the configured role;
it is the certificate pinned for that peer, if one is pinned; the envelope's
claimed sender is that peer. A refusal is logged here. A TLS handshake that fails
never reaches this code: grpcio does not surface it to Python, only to its own
C-core log (``GRPC_VERBOSITY``).

Limits, so that one misbehaving peer cannot starve the others (docs/protocol.md §2.9.1):

1. every call is served as a client stream (a unary ``Deliver`` is a stream of one
   frame on the wire), so this code runs as soon as a call opens, before its first
   byte, and can count it;
2. a peer may hold at most ``max_calls_per_peer`` calls at once; one more is refused at
   once as busy (:class:`ReceiverBusyError`, retried by the sender), freeing its thread;
3. the declared size of a body is reserved against the peer's queue budget before the
   body is read (:meth:`Mailbox.reserve`);
4. a watchdog cancels a call that delivers no bytes for ``stream_idle_seconds``, and any
   call still open ``server_deadline(size)`` after it began.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocols.envelope import MAX_HEADER_BYTES, EnvelopeDigest, json_object, mail_key
from protocols.errors import (
    ConfigError,
    MalformedEnvelopeError,
    OversizedEnvelopeError,
    PeerIdentityError,
    ReceiverBusyError,
)
from protocols.generated import transport_pb2 as pb
from protocols.roles import Party
from protocols.transport.base import DeliveryStatus, Mailbox
from protocols.transport.grpc_client import SERVICE
from protocols.transport.grpc_errors import abort_with
from protocols.transport.options import TransportOptions
from protocols.transport.tls import TlsIdentity, fingerprint, party_of

logger = logging.getLogger(__name__)

AdminHandler = Callable[[str, dict[str, Any]], dict[str, Any]]


class TransportServer:
    """The party's gRPC server: Deliver, Push, Admin and the standard health service."""

    def __init__(
        self,
        *,
        mailbox: Mailbox,
        identity: TlsIdentity | None,
        peers: Mapping[str, Party],
        pinned: Mapping[str, str],
        listen: str,
        options: TransportOptions,
        admin: AdminHandler | None = None,
        threads: int | None = None,
    ) -> None:
        self.me = mailbox.me
        self._mailbox = mailbox
        self._identity = identity
        self._peers = dict(peers)
        self._pinned = dict(pinned)
        self._options = options
        self._admin = admin
        self._known: dict[bytes, Party] = {}
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}  # caller id -> calls open (step 2)
        self.serving = False  # started and not stopping (for probes)
        self._watchdog = _Watchdog(idle_seconds=options.stream_idle_seconds)
        self.health = health.HealthServicer()
        self._server = grpc.server(
            ThreadPoolExecutor(
                threads or options.threads_for(max(len(peers), 2)),
                thread_name_prefix=f"{self.me.party_id}-rpc",
            ),
            options=[
                ("grpc.max_receive_message_length", options.grpc_message_limit),
                ("grpc.max_send_message_length", options.grpc_message_limit),
            ],
        )
        handlers = {  # all client streams (step 1); unary clients send a stream of one
            "Deliver": grpc.stream_unary_rpc_method_handler(
                self._limited(self._deliver), response_serializer=_serialize
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                self._limited(self._push), response_serializer=_serialize
            ),
            "Admin": grpc.stream_unary_rpc_method_handler(
                self._limited(self._admin_call), response_serializer=_serialize
            ),
        }
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, handlers)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if identity is None:
            self.port: int = self._server.add_insecure_port(listen)
        else:
            creds = grpc.ssl_server_credentials(
                [(identity.key_pem, identity.certificate_pem)],
                root_certificates=identity.ca_pem,
                require_client_auth=True,
            )
            self.port = self._server.add_secure_port(listen, creds)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")

    def add_peer(self, party: Party, *, pinned_pem: bytes | None) -> None:
        """Accept calls from ``party`` (optionally only with the pinned certificate)."""
        with self._lock:
            self._peers[party.party_id] = party
            if pinned_pem is not None:
                self._pinned[party.party_id] = fingerprint(pinned_pem)

    def start(self) -> None:
        """Start serving and report SERVING on the health service."""
        self._watchdog.start()
        self._server.start()
        self.serving = True
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, finish in-flight calls for up to ``grace`` s, then stop."""
        self.serving = False
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._watchdog.stop()

    # -- identity -------------------------------------------------------------

    def _caller(self, context: grpc.ServicerContext) -> Party | None:
        """The authenticated calling party (``None`` in insecure mode)."""
        if self._identity is None:
            return None
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            raise PeerIdentityError("the call carries no client certificate")
        pem = pems[0]
        with self._lock:
            known = self._known.get(pem)
            if known is not None:
                return known
            try:
                party = party_of(pem)
            except ConfigError as exc:  # a certificate of the CA without a party's names
                raise PeerIdentityError(f"the client certificate names no party: {exc}") from None
            if party == self.me:
                self._known[pem] = party
                return party
            expected = self._peers.get(party.party_id)
            if expected is None:
                raise PeerIdentityError(f"{party} is not a configured peer of {self.me}")
            if expected != party:
                raise PeerIdentityError(
                    f"certificate names {party} but {party.party_id} is configured as {expected}"
                )
            pin = self._pinned.get(party.party_id)
            if pin is not None and pin != fingerprint(pem):
                raise PeerIdentityError(
                    f"{party} presented a certificate other than the one pinned for it"
                )
            self._known[pem] = party
            return party

    # -- RPCs -------------------------------------------------------------------

    def _limited(self, rpc: _Rpc) -> Callable[[Iterator[bytes], grpc.ServicerContext], Any]:
        """Wrap ``rpc`` with steps 2 and 4 and the one translation of errors."""

        def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            call: _Call | None = None
            caller_id: str | None = None
            try:
                caller = self._caller(context)
                ident = "" if caller is None else caller.party_id
                self._enter(ident)
                caller_id = ident  # only once admitted: a refused call frees no slot
                call = self._watchdog.watch(context)
                return rpc(caller, _Watched(requests, call), call)
            except Exception as exc:  # translated in one place; unknown -> INTERNAL
                reason: Exception = exc
                if call is not None and call.cancelled_because:
                    reason = ReceiverBusyError(f"call cancelled: {call.cancelled_because}")
                abort_with(context, reason, peer=context.peer())
                raise  # pragma: no cover - abort raises
            finally:
                if call is not None:
                    self._watchdog.forget(call)
                if caller_id is not None:
                    self._leave(caller_id)

        return serve

    def _enter(self, caller_id: str) -> None:
        with self._lock:
            open_calls = self._calls.get(caller_id, 0)
            if open_calls >= self._options.max_calls_per_peer:
                raise ReceiverBusyError(
                    f"{self.me.party_id} already serves {open_calls} calls from "
                    f"{caller_id or 'this caller'} (transport.max_calls_per_peer); retry later"
                )
            self._calls[caller_id] = open_calls + 1

    def _leave(self, caller_id: str) -> None:
        with self._lock:
            left = self._calls.get(caller_id, 0) - 1
            if left > 0:
                self._calls[caller_id] = left
            else:
                self._calls.pop(caller_id, None)

    def _deliver(self, caller: Party | None, requests: Iterator[bytes], call: _Call) -> pb.Ack:
        frame = _frame(_one(requests))
        if frame.payload_size != len(frame.payload):
            raise MalformedEnvelopeError(
                f"frame declares {frame.payload_size} B but carries {len(frame.payload)} B"
            )
        return self._receive(caller, frame, iter(()), call)

    def _push(self, caller: Party | None, requests: Iterator[bytes], call: _Call) -> pb.Ack:
        first = next(requests, None)
        if first is None:
            raise MalformedEnvelopeError("empty stream: no frame header")
        frame = _frame(first)
        if frame.payload:
            raise MalformedEnvelopeError("a streamed frame header must not carry payload")
        return self._receive(caller, frame, requests, call)

    def _receive(
        self, caller: Party | None, frame: pb.Frame, chunks: Iterator[bytes], call: _Call
    ) -> pb.Ack:
        size = frame.payload_size
        if size > self._options.max_envelope_bytes:
            raise OversizedEnvelopeError(
                f"payload of {size} B exceeds this party's limit of "
                f"{self._options.max_envelope_bytes} B (transport.max_envelope_bytes)"
            )
        if len(frame.header) > MAX_HEADER_BYTES:
            raise MalformedEnvelopeError(
                f"envelope header of {len(frame.header)} B exceeds {MAX_HEADER_BYTES} B"
            )
        call.deadline = call.started + self._options.server_deadline(size)  # step 4
        sender = "" if caller is None else caller.party_id
        reservation = self._mailbox.reserve(  # step 3
            sender, len(frame.header) + size, key=mail_key(frame.header)
        )
        try:
            digest = EnvelopeDigest(frame.header)
            digest.update(frame.payload)
            parts, got = [frame.payload], len(frame.payload)
            for chunk in chunks:
                got += len(chunk)
                if got > size:
                    raise MalformedEnvelopeError(f"stream carries more than the declared {size} B")
                digest.update(chunk)
                parts.append(chunk)
            if got != size:
                raise MalformedEnvelopeError(f"stream truncated: {got} of {size} B arrived")
            self._watchdog.forget(call)  # received; what follows is this party's own work
            payload = b"".join(parts)
            del parts
            status = self._mailbox.deliver(
                frame.header,
                payload,
                digest.digest(),
                authenticated=caller,
                reservation=reservation,
            )
        finally:
            reservation.release()
        code = pb.Ack.DUPLICATE if status is DeliveryStatus.DUPLICATE else pb.Ack.ACCEPTED
        return pb.Ack(status=code, receiver_id=self.me.party_id)

    def _admin_call(
        self, caller: Party | None, requests: Iterator[bytes], call: _Call
    ) -> pb.AdminReply:
        if caller is not None and caller != self.me:
            raise PeerIdentityError(f"admin calls are for {self.me}'s own operator, not {caller}")
        if self._admin is None:
            raise PeerIdentityError("this party exposes no admin commands")
        try:
            msg = pb.AdminRequest.FromString(_one(requests))
        except DecodeError as exc:
            raise MalformedEnvelopeError("admin request does not decode") from exc
        self._watchdog.forget(call)  # an operator's command (a whole PSI) may take long
        data = json_object(msg.data or b"{}", what="admin request data")
        reply = self._admin(msg.command, data)
        return pb.AdminReply(data=json.dumps(reply).encode())


_Rpc = Callable[[Party | None, Iterator[bytes], "_Call"], Any]


class _Call:
    """One open call as the watchdog sees it."""

    def __init__(self, context: grpc.ServicerContext, idle_seconds: float) -> None:
        self.context = context
        self.started = time.monotonic()
        self.deadline: float | None = self.started + idle_seconds  # until the size is known
        self.last_progress = self.started
        self.cancelled_because = ""


class _Watched(Iterator[bytes]):
    """A request iterator that tells the watchdog each time bytes arrive."""

    def __init__(self, requests: Iterator[bytes], call: _Call) -> None:
        self._requests = requests
        self._call = call

    def __next__(self) -> bytes:
        try:
            item = next(self._requests)
        except grpc.RpcError:
            raise ReceiverBusyError(
                self._call.cancelled_because or "the call was cancelled"
            ) from None
        self._call.last_progress = time.monotonic()
        return item


class _Watchdog:
    """Step 4: one thread that cancels idle or overdue calls."""

    def __init__(self, *, idle_seconds: float) -> None:
        self._idle = idle_seconds
        self._calls: set[_Call] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpc-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def watch(self, context: grpc.ServicerContext) -> _Call:
        call = _Call(context, self._idle)
        with self._lock:
            self._calls.add(call)
        return call

    def forget(self, call: _Call) -> None:
        with self._lock:
            self._calls.discard(call)

    def _run(self) -> None:
        period = min(1.0, self._idle / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                if now - call.last_progress > self._idle:
                    reason = f"no bytes for {self._idle:.0f} s (transport.stream_idle_seconds)"
                elif call.deadline is not None and now > call.deadline:
                    reason = "the call outlasted its deadline for its declared size"
                else:
                    continue
                call.cancelled_because = reason
                self.forget(call)
                call.context.cancel()


def _one(requests: Iterator[bytes]) -> bytes:
    """The single message of a unary call."""
    first = next(requests, None)
    if first is None:
        raise MalformedEnvelopeError("the call carried no message")
    if next(requests, None) is not None:
        raise MalformedEnvelopeError("a unary call carried more than one message")
    return first


def _frame(data: bytes) -> pb.Frame:
    try:
        return pb.Frame.FromString(data)
    except DecodeError as exc:
        raise MalformedEnvelopeError(f"frame of {len(data)} B does not decode") from exc


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())
