"""One error hierarchy for the whole engine.

Every error says what was wrong and what to do about it. Callers that expect
built-in exceptions can catch them: :class:`ConfigError` is a ``ValueError``.
"""

from __future__ import annotations

from enum import Enum


class VflError(Exception):
    """Base class of every error raised on purpose by this engine."""


class ConfigError(VflError, ValueError):
    """A configuration file, option or argument is invalid."""


class InsecureConfigError(ConfigError):
    """An insecure setting was requested without its explicit opt-in flag."""


class DataError(VflError, ValueError):
    """An input data file is missing, corrupt or does not match its schema."""


class NoSpaceError(DataError):
    """A party's state folder is full (``ENOSPC``/``EDQUOT``). What needed the space was not
    written (nor half-written); the work stops and goes on once space is freed there."""


class TransportError(VflError):
    """A message could not be delivered between parties."""


class PeerUnavailableError(TransportError):
    """The peer could not be reached within the retry budget."""


class RunAbortedError(TransportError):
    """A run of a job was stopped (its party's service stops, or a newer run replaces it);
    the receive that was waiting for it gives up. The job's checkpoints stay valid."""


class HandshakeFailure(Enum):
    """Why a TLS handshake with a peer failed, as far as the client can tell."""

    UNTRUSTED_CERTIFICATE = "the peer's certificate is not signed by our CA"
    EXPIRED_CERTIFICATE = "a certificate in the handshake has expired or is not yet valid"
    NO_CLIENT_CERTIFICATE = "the server requires a client certificate and none was sent"
    REJECTED_BY_PEER = "the peer refused our certificate (other CA, expired, or revoked)"
    WRONG_PEER_NAME = "the peer's certificate names another party than the one expected"
    UNKNOWN = "the TLS handshake failed"


class HandshakeError(TransportError):
    """The TLS handshake failed; :attr:`reason` says which way."""

    def __init__(self, message: str, *, reason: HandshakeFailure) -> None:
        super().__init__(message)
        self.reason = reason


class PeerIdentityError(TransportError):
    """The peer's certificate does not match the party it claims to be."""


class ProtocolError(VflError):
    """A message violates the protocol (format, order, binding or replay rules)."""


class SecAggError(ProtocolError):
    """Secure aggregation must abort: a key's signature or a key is invalid, or inputs
    to the masking arithmetic are inconsistent (docs/protocol.md §7.1)."""


class UpdateOverflowError(SecAggError, ValueError):
    """A client's weighted update is too large for the sum of all clients to fit in
    ``Z_{2^64}`` (the §7.1 overflow guard, checked by each client on its own values)."""


class MalformedEnvelopeError(ProtocolError):
    """An envelope could not be decoded, or is truncated or inconsistent."""


class OversizedEnvelopeError(ProtocolError):
    """An envelope is larger than the receiver accepts."""


class UnknownTagError(ProtocolError):
    """An envelope carries a tag that no protocol registered."""


class WrongReceiverError(ProtocolError):
    """An envelope is addressed to another party."""


class ReplayConflictError(ProtocolError):
    """A different envelope reuses a sequence number or a logical message key."""


class CryptoError(VflError):
    """A cryptographic check failed."""


class KeyMismatchError(CryptoError):
    """A value was produced under another key than the one in use."""


class AlignmentError(VflError):
    """Sample alignment (PSI) failed or produced an unusable result."""


class InvalidCiphertextError(CryptoError):
    """A received ciphertext is out of range or malformed."""


class EncodingBoundError(CryptoError, ValueError):
    """A value exceeds the bound of the quantity it encodes (checked before encoding)."""


class DecodingOverflowError(CryptoError):
    """A decoded value lies outside its range: an overflow or a broken invariant; abort."""


class PackingOverflowError(DecodingOverflowError):
    """A packed slot overflowed into its neighbour."""


class PolicyViolationError(ProtocolError):
    """The arbiter refused a decryption request (wrong requester, count, step or a repeat)."""


class JobRefusedError(PolicyViolationError):
    """A party refused a job under its own acceptance policy (its ``[accept]`` config).

    Not retried: the message names the party and its reason; change the job or ask that
    party's operator to allow it.
    """


class InvalidPointError(AlignmentError):
    """A received PSI element is not a canonical, distinct Curve25519 point."""
