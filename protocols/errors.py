"""One error hierarchy for the whole engine.

Every error says what was wrong and what to do about it. Callers that expect
built-in exceptions can catch them: :class:`ConfigError` is a ``ValueError``.

Two texts per error (docs/protocol.md §1.5, refusals): the message (``str(exc)``) is for
this party's own log and operator and may name its files, columns, rows and counts; the
text a *peer* may see is :func:`peer_reason`: the error's ``public`` reason where the raiser
gave one (it names the rule that refused, never the party's paths, columns, row numbers
or counts), else a generic reason by kind of error. Everything that answers a peer with a
refusal or a failure sends :func:`peer_reason`, never ``str(exc)``.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar


class VflError(Exception):
    """Base class of every error raised on purpose by this engine.

    Parameters
    ----------
    *args
        The message (for this party's own log), as for :class:`Exception`.
    public
        The reason a peer may be told, if it differs from the generic one of
        :func:`peer_reason`: the rule that refused, never this party's paths, columns,
        row numbers or counts.
    """

    #: whether the message itself is peer-safe by construction (rule-level texts only)
    peer_safe: ClassVar[bool] = False

    def __init__(self, *args: object, public: str | None = None) -> None:
        super().__init__(*args)
        self.public = public


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


class ReceiverBusyError(TransportError):
    """The receiver cannot take an envelope now: its queue for this sender is full, the
    sender has too many calls open, or its state folder cannot be written. Nothing was
    recorded; the sender retries the byte-identical envelope within its retry budget."""


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
    """The arbiter refused a decryption request (wrong requester, count, step or a repeat).

    Its messages are peer-safe by construction: they name the rule, the job's tags, steps
    and its public schedule (docs/protocol.md §2.6), nothing of the refusing party's files.
    """

    peer_safe = True


class JobRefusedError(PolicyViolationError):
    """A party refused a job under its own acceptance policy (its ``[accept]`` or ``[psi]``
    config).

    Not retried: the message names the party and its reason; change the job or ask that
    party's operator to allow it. Raisers that mention anything of their own data (an
    alias list, a file) must give a separate ``public`` reason.
    """


class JobIdInUseError(JobRefusedError):
    """A party refused a job's START because the job id belongs to another job there: to
    another guest, or to another kind of job (docs/protocol.md §4.4.1, "a job id belongs to
    its guest"). Its message, for the refusing party's own log and audit, names the owner;
    its ``public`` reason names the rule only."""


class InvalidPointError(AlignmentError):
    """A received PSI element is not a canonical, distinct Curve25519 point."""


_GENERIC: tuple[tuple[type[BaseException], str], ...] = (
    (DataError, "its data failed a check"),
    (ConfigError, "its configuration does not allow this"),
    (AlignmentError, "the alignment (PSI) failed"),
    (CryptoError, "a cryptographic check failed"),
    (ProtocolError, "a protocol check failed"),
    (TransportError, "a transport failure"),
    (TimeoutError, "a timeout"),
)


def peer_reason(exc: BaseException) -> str:
    """The reason for ``exc`` that a peer may be told (module docstring).

    ``exc.public`` if the raiser gave one; the message itself for error classes whose
    messages are peer-safe by construction (:attr:`VflError.peer_safe`); otherwise a
    generic reason by kind (``"DataError: its data failed a check (details in its own
    log)"``). At most 300 characters.
    """
    if isinstance(exc, VflError):
        if exc.public is not None:
            return exc.public[:300]
        if exc.peer_safe:
            return str(exc)[:300]
    for kind, text in _GENERIC:
        if isinstance(exc, kind):
            return f"{type(exc).__name__}: {text} (details in its own log)"
    return "an internal error (details in its own log)"
