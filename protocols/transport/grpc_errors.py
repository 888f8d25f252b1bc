"""The one place that turns domain errors into gRPC status codes and back.

Server side: log the detail, send a sanitised message (our error messages carry
ids, tags, steps and sizes, never data values), unknown exceptions become
``INTERNAL``. Client side: the status code selects the typed error again.
"""

from __future__ import annotations

import logging
import re

import grpc

from protocols.errors import (
    HandshakeError,
    HandshakeFailure,
    MalformedEnvelopeError,
    OversizedEnvelopeError,
    PeerIdentityError,
    ProtocolError,
    ReceiverBusyError,
    ReplayConflictError,
    TransportError,
    UnknownTagError,
    VflError,
    WrongReceiverError,
)

logger = logging.getLogger(__name__)

_MAX_DETAIL = 400

_TO_CODE: tuple[tuple[type[VflError], grpc.StatusCode], ...] = (
    (ReceiverBusyError, grpc.StatusCode.UNAVAILABLE),  # the client retries UNAVAILABLE
    (MalformedEnvelopeError, grpc.StatusCode.INVALID_ARGUMENT),
    (OversizedEnvelopeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnknownTagError, grpc.StatusCode.UNIMPLEMENTED),
    (WrongReceiverError, grpc.StatusCode.FAILED_PRECONDITION),
    (ReplayConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (PeerIdentityError, grpc.StatusCode.PERMISSION_DENIED),
    (ProtocolError, grpc.StatusCode.ABORTED),
    (VflError, grpc.StatusCode.ABORTED),
)
_FROM_CODE: dict[grpc.StatusCode, type[VflError]] = {code: cls for cls, code in _TO_CODE[1:-2]}
_FROM_CODE[grpc.StatusCode.ABORTED] = ProtocolError


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and sanitised message to send for ``exc``."""
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code, str(exc)[:_MAX_DETAIL]
    return grpc.StatusCode.INTERNAL, "internal error at the receiver (see its log)"


def abort_with(context: grpc.ServicerContext, exc: BaseException, *, peer: str) -> None:
    """Log ``exc`` and abort the RPC with the translated status (never returns)."""
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("internal error while serving %s", peer)
    else:
        logger.warning("refused a call from %s: %s: %s", peer, type(exc).__name__, message)
    context.abort(code, message)


def error_from_rpc(err: grpc.RpcError, *, peer: str) -> VflError:
    """A typed error for a failed call to ``peer`` (not for retryable codes)."""
    code = err.code()
    details = err.details() or ""
    cls = _FROM_CODE.get(code)
    if cls is not None:
        return cls(f"{peer} refused the envelope: {details}")
    return TransportError(f"call to {peer} failed: {code.name}: {details[:_MAX_DETAIL]}")


_HANDSHAKE_PATTERNS: tuple[tuple[re.Pattern[str], HandshakeFailure], ...] = (
    (
        re.compile(r"certificate has expired|certificate is not yet valid", re.I),
        HandshakeFailure.EXPIRED_CERTIFICATE,
    ),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED", re.I), HandshakeFailure.UNTRUSTED_CERTIFICATE),
    (
        re.compile(r"Hostname Verification|peer name|No match found for server name", re.I),
        HandshakeFailure.WRONG_PEER_NAME,
    ),
    (
        re.compile(r"PEER_DID_NOT_RETURN_A_CERTIFICATE|CERTIFICATE_REQUIRED", re.I),
        HandshakeFailure.NO_CLIENT_CERTIFICATE,
    ),
    (
        re.compile(r"ALERT_UNKNOWN_CA|ALERT_BAD_CERTIFICATE|ALERT_CERTIFICATE_EXPIRED", re.I),
        HandshakeFailure.REJECTED_BY_PEER,
    ),
    (re.compile(r"handshake|TSI_|SSL_ERROR", re.I), HandshakeFailure.UNKNOWN),
)


def handshake_failure(err: grpc.RpcError) -> HandshakeFailure | None:
    """Classify an ``UNAVAILABLE`` error as a TLS handshake failure, if it is one."""
    details = f"{err.details() or ''} {getattr(err, 'debug_error_string', lambda: '')()}"
    for pattern, failure in _HANDSHAKE_PATTERNS:
        if pattern.search(details):
            return failure
    return None


def is_peer_closed(err: grpc.RpcError) -> bool:
    """The peer closed the connection (what a client sees when the server refuses its cert)."""
    return err.code() is grpc.StatusCode.UNAVAILABLE and "Socket closed" in (err.details() or "")


def handshake_error(failure: HandshakeFailure, *, peer: str) -> HandshakeError:
    """The typed error for a failed handshake with ``peer``."""
    advice = {
        HandshakeFailure.UNTRUSTED_CERTIFICATE: "check that the config's [tls] ca is the "
        "federation CA that signed the peer's certificate",
        HandshakeFailure.EXPIRED_CERTIFICATE: "renew the certificate (`vfl certs request`, "
        "`vfl certs sign`)",
        HandshakeFailure.NO_CLIENT_CERTIFICATE: "configure [tls] certificate and key",
        HandshakeFailure.REJECTED_BY_PEER: "the peer does not trust our certificate: check that "
        "both parties use the same CA and that our certificate has not expired",
        HandshakeFailure.WRONG_PEER_NAME: "the address in [[peers]] reaches a party whose "
        "certificate names someone else; check the address and the peer id",
        HandshakeFailure.UNKNOWN: "see the gRPC log lines above for the TLS error",
    }[failure]
    return HandshakeError(
        f"TLS handshake with {peer} failed: {failure.value}; {advice}", reason=failure
    )
