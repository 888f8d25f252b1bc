"""The transport envelope (docs/protocol.md §2.9) and its only codec.

An :class:`Envelope` carries one logical message between two parties, bound to
``(job_id, run_id, step, tag, sender)``. Its body is one of the typed blocks below;
each keeps its bulk bytes in ``data``. On the wire an envelope is split into a
*header* (the protobuf ``Envelope`` with the block's ``data`` emptied, serialized
deterministically) and a *payload* (the block's ``data``), so a large body is
never copied through protobuf. The *digest* that replay protection compares is
``SHA-256(len(header) || header || payload)``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import numpy as np
from google.protobuf.message import DecodeError

from protocols.errors import MalformedEnvelopeError
from protocols.generated import transport_pb2 as pb
from protocols.ids import check_identifier
from protocols.roles import Party, Role, check_party_id
from protocols.tags import tag_value

_U32 = 2**32
_U64 = 2**64
MAX_HEADER_BYTES = 16 * 1024
"""Largest encoded envelope header (ids, tag, counters, a shape): real ones are < 1 KiB."""
MAX_DIMS = 8
"""Most dimensions of a block's shape (the protocol's blocks have at most 3)."""
MAX_CONTROL_BYTES = 1 << 20
"""Largest control block: parsed JSON takes tens of times its size in memory, so bulk data
travels in the typed blocks, never as JSON."""
MAX_JSON_DEPTH = 32
"""Deepest nesting a control block may have (the protocol's own blocks use at most 4)."""
MAX_JSON_INT_DIGITS = 40
"""Longest integer literal in a control block (2^128 has 39 digits)."""

_ROLE_TO_PB = {Role.GUEST: pb.GUEST, Role.HOST: pb.HOST, Role.ARBITER: pb.ARBITER}
_PB_TO_ROLE: dict[int, Role] = {int(v): k for k, v in _ROLE_TO_PB.items()}


@dataclass(frozen=True)
class Packing:
    """Slot-packing layout of a ciphertext block (§2.7)."""

    slot_bits: int
    slots: int
    axis: int


@dataclass(frozen=True)
class CipherBlock:
    """Paillier ciphertexts, ``|n^2|/8``-byte big-endian each."""

    data: bytes
    shape: tuple[int, ...] = ()
    scale: int = 0
    packing: Packing | None = None


@dataclass(frozen=True)
class PlainBlock:
    """Plaintext residues, ``|n|/8``-byte big-endian each."""

    data: bytes
    shape: tuple[int, ...] = ()
    scale: int = 0


@dataclass(frozen=True)
class PointBlock:
    """32-byte X25519 points."""

    data: bytes


@dataclass(frozen=True)
class IndexBlock:
    """Row indices as little-endian uint32."""

    data: bytes

    @classmethod
    def from_indices(cls, indices: Sequence[int] | np.ndarray) -> IndexBlock:
        """Build a block from non-negative indices below 2^32."""
        arr = np.asarray(indices)
        if arr.size and (arr.min() < 0 or arr.max() >= _U32):
            raise ValueError("indices must lie in [0, 2^32)")
        return cls(arr.astype("<u4").tobytes())

    def indices(self) -> np.ndarray:
        """The indices as a read-only ``uint32`` array."""
        return np.frombuffer(self.data, dtype="<u4")


@dataclass(frozen=True)
class Uint64Block:
    """Values in Z_2^64 (masked updates), little-endian."""

    data: bytes
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class ControlBlock:
    """One JSON object for control messages (job specs, acks). Never pickled."""

    data: bytes

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> ControlBlock:
        """Encode a JSON-serialisable dict."""
        return cls(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

    def obj(self) -> dict[str, Any]:
        """Decode the JSON object."""
        return json_object(self.data, what="control block")


Body: TypeAlias = CipherBlock | PlainBlock | PointBlock | IndexBlock | Uint64Block | ControlBlock
_BODY_TYPES = (CipherBlock, PlainBlock, PointBlock, IndexBlock, Uint64Block, ControlBlock)


@dataclass(frozen=True)
class Envelope:
    """One logical message; see the module docstring.

    ``tag`` takes a registered tag string or a ``StrEnum`` member. ``seq`` 0 means
    "not yet assigned": the channel assigns the next sequence number on send.
    """

    job_id: str
    sender: Party
    receiver: Party
    tag: str
    step: int = 0
    run_id: str = ""
    epoch: int = 0
    batch: int = 0
    seq: int = 0
    key_id: bytes = b""
    body: Body | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tag", tag_value(self.tag))
        check_identifier(self.job_id, what="envelope job_id")
        if self.run_id:
            check_identifier(self.run_id, what="envelope run_id")
        for name, bound in (("step", _U64), ("seq", _U64), ("epoch", _U32), ("batch", _U32)):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < bound:
                raise MalformedEnvelopeError(f"envelope {name}={value!r} is out of range")
        if not isinstance(self.key_id, bytes) or len(self.key_id) > 64:
            raise MalformedEnvelopeError("envelope key_id must be at most 64 bytes")
        if self.body is not None and not isinstance(self.body, _BODY_TYPES):
            raise MalformedEnvelopeError(f"envelope body of type {type(self.body).__name__}")

    @property
    def payload(self) -> bytes:
        """The body's bulk bytes (empty without a body)."""
        return b"" if self.body is None else self.body.data

    @property
    def logical_key(self) -> tuple[str, str, int, str, str]:
        """``(job_id, run_id, step, tag, sender id)``: identifies one logical message."""
        return (self.job_id, self.run_id, self.step, self.tag, self.sender.party_id)

    def with_seq(self, seq: int) -> Envelope:
        """A copy with sequence number ``seq``."""
        return replace(self, seq=seq)

    def describe(self) -> str:
        """A log-safe one-line summary: ids, tag, step and sizes, never values."""
        kind = "-" if self.body is None else type(self.body).__name__
        return (
            f"job={self.job_id} run={self.run_id or '-'} {self.sender.party_id}->"
            f"{self.receiver.party_id} tag={self.tag} step={self.step} seq={self.seq} "
            f"body={kind}[{len(self.payload)} B]"
        )


# ---------------------------------------------------------------------------
# codec


def control_of(envelope: Envelope) -> dict[str, Any]:
    """The JSON object of an envelope that must carry a :class:`ControlBlock`."""
    if not isinstance(envelope.body, ControlBlock):
        raise MalformedEnvelopeError(f"{envelope.describe()} must carry a JSON control block")
    return envelope.body.obj()


def encode(envelope: Envelope) -> tuple[bytes, bytes]:
    """Split ``envelope`` into its wire header and payload."""
    msg = pb.Envelope(
        job_id=envelope.job_id,
        run_id=envelope.run_id,
        sender=_ROLE_TO_PB[envelope.sender.role],
        receiver=_ROLE_TO_PB[envelope.receiver.role],
        tag=envelope.tag,
        step=envelope.step,
        epoch=envelope.epoch,
        batch=envelope.batch,
        seq=envelope.seq,
        key_id=envelope.key_id,
        sender_id=envelope.sender.party_id,
        receiver_id=envelope.receiver.party_id,
    )
    body = envelope.body
    if isinstance(body, CipherBlock):
        msg.cipher.shape.extend(body.shape)
        msg.cipher.scale = body.scale
        if body.packing is not None:
            msg.cipher.packing.slot_bits = body.packing.slot_bits
            msg.cipher.packing.slots = body.packing.slots
            msg.cipher.packing.axis = body.packing.axis
    elif isinstance(body, PlainBlock):
        msg.plain.shape.extend(body.shape)
        msg.plain.scale = body.scale
    elif isinstance(body, PointBlock):
        msg.points.SetInParent()
    elif isinstance(body, IndexBlock):
        msg.index.SetInParent()
    elif isinstance(body, Uint64Block):
        msg.masked_u64.shape.extend(body.shape)
    elif isinstance(body, ControlBlock):
        msg.control.SetInParent()
    return msg.SerializeToString(deterministic=True), envelope.payload


def decode(header: bytes, payload: bytes) -> Envelope:
    """Rebuild an envelope from its wire parts; raise :class:`MalformedEnvelopeError`."""
    if len(header) > MAX_HEADER_BYTES:
        raise MalformedEnvelopeError(
            f"envelope header of {len(header)} B exceeds {MAX_HEADER_BYTES} B"
        )
    msg = pb.Envelope()
    try:
        msg.ParseFromString(header)
    except DecodeError as exc:
        raise MalformedEnvelopeError(f"envelope header does not decode ({len(header)} B)") from exc
    try:
        sender = Party(check_party_id(msg.sender_id, where="sender_id"), _role(msg.sender))
        receiver = Party(check_party_id(msg.receiver_id, where="receiver_id"), _role(msg.receiver))
    except ValueError as exc:
        raise MalformedEnvelopeError(f"envelope addressing is invalid: {exc}") from exc
    kind = msg.WhichOneof("body")
    body: Body | None
    if kind is None:
        if payload:
            raise MalformedEnvelopeError("envelope has a payload but no body")
        body = None
    else:
        block = getattr(msg, kind)
        if block.data:
            raise MalformedEnvelopeError("envelope header carries block data; expected it empty")
        body = _make_body(kind, block, payload)
    return Envelope(
        job_id=msg.job_id,
        run_id=msg.run_id,
        sender=sender,
        receiver=receiver,
        tag=msg.tag,
        step=msg.step,
        epoch=msg.epoch,
        batch=msg.batch,
        seq=msg.seq,
        key_id=msg.key_id,
        body=body,
    )


def mail_key(header: bytes) -> tuple[str, str, str, str, int] | None:
    """The ``(job_id, run_id, sender id, tag, step)`` a header claims, read before the body
    arrives so that the receiver can admit a message it is waiting for (docs/protocol.md
    §2.9.1); ``None`` if the header does not parse. Not validated: :func:`decode` does that.
    """
    msg = pb.Envelope()
    try:
        msg.ParseFromString(header)
    except DecodeError:
        return None
    return (msg.job_id, msg.run_id, msg.sender_id, msg.tag, msg.step)


class EnvelopeDigest:
    """Incremental ``SHA-256(len(header) || header || payload)``."""

    def __init__(self, header: bytes) -> None:
        self._h = hashlib.sha256(len(header).to_bytes(4, "big"))
        self._h.update(header)

    def update(self, chunk: bytes | memoryview) -> None:
        """Add the next payload chunk."""
        self._h.update(chunk)

    def digest(self) -> bytes:
        """The 32-byte digest."""
        return self._h.digest()


def digest(header: bytes, payload: bytes) -> bytes:
    """The replay digest of an encoded envelope."""
    d = EnvelopeDigest(header)
    d.update(payload)
    return d.digest()


def _role(value: int) -> Role:
    try:
        return _PB_TO_ROLE[int(value)]
    except KeyError:
        raise MalformedEnvelopeError(f"envelope role {value} is not a known role") from None


def _shape(
    values: Sequence[int], payload: bytes, *, item: int | None, what: str
) -> tuple[int, ...]:
    if len(values) > MAX_DIMS:
        raise MalformedEnvelopeError(f"{what} has {len(values)} dimensions; at most {MAX_DIMS}")
    shape = tuple(int(v) for v in values)
    count = math.prod(shape) if shape else None
    if count is not None and item is not None and count * item != len(payload):
        raise MalformedEnvelopeError(
            f"{what} of shape {shape} needs {count * item} bytes, got {len(payload)}"
        )
    if count is not None and item is None and (count == 0) != (len(payload) == 0):
        raise MalformedEnvelopeError(f"{what} of shape {shape} has {len(payload)} bytes")
    if count and item is None and len(payload) % count:
        raise MalformedEnvelopeError(
            f"{what} of shape {shape}: {len(payload)} bytes is not a whole number of values"
        )
    return shape


def _make_body(kind: str, block: Any, payload: bytes) -> Body:
    if kind == "cipher":
        packing = None
        if block.HasField("packing"):
            p = block.packing
            packing = Packing(slot_bits=p.slot_bits, slots=p.slots, axis=p.axis)
        shape = _shape(block.shape, payload, item=None, what="cipher block")
        return CipherBlock(data=payload, shape=shape, scale=block.scale, packing=packing)
    if kind == "plain":
        shape = _shape(block.shape, payload, item=None, what="plain block")
        return PlainBlock(data=payload, shape=shape, scale=block.scale)
    if kind == "points":
        if len(payload) % 32:
            raise MalformedEnvelopeError(f"point block of {len(payload)} B is not 32-byte points")
        return PointBlock(payload)
    if kind == "index":
        if len(payload) % 4:
            raise MalformedEnvelopeError(f"index block of {len(payload)} B is not uint32 values")
        return IndexBlock(payload)
    if kind == "masked_u64":
        shape = _shape(block.shape, payload, item=8, what="u64 block")
        if not shape and len(payload) % 8:
            raise MalformedEnvelopeError(f"u64 block of {len(payload)} B is not u64 values")
        return Uint64Block(data=payload, shape=shape)
    if kind == "control":
        json_object(payload, what="control block")
        return ControlBlock(payload)
    raise MalformedEnvelopeError(f"unknown envelope body {kind!r}")  # pragma: no cover


def json_object(data: bytes, *, what: str) -> dict[str, Any]:
    """Parse untrusted JSON that must be an object; every failure is a
    :class:`MalformedEnvelopeError` (never a ``RecursionError`` or a ``ValueError``).

    Refused: more than :data:`MAX_CONTROL_BYTES`, invalid UTF-8 or JSON, ``NaN``/``Infinity``
    and numbers that overflow to them, integers longer than :data:`MAX_JSON_INT_DIGITS`
    digits (and floats beyond ``1e38``, whose ``int()`` would be longer), nesting deeper than
    :data:`MAX_JSON_DEPTH`.
    """
    if len(data) > MAX_CONTROL_BYTES:
        raise MalformedEnvelopeError(f"{what} of {len(data)} B exceeds {MAX_CONTROL_BYTES} B")
    try:
        obj = json.loads(
            data.decode("utf-8"),
            parse_int=_bounded_int,
            parse_float=_bounded_float,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # JSONDecodeError is a ValueError; so are the two refusals below.
        reason = str(exc) if isinstance(exc, _JsonLimitError) else "is not valid UTF-8 JSON"
        raise MalformedEnvelopeError(f"{what} of {len(data)} B {reason}") from None
    if not isinstance(obj, dict):
        raise MalformedEnvelopeError(f"{what} must hold a JSON object")
    if _depth(obj) > MAX_JSON_DEPTH:
        raise MalformedEnvelopeError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


class _JsonLimitError(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _JsonLimitError(f"holds an integer of more than {MAX_JSON_INT_DIGITS} digits")
    return int(text)


def _bounded_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > 1e38:
        raise _JsonLimitError(f"holds a number out of range ({text[:20]})")
    return value


def _no_constant(text: str) -> Any:
    raise _JsonLimitError(f"holds the non-standard constant {text[:10]}")


def _depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value, computed without recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        value, level = todo.pop()
        if isinstance(value, dict):
            deepest = max(deepest, level)
            todo.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            deepest = max(deepest, level)
            todo.extend((v, level + 1) for v in value)
    return deepest
