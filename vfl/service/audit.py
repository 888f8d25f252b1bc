"""Each party's append-only job log: ``<state_dir>/audit.jsonl``, one JSON object per line.

Roles: every party keeps its own log of what it was asked to do and did; nothing in it is
sent to anyone. Records hold who, what and which inputs by hash, never values, shares or
keys (a key appears only as its public id).

Fields of every record (``None`` where a party has nothing to say):

* ``time`` (UTC, ISO 8601), ``party``, ``job_id``, ``event`` (:class:`AuditEvent`);
* ``submitter``: who asked (the guest's own operator at the guest, the guest elsewhere);
* ``config_sha256``: SHA-256 of the canonical JSON (sorted keys, no spaces) of the job as
  this party received it (:func:`config_digest`);
* ``input_sha256``: SHA-256 of the data file this party used (:func:`file_digest`);
* ``code_version``: the package version plus the git commit of a source checkout;
* ``key_id``: hex id of the arbiter's Paillier public key;

plus the event's own fields (``reason`` of a refusal or failure, ``counts`` of decryptions
per tag at the arbiter, ``run_id``).

The file is opened with ``O_APPEND`` and created owner-only (0600); each record is one
``write`` followed by ``fsync``, under a lock, so records never interleave and a crash
loses at most the record being written; a record that does not fit (a full disk) is cut
off again, so none is left torn between two whole ones.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import threading
from enum import StrEnum
from pathlib import Path
from typing import Any

from vfl.common.jobfile import canonical_json

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
_PACKAGE = "vfl-engine"


class AuditEvent(StrEnum):
    """What happened to a job at this party."""

    JOB_SUBMITTED = "job_submitted"
    JOB_ACCEPTED = "job_accepted"
    JOB_REFUSED = "job_refused"
    JOB_FINISHED = "job_finished"
    JOB_FAILED = "job_failed"
    JOB_RETRIED = "job_retried"
    JOB_CANCELLED = "job_cancelled"  # by the guest's own operator (admin ``cancel``)
    DECRYPTION_COUNTS = "decryption_counts"
    REQUEST_REFUSED = "request_refused"


def config_digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys, compact separators)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_digest(path: Path, *, chunk: int = 1 << 20) -> str | None:
    """SHA-256 of a file, read in chunks (``None`` if it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _git_commit(root: Path) -> str | None:
    """The commit checked out at ``root`` (read from ``.git``, no subprocess), if any."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head[4:].strip()
        ref_file = git / ref
        if ref_file.is_file():
            return ref_file.read_text().strip() or None
        common = git / "commondir"
        base = (git / common.read_text().strip()) if common.is_file() else git
        if (base / ref).is_file():
            return (base / ref).read_text().strip() or None
        for line in (base / "packed-refs").read_text().splitlines():
            if line.endswith(f" {ref}"):
                return line.split(" ", 1)[0]
    except (OSError, IndexError):
        return None
    return None


@functools.cache
def code_version() -> str:
    """``<package version>`` plus ``+g<commit>`` when running from a git checkout (cached)."""
    try:
        version = importlib.metadata.version(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    commit = _git_commit(Path(__file__).resolve().parents[2])
    return f"{version}+g{commit[:12]}" if commit else version


class AuditLog:
    """Appends records to one party's audit file (thread-safe).

    Parameters
    ----------
    path
        The file (``<state_dir>/audit.jsonl``); created 0600 if missing.
    party
        This party's id, written into every record.
    """

    def __init__(self, path: Path, *, party: str) -> None:
        self.path = path
        self.party = party
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)

    def record(
        self,
        *,
        event: AuditEvent,
        job_id: str,
        submitter: str | None = None,
        config_sha256: str | None = None,
        input_sha256: str | None = None,
        key_id: str | None = None,
        **extra: Any,
    ) -> None:
        """Append one record (see the module docstring for the fields); never raises on I/O
        failure, which is logged instead (an audit problem must not stop a running job)."""
        entry = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "party": self.party,
            "job_id": job_id,
            "event": event.value,
            "submitter": submitter,
            "config_sha256": config_sha256,
            "input_sha256": input_sha256,
            "code_version": code_version(),
            "key_id": key_id or None,
            **extra,
        }
        line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                logger.warning(
                    "audit log %s is closed; %s of %s not recorded", self.path, event.value, job_id
                )
                return
            size = -1
            try:
                size = os.fstat(self._fd).st_size
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                os.fsync(self._fd)
            except OSError as exc:
                if size >= 0:  # cut a record written in part (a full disk): no torn line
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, size)
                logger.error(
                    "audit log %s: cannot append %s of %s: %s", self.path, event.value, job_id, exc
                )

    def close(self) -> None:
        """Close the file (later records are dropped with a warning)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All records of an audit file, oldest first."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
