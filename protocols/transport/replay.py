"""Replay and ordering rules of docs/protocol.md §2.9, enforced at the receiver.

Per ``(job_id, sender)`` the receiver remembers each ``seq`` with the digest of
its envelope, and per logical key ``(job_id, run_id, step, tag, sender)`` the
digest of the one envelope that used it:

1. a byte-identical repeat (same seq, same digest) is acknowledged and not
   processed again;
2. a different envelope reusing a seq is a :class:`ReplayConflictError`;
3. a second, different envelope for a used logical key is a
   :class:`ReplayConflictError`;
4. seq values may arrive in any order.

The marks are journaled (one JSON line per accepted envelope, appended and
flushed) under the party's state directory, so they survive a restart. The line is
written *before* the mark is recorded: if the write fails (a full disk, no file
descriptor left) nothing is recorded and the sender is told to retry
(:class:`ReceiverBusyError`), so its byte-identical retry is delivered, not taken for a
duplicate. At most :data:`OPEN_JOURNALS` journal files are open at once (least
recently used closed first), so a peer inventing job ids cannot exhaust descriptors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from enum import Enum
from pathlib import Path
from typing import IO

from protocols.envelope import Envelope
from protocols.errors import MalformedEnvelopeError, ReceiverBusyError, ReplayConflictError
from protocols.files import cut_torn_tail

logger = logging.getLogger(__name__)

OPEN_JOURNALS = 16
_SeqKey = tuple[str, str]  # (job_id, sender id)
_LogicalKey = tuple[str, str, int, str, str]


class Verdict(Enum):
    """What the receiver does with an envelope."""

    NEW = "new"
    DUPLICATE = "duplicate"


class ReplayGuard:
    """Remembers ``(job, sender, seq) -> digest`` and logical keys; see module docstring.

    Parameters
    ----------
    journal_dir
        Where to journal marks so they survive a restart; ``None`` keeps them in memory.
    """

    def __init__(self, *, journal_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._seqs: dict[_SeqKey, dict[int, bytes]] = {}
        self._logical: dict[_LogicalKey, bytes] = {}
        self._journal_dir = journal_dir
        self._journals: OrderedDict[str, IO[str]] = OrderedDict()
        if journal_dir is not None:
            journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._load(journal_dir)

    def check(self, envelope: Envelope, digest: bytes) -> Verdict:
        """Apply rules 1-4 to ``envelope`` and record it if it is new."""
        if envelope.seq == 0:
            raise MalformedEnvelopeError(f"envelope has no sequence number: {envelope.describe()}")
        seq_key = (envelope.job_id, envelope.sender.party_id)
        logical = envelope.logical_key
        with self._lock:
            seen = self._seqs.setdefault(seq_key, {})
            known = seen.get(envelope.seq)
            if known is not None:
                if known == digest:  # rule 1
                    return Verdict.DUPLICATE
                raise ReplayConflictError(  # rule 2
                    f"seq {envelope.seq} of job {envelope.job_id} from {envelope.sender.party_id} "
                    f"was already used by a different envelope; refused {envelope.describe()}"
                )
            if logical in self._logical:  # rule 3 (a different seq means a different digest)
                raise ReplayConflictError(
                    f"a different envelope for job {envelope.job_id} step {envelope.step} tag "
                    f"{envelope.tag} from {envelope.sender.party_id} was already received; "
                    f"refused {envelope.describe()}"
                )
            self._journal(envelope, digest)  # first: a failed write records nothing
            seen[envelope.seq] = digest
            self._logical[logical] = digest
        return Verdict.NEW

    def forget_job(self, job_id: str) -> None:
        """Drop all marks of ``job_id`` (after the job has finished for good)."""
        with self._lock:
            for key in [k for k in self._seqs if k[0] == job_id]:
                del self._seqs[key]
            for lkey in [k for k in self._logical if k[0] == job_id]:
                del self._logical[lkey]
            handle = self._journals.pop(job_id, None)
            if handle is not None:
                handle.close()
            if self._journal_dir is not None:
                self._journal_path(self._journal_dir, job_id).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the journal files."""
        with self._lock:
            for handle in self._journals.values():
                _close_quietly(handle)
            self._journals.clear()

    # -- journal ----------------------------------------------------------

    @staticmethod
    def _journal_path(journal_dir: Path, job_id: str) -> Path:
        name = hashlib.sha256(job_id.encode()).hexdigest()[:32]
        return journal_dir / f"{name}.jsonl"

    def _journal(self, envelope: Envelope, digest: bytes) -> None:
        if self._journal_dir is None:
            return
        try:
            self._append(self._journal_dir, envelope, digest)
        except OSError as exc:
            handle = self._journals.pop(envelope.job_id, None)
            if handle is not None:
                _close_quietly(handle)
            logger.error(
                "cannot journal a replay mark in %s (%s); the envelope is refused as busy and "
                "the sender retries: free space or descriptors there",
                self._journal_dir,
                exc.strerror or exc,
            )
            raise ReceiverBusyError(
                "the receiver cannot record the envelope now (its storage failed); retry later"
            ) from None

    def _append(self, journal_dir: Path, envelope: Envelope, digest: bytes) -> None:
        handle = self._journals.get(envelope.job_id)
        if handle is None:
            while len(self._journals) >= OPEN_JOURNALS:
                _close_quietly(self._journals.popitem(last=False)[1])
            path = self._journal_path(journal_dir, envelope.job_id)
            cut_torn_tail(path)  # an earlier failed append may have left half a line
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            handle = self._journals[envelope.job_id] = os.fdopen(fd, "a", encoding="utf-8")
        else:
            self._journals.move_to_end(envelope.job_id)
        record = {
            "job": envelope.job_id,
            "run": envelope.run_id,
            "sender": envelope.sender.party_id,
            "seq": envelope.seq,
            "step": envelope.step,
            "tag": envelope.tag,
            "digest": digest.hex(),
        }
        handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        handle.flush()

    def _load(self, journal_dir: Path) -> None:
        count = 0
        for path in sorted(journal_dir.glob("*.jsonl")):
            cut_torn_tail(path)
            with path.open(encoding="utf-8") as handle:
                for lineno, line in enumerate(handle, start=1):
                    try:
                        r = json.loads(line)
                        digest = bytes.fromhex(r["digest"])
                        self._seqs.setdefault((r["job"], r["sender"]), {})[int(r["seq"])] = digest
                        key = (r["job"], r["run"], int(r["step"]), r["tag"], r["sender"])
                        self._logical[key] = digest
                        count += 1
                    except (ValueError, KeyError, TypeError):
                        # A line cut short by a crash while it was being appended.
                        logger.warning(
                            "replay journal %s line %d is incomplete; skipped", path, lineno
                        )
        if count:
            logger.info("restored %d replay marks from %s", count, journal_dir)


def _close_quietly(handle: IO[str]) -> None:
    # OSError: the unflushed part of a failed append; its line is cut on reopen
    with contextlib.suppress(OSError):
        handle.close()
