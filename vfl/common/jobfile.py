"""Reading job files of every kind: TOML, sections, ids, the job's kind and the typed job.

A job file is parsed once, by the driver of its kind (``vfl/service/drivers``), into a
:class:`TypedJob`: the kind's frozen job-file object and its canonical JSON
(:func:`canonical_json`). That JSON is what the guest keeps, audits and hands on; parsing
it again gives an equal typed job.
"""

from __future__ import annotations

import json
import tomllib
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from protocols.errors import ConfigError
from protocols.ids import MAX_USER_ID_LENGTH, check_identifier


def read_job_toml(path: Path) -> dict[str, Any]:
    """A job file's TOML (any kind of job), naming the file if it cannot be read."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


class JobKind(StrEnum):
    """``[job] type`` of a job file."""

    SPLIT_NN = "split_nn"
    HORIZONTAL = "horizontal"  # vfl.fedavg.jobfile
    TRANSFER = "transfer"  # vfl.transfer.jobfile


F = TypeVar("F")


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``: sorted keys, compact separators, ASCII with
    ``\\u`` escapes (the text ``config_sha256`` hashes, docs/protocol.md §4.4.1; every string
    a peer can send, a lone surrogate included, has one)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True)
class TypedJob(Generic[F]):
    """A job file parsed by the driver of its kind.

    Parameters
    ----------
    kind
        The job's kind (:func:`job_kind`, decided once, at parsing).
    file
        The kind's frozen job-file object (``TrainJobFile``, ``FedJobFile``, ``FtlJobFile``).
    job_id
        The job's id (drawn at parsing where the file names none).
    guest_data
        The submitting party's own data alias.
    canonical
        The job file as canonical JSON (:func:`canonical_json`), every value drawn at
        parsing filled in: parsing it again gives an equal typed job.
    """

    kind: JobKind
    file: F
    job_id: str
    guest_data: str
    canonical: str

    def to_json(self) -> dict[str, Any]:
        """The job file as a JSON object (what an admin ``train`` request carries)."""
        obj: dict[str, Any] = json.loads(self.canonical)
        return obj


def job_kind(raw: dict[str, Any]) -> JobKind:
    """The kind of a job file (``split_nn`` when ``[job] type`` is absent)."""
    job = raw.get("job", {})
    kind = job.get("type", "split_nn") if isinstance(job, dict) else "split_nn"
    try:
        return JobKind(kind)
    except ValueError:
        kinds = ", ".join(k.value for k in JobKind)
        raise ConfigError(f"[job] type = {kind!r}: use one of {kinds}") from None


def job_section(raw: dict[str, Any], name: str, source: str, keys: set[str]) -> dict[str, Any]:
    """Section ``[name]`` of a job file (empty if absent), refusing keys outside ``keys``."""
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    bad = set(table) - keys
    if bad:
        raise ConfigError(
            f"{source}: [{name}] has unknown key(s) {sorted(bad)}; known: {sorted(keys)}"
        )
    return table


def job_id_of(job: dict[str, Any], *, prefix: str, source: str) -> str:
    """``[job] id``, or a fresh ``<prefix>-<12 hex digits>`` when absent, checked as an
    identifier a person may choose (:func:`protocols.ids.check_identifier`, at most
    :data:`~protocols.ids.MAX_USER_ID_LENGTH` characters; it names folders in every party's
    state)."""
    value = job.get("id") or f"{prefix}-{uuid.uuid4().hex[:12]}"
    return check_identifier(
        value, what=f"{source}: [job] id", max_length=MAX_USER_ID_LENGTH, error=ConfigError
    )


def psi_job_of(job: dict[str, Any], *, source: str) -> str:
    """``[job] psi_job``: empty (run PSI first) or an earlier PSI's job id (an identifier)."""
    value = job.get("psi_job", "")
    if value == "":
        return ""
    return check_identifier(
        value, what=f"{source}: [job] psi_job", max_length=MAX_USER_ID_LENGTH, error=ConfigError
    )
