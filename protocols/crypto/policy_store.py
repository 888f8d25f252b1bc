"""Where the arbiter keeps its decryption policy across restarts (P9 of
:mod:`protocols.crypto.policy`, docs/protocol.md §2.6).

Roles: the arbiter A only; its state folder is its own (owner-only files in a 0700 folder).
Nothing here is ever read from another party.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from protocols.crypto.policy import JobPolicy, ModelRecord
from protocols.errors import ConfigError, NoSpaceError
from protocols.files import atomic_write, cut_torn_tail, is_no_space, no_space_error

logger = logging.getLogger(__name__)


class PolicyStore:
    """Where A keeps its policy state across restarts (P9), owner-only.

    ``<folder>/jobs/<h>.json`` (a registration, written once, atomically) and
    ``<folder>/jobs/<h>.log`` (its journal: one JSON line per served request, resume and
    close, flushed and fsynced before the reply leaves), where ``h`` is the SHA-256 of the
    job id (so no id ever becomes a path); ``<folder>/models.json`` (the model registry).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "jobs").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)

    def _name(self, job_id: str) -> Path:
        return self.folder / "jobs" / hashlib.sha256(job_id.encode()).hexdigest()[:40]

    def _full(self, exc: OSError) -> NoSpaceError | OSError:
        """A full folder as :class:`NoSpaceError` (naming it), any other error as it is."""
        if is_no_space(exc):
            return no_space_error(self.folder, exc, what="the arbiter's policy folder")
        return exc

    def save_job(self, policy: JobPolicy) -> None:
        """Write a registration (P1); :class:`NoSpaceError` if the folder is full."""
        path = self._name(policy.job_id).with_suffix(".json")
        try:
            atomic_write(path, json.dumps(policy.to_json()).encode(), mode=0o600)
        except OSError as exc:
            raise self._full(exc) from exc

    def append(self, job_id: str, record: Mapping[str, Any]) -> None:
        """Append one journal record, on disk before this returns; raises ``OSError`` if it
        could not be written whole (:class:`NoSpaceError` if the folder is full; the request
        is then refused: nothing leaves A). A record written in part is cut off again, so
        the journal never holds a torn line between two whole ones."""
        path = self._name(job_id).with_suffix(".log")
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        try:
            cut_torn_tail(path)  # a fragment an earlier failed write could not cut
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise self._full(exc) from exc
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    if written <= 0:
                        raise OSError(f"short write to {path.name}")
                    view = view[written:]
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, size)
                except OSError:  # the torn line is cut when the journal is next read
                    logger.warning("could not cut a torn record off %s", path.name)
                raise self._full(exc) from exc
        finally:
            os.close(fd)

    def jobs(self) -> Iterator[tuple[JobPolicy, list[dict[str, Any]]]]:
        """Every registration with its journal. A torn last line (a write cut short by a
        crash) is cut off the file, so the next record starts on a line of its own; any other
        unreadable line stops A with the file named."""
        for path in sorted((self.folder / "jobs").glob("*.json")):
            try:
                policy = JobPolicy.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path} is unreadable ({type(exc).__name__}); restore the arbiter's "
                    "policy folder from backup (it holds what each job was served)"
                ) from None
            records = []
            log = path.with_suffix(".log")
            if log.is_file():
                data = log.read_bytes()
                whole = data[: data.rfind(b"\n") + 1]
                if len(whole) != len(data):
                    logger.warning("cutting a torn last line off %s", log.name)
                    with log.open("r+b") as handle:
                        handle.truncate(len(whole))
                        os.fsync(handle.fileno())
                for number, line in enumerate(whole.splitlines(), start=1):
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        raise ConfigError(
                            f"{log}, line {number}, is unreadable; restore the arbiter's policy "
                            "folder from backup (it holds what each job was served)"
                        ) from None
            yield policy, records

    def save_models(self, models: Mapping[str, ModelRecord]) -> None:
        """Write the model registry (P7)."""
        body = {m: asdict(r) for m, r in models.items()}
        try:
            atomic_write(self.folder / "models.json", json.dumps(body).encode(), mode=0o600)
        except OSError as exc:
            raise self._full(exc) from exc

    def models(self) -> dict[str, ModelRecord]:
        """The model registry."""
        path = self.folder / "models.json"
        if not path.is_file():
            return {}
        try:
            return {m: ModelRecord(**r) for m, r in json.loads(path.read_text()).items()}
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"{path} is unreadable ({type(exc).__name__}); restore it from backup"
            ) from None
