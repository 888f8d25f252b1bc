"""Who a job id belongs to at a party that serves guests' jobs (docs/protocol.md §4.4.1).

At a host, job ids are one namespace for every guest and every kind of job (split NN,
FedAvg, transfer): ``jobs/<id>/`` holds a job's run counts, checkpoints and results
whatever its kind. So a job id belongs to the guest and the kind of job that first started
it here: the first ``START`` (split-NN ``JOB_START``) of an id from a guest that this
party's ``[accept]`` admits for that kind claims it, in ``jobs/<id>/owner.json`` (owner-only,
written atomically before any older run is stopped or any state of the job is touched;
never removed by the service, so it survives restarts). From then on a ``START`` of that id
from another guest, or of another kind, is refused (:class:`JobIdInUseError`, whose peer
reason names the rule, not the owner) without stopping the owner's run or touching its
checkpoints or status, and only the owner's ``JOB_FAILED`` reaches the driver of its kind
(:meth:`vfl.service.runner.JobRunner`).

A record that cannot be read (damaged, not a file) refuses every ``START`` of its id: whose
job it is cannot be known, so none is taken over; its operator removes it to free the id.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from protocols.errors import JobIdInUseError, VflError
from protocols.files import atomic_write, private_dir
from protocols.ids import state_path
from vfl.config import JobType

OWNER_FILE = "owner.json"
IN_USE = (
    "job id in use here: a job id belongs to the guest and the kind of job that first "
    "started it (choose another id)"
)


@dataclass(frozen=True)
class JobOwner:
    """The guest and the kind of job a job id belongs to."""

    guest: str
    kind: JobType


class JobOwners:
    """The owner records of one party's jobs (``<state_dir>/jobs/<id>/owner.json``).

    Parameters
    ----------
    state_dir
        The party's state folder.
    """

    def __init__(self, *, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._lock = threading.Lock()  # a check and its record are one step

    def owner(self, job_id: str) -> JobOwner | None:
        """Whose job ``job_id`` is (``None``: nobody's yet).

        Raises
        ------
        JobIdInUseError
            The record cannot be read (nobody may take the id over).
        """
        with self._lock:
            return self._read(job_id)

    def claim(self, job_id: str, *, guest: str, kind: JobType, record: bool = True) -> None:
        """Refuse ``guest``'s ``kind`` of job under ``job_id`` unless the id is free or
        theirs; if it is free and ``record``, it is theirs from now on.

        Raises
        ------
        JobIdInUseError
            The id belongs to another guest or kind (or its record cannot be read).
        OSError
            The record cannot be written (nothing was claimed).
        """
        with self._lock:
            owner = self._read(job_id)
            if owner is None:
                if record:
                    body = {"guest": guest, "kind": kind.value}
                    folder = private_dir(state_path(self._state_dir, "jobs", job_id))
                    atomic_write(folder / OWNER_FILE, json.dumps(body).encode(), mode=0o600)
                return
            if owner != JobOwner(guest=guest, kind=kind):
                raise JobIdInUseError(
                    f"job {job_id} belongs to {owner.guest}'s {owner.kind.value} job; "
                    f"{kind.value} START from {guest}",
                    public=IN_USE,
                )

    def _read(self, job_id: str) -> JobOwner | None:
        path = self._state_dir / "jobs" / job_id / OWNER_FILE  # for the message only
        try:
            path = state_path(self._state_dir, "jobs", job_id, OWNER_FILE)
            body = json.loads(path.read_text())
            return JobOwner(guest=str(body["guest"]), kind=JobType(body["kind"]))
        except FileNotFoundError:
            return None
        except (VflError, OSError, ValueError, KeyError, TypeError) as exc:
            raise JobIdInUseError(
                f"job {job_id}'s owner record {path} cannot be read ({exc}); remove it to "
                "free the id",
                public=IN_USE,
            ) from None
