"""Operation counters for the cost audit of docs/protocol.md §4.9 (test S10).

Every heavy operation of the crypto layer is counted once, at the site that dispatches it,
in the process that asks for it (so work farmed out to an executor's worker processes is
still counted here):

1. ``scalar_mults``: small-scalar products ``k ⊙ c`` of :func:`protocols.crypto.tensor.plain_matmul`
   (``m·r·q`` for an ``m×r`` plaintext times an ``r×q`` ciphertext matrix);
2. ``fresh_encryptions``: values encrypted by :func:`protocols.crypto.tensor.encrypt`;
3. ``obfuscations``: values re-randomised by
   :meth:`~protocols.crypto.tensor.EncryptedTensor.obfuscate`;
4. ``obfuscators``: ``ρ`` values handed out by
   :meth:`~protocols.crypto.obfuscators.ObfuscatorPool.take` (fresh encryptions + obfuscations);
5. ``decryptions``: values the arbiter's service decrypts (a request answered from its
   reply cache costs none);
6. ``inverses``: ciphertext inversions of :meth:`~protocols.crypto.tensor.EncryptedTensor.sub`.

The registry is process-wide and thread-safe; it only ever grows. Callers take a
:func:`snapshot` before and after the work they audit and subtract. Counting costs one
lock acquisition per tensor operation, not per element.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from enum import StrEnum


class Op(StrEnum):
    """The counted operations (the field names of :class:`OpCounts`)."""

    SCALAR_MULTS = "scalar_mults"
    FRESH_ENCRYPTIONS = "fresh_encryptions"
    OBFUSCATIONS = "obfuscations"
    OBFUSCATORS = "obfuscators"
    DECRYPTIONS = "decryptions"
    INVERSES = "inverses"


@dataclass(frozen=True)
class OpCounts:
    """Counts of each :class:`Op` (a snapshot, or the difference of two)."""

    scalar_mults: int = 0
    fresh_encryptions: int = 0
    obfuscations: int = 0
    obfuscators: int = 0
    decryptions: int = 0
    inverses: int = 0

    def __sub__(self, other: OpCounts) -> OpCounts:
        return OpCounts(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


class OpCounter:
    """A thread-safe tally of :class:`Op` counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(Op, 0)

    def add(self, op: Op, count: int) -> None:
        """Count ``count`` more operations of kind ``op``."""
        with self._lock:
            self._counts[op] += count

    def snapshot(self) -> OpCounts:
        """The counts so far."""
        with self._lock:
            return OpCounts(**{op.value: n for op, n in self._counts.items()})


COUNTER = OpCounter()


def record(op: Op, count: int) -> None:
    """Count ``count`` operations of kind ``op`` in the process-wide registry."""
    COUNTER.add(op, count)


def snapshot() -> OpCounts:
    """The process-wide counts so far."""
    return COUNTER.snapshot()
