"""Every kind of work a party service does with its peers, each through one driver.

The one table of drivers (:data:`DRIVERS`, keyed by :class:`vfl.config.JobType`, the kinds a
party's ``[accept]`` policy names): the runner (:mod:`vfl.service.runner`) makes one of
each, with the service's context, and the party service learns the message tags to accept
from it. A job file's kind is decided once, by :func:`vfl.common.jobfile.job_kind`, and the
driver of that kind parses it (:func:`parse_job`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from vfl.common.jobfile import TypedJob, job_kind, read_job_toml
from vfl.config import JobType
from vfl.service.driver import Driver, JobDriver
from vfl.service.drivers.fedavg import FedAvgDriver
from vfl.service.drivers.ftl import FtlDriver
from vfl.service.drivers.psi import PsiDriver
from vfl.service.drivers.scoring import ScoringDriver
from vfl.service.drivers.splitnn import SplitNnDriver

DRIVERS: dict[JobType, type[Driver]] = {
    driver.kind: driver
    for driver in (SplitNnDriver, FedAvgDriver, FtlDriver, PsiDriver, ScoringDriver)
}


def job_driver(raw: dict[str, Any]) -> type[JobDriver[Any]]:
    """The driver of the job file ``raw``'s kind (``[job] type``)."""
    driver = DRIVERS[JobType(job_kind(raw).value)]
    if not issubclass(driver, JobDriver):  # pragma: no cover - every job kind has one
        raise ConfigError(f"no driver runs {job_kind(raw).value} jobs")
    return driver


def parse_job(
    raw: dict[str, Any], *, source: str, party_id: str, allow_plaintext: bool = False
) -> TypedJob[Any]:
    """The job file ``raw`` (TOML or canonical JSON) as a typed job, parsed by the driver of
    its kind; ``party_id`` is the submitting party (``ConfigError`` naming ``source``)."""
    return job_driver(raw).parse(
        raw, source=source, party_id=party_id, allow_plaintext=allow_plaintext
    )


def load_job(path: Path, *, party_id: str, allow_plaintext: bool = False) -> TypedJob[Any]:
    """Read and parse a job file of any kind."""
    return parse_job(
        read_job_toml(path), source=str(path), party_id=party_id, allow_plaintext=allow_plaintext
    )
