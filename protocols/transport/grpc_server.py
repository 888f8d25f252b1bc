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
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocols.envelope import EnvelopeDigest, json_object
from protocols.errors import (
    MalformedEnvelopeError,
    OversizedEnvelopeError,
    PeerIdentityError,
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
        workers: int = 8,
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
        self.health = health.HealthServicer()
        self._server = grpc.server(
            ThreadPoolExecutor(workers, thread_name_prefix=f"{self.me.party_id}-rpc"),
            options=[
                ("grpc.max_receive_message_length", options.grpc_message_limit),
                ("grpc.max_send_message_length", options.grpc_message_limit),
            ],
        )
        handlers = {
            "Deliver": grpc.unary_unary_rpc_method_handler(
                self._deliver, response_serializer=_serialize
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                self._push, response_serializer=_serialize
            ),
            "Admin": grpc.unary_unary_rpc_method_handler(
                self._admin_call, response_serializer=_serialize
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
        self._server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, finish in-flight calls for up to ``grace`` s, then stop."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()

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
            party = party_of(pem)
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

    def _deliver(self, request: bytes, context: grpc.ServicerContext) -> pb.Ack:
        try:
            caller = self._caller(context)
            frame = _frame(request)
            if frame.payload_size != len(frame.payload):
                raise MalformedEnvelopeError(
                    f"frame declares {frame.payload_size} B but carries {len(frame.payload)} B"
                )
            self._mailbox.check_size(len(frame.payload))
            digest = EnvelopeDigest(frame.header)
            digest.update(frame.payload)
            status = self._mailbox.deliver(
                frame.header, frame.payload, digest.digest(), authenticated=caller
            )
            return self._ack(status)
        except Exception as exc:  # translated in one place; unknown -> INTERNAL
            abort_with(context, exc, peer=context.peer())
            raise  # pragma: no cover - abort raises

    def _push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.Ack:
        try:
            caller = self._caller(context)
            first = next(requests, None)
            if first is None:
                raise MalformedEnvelopeError("empty stream: no frame header")
            frame = _frame(first)
            size = frame.payload_size
            if size > self._options.max_envelope_bytes:
                raise OversizedEnvelopeError(
                    f"payload of {size} B exceeds this party's limit of "
                    f"{self._options.max_envelope_bytes} B (transport.max_envelope_bytes)"
                )
            self._mailbox.check_size(size)
            digest = EnvelopeDigest(frame.header)
            parts, got = [], 0
            for chunk in requests:
                got += len(chunk)
                if got > size:
                    raise MalformedEnvelopeError(f"stream carries more than the declared {size} B")
                digest.update(chunk)
                parts.append(chunk)
            if got != size:
                raise MalformedEnvelopeError(f"stream truncated: {got} of {size} B arrived")
            payload = b"".join(parts)
            del parts
            status = self._mailbox.deliver(
                frame.header, payload, digest.digest(), authenticated=caller
            )
            return self._ack(status)
        except Exception as exc:  # translated in one place; unknown -> INTERNAL
            abort_with(context, exc, peer=context.peer())
            raise  # pragma: no cover

    def _admin_call(self, request: bytes, context: grpc.ServicerContext) -> pb.AdminReply:
        try:
            caller = self._caller(context)
            if caller is not None and caller != self.me:
                raise PeerIdentityError(
                    f"admin calls are for {self.me}'s own operator, not {caller}"
                )
            if self._admin is None:
                raise PeerIdentityError("this party exposes no admin commands")
            try:
                msg = pb.AdminRequest.FromString(request)
            except DecodeError as exc:
                raise MalformedEnvelopeError("admin request does not decode") from exc
            data = json_object(msg.data or b"{}", what="admin request data")
            reply = self._admin(msg.command, data)
            return pb.AdminReply(data=json.dumps(reply).encode())
        except Exception as exc:  # translated in one place; unknown -> INTERNAL
            abort_with(context, exc, peer=context.peer())
            raise  # pragma: no cover

    def _ack(self, status: DeliveryStatus) -> pb.Ack:
        code = pb.Ack.DUPLICATE if status is DeliveryStatus.DUPLICATE else pb.Ack.ACCEPTED
        return pb.Ack(status=code, receiver_id=self.me.party_id)


def _frame(data: bytes) -> pb.Frame:
    try:
        return pb.Frame.FromString(data)
    except DecodeError as exc:
        raise MalformedEnvelopeError(f"frame of {len(data)} B does not decode") from exc


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())
