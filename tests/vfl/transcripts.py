"""Transcripts for the view tests of docs/protocol.md §8.3: every envelope each party receives.

A transcript is captured by a transport interceptor: channels made with
:func:`recording_channel_class` record, in the wire form the receiver decodes, every
envelope they hand to a receiver's mailbox, together with what the receiver did with it
(accepted, acknowledged as a duplicate, or refused). All parties of a test use such
channels, so each party's transcript is complete.

Recording happens before delivery, so a transcript is in causal order: a reply is never
recorded before the request that caused it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from protocols.envelope import CipherBlock, Envelope, PlainBlock, decode, encode
from protocols.transport.base import DeliveryStatus
from protocols.transport.inmemory import InMemoryChannel


@dataclass
class Received:
    """One envelope as the receiver decoded it, and its fate (``pending`` until known)."""

    envelope: Envelope
    status: str = "pending"


class TranscriptBook:
    """The transcripts of all parties on one network, keyed by receiver id. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, list[Received]] = {}

    def add(self, envelope: Envelope) -> Received:
        """Record ``envelope`` for its receiver; the caller fills in the status."""
        entry = Received(envelope)
        with self._lock:
            self._entries.setdefault(envelope.receiver.party_id, []).append(entry)
        return entry

    def of(self, party_id: str) -> list[Received]:
        """A copy of ``party_id``'s transcript, in arrival order."""
        with self._lock:
            return list(self._entries.get(party_id, []))

    def envelopes(
        self,
        party_id: str,
        *,
        tags: set[str] | None = None,
        sender: str | None = None,
        step: int | None = None,
        status: str | None = "accepted",
    ) -> list[Envelope]:
        """Envelopes ``party_id`` received, filtered by tag, sender id, step and status."""
        return [
            r.envelope
            for r in self.of(party_id)
            if (tags is None or r.envelope.tag in tags)
            and (sender is None or r.envelope.sender.party_id == sender)
            and (step is None or r.envelope.step == step)
            and (status is None or r.status == status)
        ]

    def wait_for(self, party_id: str, count: int, timeout: float = 10.0) -> list[Received]:
        """``party_id``'s transcript once it holds at least ``count`` settled entries."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.of(party_id)
            if len(entries) >= count and all(r.status != "pending" for r in entries):
                return entries
            if time.monotonic() > deadline:
                raise TimeoutError(f"{party_id}'s transcript did not reach {count} entries")
            time.sleep(0.01)


def recording_channel_class(book: TranscriptBook) -> type[InMemoryChannel]:
    """An in-memory channel class whose deliveries are recorded in ``book``."""

    class RecordingChannel(InMemoryChannel):
        def _transmit(self, envelope: Envelope) -> DeliveryStatus:
            entry = book.add(decode(*encode(envelope)))  # exactly what the receiver decodes
            try:
                status = super()._transmit(envelope)
            except Exception:
                entry.status = "refused"
                raise
            entry.status = status.value
            return status

    return RecordingChannel


def cipher_count(envelopes: list[Envelope]) -> int:
    """Ciphertexts carried by ``envelopes`` (the elements of their cipher blocks)."""
    total = 0
    for env in envelopes:
        if isinstance(env.body, CipherBlock):
            size = 1
            for dim in env.body.shape:
                size *= dim
            total += size
    return total


def plain_residues(envelopes: list[Envelope], width: int) -> list[int]:
    """Every plaintext residue (``width`` bytes big-endian) in the plain blocks of ``envelopes``."""
    out: list[int] = []
    for env in envelopes:
        if isinstance(env.body, PlainBlock):
            data = env.body.data
            out.extend(
                int.from_bytes(data[i : i + width], "big") for i in range(0, len(data), width)
            )
    return out
