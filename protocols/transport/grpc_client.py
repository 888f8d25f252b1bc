"""Client side of the gRPC transport: push envelopes to one peer, with retries.

A failed attempt is retried with the byte-identical envelope (the receiver's
replay guard acknowledges a repeat it already has) after ``UNAVAILABLE`` (peer down or
busy), a lost reply (``DEADLINE_EXCEEDED``) or a call the receiver cancelled
(``CANCELLED``), until ``retry_seconds`` have passed. TLS
handshake failures are not retried: they raise :class:`HandshakeError`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from protocols.errors import (
    HandshakeFailure,
    MalformedEnvelopeError,
    PeerUnavailableError,
    TransportError,
)
from protocols.generated import transport_pb2 as pb
from protocols.roles import Party
from protocols.transport.base import DeliveryStatus
from protocols.transport.grpc_errors import (
    error_from_rpc,
    handshake_error,
    handshake_failure,
    is_peer_closed,
)
from protocols.transport.options import TransportOptions
from protocols.transport.tls import TlsIdentity

logger = logging.getLogger(__name__)

SERVICE = "vfl.transport.v1.Transport"
DELIVER = f"/{SERVICE}/Deliver"
PUSH = f"/{SERVICE}/Push"
ADMIN = f"/{SERVICE}/Admin"
_PEER_CLOSED_LIMIT = 5
# Besides UNAVAILABLE (peer down, or busy: docs/protocol.md §2.9.1): a lost reply, and a call
# the receiver's watchdog cancelled because it stalled.
_RETRIED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def channel_options(peer_id: str, options: TransportOptions) -> list[tuple[str, Any]]:
    """gRPC channel options: expected peer name, message limits, no built-in retries."""
    return [
        ("grpc.ssl_target_name_override", peer_id),
        ("grpc.max_send_message_length", options.grpc_message_limit),
        ("grpc.max_receive_message_length", options.grpc_message_limit),
        ("grpc.enable_retries", 0),
    ]


def open_channel(
    *, peer_id: str, address: str, identity: TlsIdentity | None, options: TransportOptions
) -> grpc.Channel:
    """A gRPC channel to ``address`` that accepts only ``peer_id``'s certificate."""
    opts = channel_options(peer_id, options)
    if identity is None:
        return grpc.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.certificate_pem,
    )
    return grpc.secure_channel(address, creds, options=opts)


class PeerClient:
    """Sends envelopes to one peer."""

    def __init__(
        self,
        *,
        peer: Party,
        address: str,
        identity: TlsIdentity | None,
        options: TransportOptions,
    ) -> None:
        self.peer = peer
        self.address = address
        self._options = options
        self._closed = threading.Event()
        self._channel = open_channel(
            peer_id=peer.party_id, address=address, identity=identity, options=options
        )
        self._deliver = self._channel.unary_unary(DELIVER, response_deserializer=pb.Ack.FromString)
        self._push = self._channel.stream_unary(PUSH, response_deserializer=pb.Ack.FromString)
        self._admin = self._channel.unary_unary(
            ADMIN, response_deserializer=pb.AdminReply.FromString
        )

    def deliver(self, header: bytes, payload: bytes) -> DeliveryStatus:
        """Send one encoded envelope; retry as the module docstring says."""
        size = len(payload)
        if size <= self._options.chunk_bytes:
            frame = pb.Frame(header=header, payload_size=size, payload=payload).SerializeToString()
            ack = self._with_retries(lambda t: self._deliver(frame, timeout=t), size)
        else:
            ack = self._with_retries(
                lambda t: self._push(self._frames(header, payload), timeout=t), size
            )
        if ack.receiver_id != self.peer.party_id:
            raise TransportError(f"{self.peer} acknowledged as {ack.receiver_id!r}")
        return (
            DeliveryStatus.DUPLICATE if ack.status == pb.Ack.DUPLICATE else DeliveryStatus.ACCEPTED
        )

    def admin(self, command: str, data: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """Call an admin command on the peer's service (the peer must be ourselves)."""
        request = pb.AdminRequest(command=command, data=json.dumps(data).encode())
        reply = self._with_retries(
            lambda t: self._admin(request.SerializeToString(), timeout=t),
            0,
            deadline=timeout,
            idempotent=False,
        )
        obj = json.loads(reply.data.decode() or "{}")
        if not isinstance(obj, dict):
            raise MalformedEnvelopeError("admin reply is not a JSON object")
        return obj

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (for example: the peer's address changed)."""
        return self._closed.is_set()

    def close(self) -> None:
        """Close the underlying gRPC channel."""
        self._closed.set()
        self._channel.close()

    def _frames(self, header: bytes, payload: bytes) -> Iterator[bytes]:
        yield pb.Frame(header=header, payload_size=len(payload)).SerializeToString()
        step = self._options.chunk_bytes
        for start in range(0, len(payload), step):
            yield payload[start : start + step]

    def _with_retries(
        self, call: Any, size: int, *, deadline: float | None = None, idempotent: bool = True
    ) -> Any:
        """Make ``call`` until it succeeds; an admin command (not idempotent) is repeated
        only when it certainly did not run (``UNAVAILABLE``)."""
        attempt_deadline = deadline or self._options.deadline(size)
        give_up = time.monotonic() + self._options.retry_seconds
        delay, peer_closed = 0.05, 0
        peer = f"{self.peer} at {self.address}"
        while True:
            try:
                return call(attempt_deadline)
            except ValueError:  # grpc: "Cannot invoke RPC on closed channel!"
                if self._closed.is_set():
                    raise TransportError(f"channel to {peer} closed during a send") from None
                raise
            except grpc.RpcError as err:
                code = err.code()
                if self._closed.is_set():
                    raise TransportError(f"channel to {peer} closed during a send") from None
                if code is grpc.StatusCode.UNAVAILABLE:
                    failure = handshake_failure(err)
                    if failure is not None:
                        raise handshake_error(failure, peer=peer) from None
                    peer_closed = peer_closed + 1 if is_peer_closed(err) else 0
                    if peer_closed >= _PEER_CLOSED_LIMIT:
                        raise handshake_error(
                            HandshakeFailure.REJECTED_BY_PEER, peer=peer
                        ) from None
                elif code not in _RETRIED or not idempotent:
                    raise error_from_rpc(err, peer=peer) from None
                if time.monotonic() + delay > give_up:
                    raise PeerUnavailableError(
                        f"{peer} did not accept the envelope within "
                        f"{self._options.retry_seconds:.0f} s (last error: {code.name}: "
                        f"{(err.details() or '')[:200]}); is its service running?"
                    ) from None
                logger.info("retrying send to %s after %s", peer, code.name)
                self._closed.wait(delay)
                delay = min(2 * delay, 1.0)
