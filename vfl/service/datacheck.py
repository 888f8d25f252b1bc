"""``vfl data check`` for a party's own data, and ``vfl report`` (local files only).

Both read only this party's files: nothing is sent, and a report stays with the party that
wrote it (docs/bring-your-own-data.md).

1. The guest checks what a job would read of its own data (``--job``): the job's guest data
   alias, id column, label column and classes, and its ``[guest]`` features.
2. A host checks one of its aliases (``--alias``) as it would for a guest's job: the id
   column of its ``[psi]`` policy, its own ``[features.<alias>]``, a warning for every binary
   column, and (``--label-column``) a refusal of a column named like a job's label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError, DataError
from vfl.config import PartyConfig
from vfl.data.checks import DataReport, check_table
from vfl.data.features import FeatureSpec
from vfl.data.tables import TableSpec
from vfl.models.split import Task
from vfl.report import REPORT_FILE
from vfl.service.accept import host_id_column
from vfl.splitnn.jobfile import load_job_file

REPORT_FOLDER = "report"  # a split-NN job's report: <state_dir>/jobs/<job id>/report


def check_job_data(*, config: PartyConfig, job: Path) -> DataReport:
    """Step 1: the guest's data as the split-NN job ``job`` would read it."""
    parsed = load_job_file(job, allow_plaintext=True)
    spec = TableSpec(
        path=_alias_path(config, parsed.guest_data),
        id_column=parsed.id_column,
        label_column=parsed.label_column,
        features=parsed.guest_spec(),
        classes=parsed.classes,
        binary_labels=parsed.job.train.task is Task.BINARY and parsed.classes is None,
    )
    return check_table(spec, duplicates=config.psi.for_alias(parsed.guest_data).duplicates)


def check_alias_data(
    *, config: PartyConfig, alias: str, label_column: str | None = None
) -> DataReport:
    """Step 2: a host's alias as a guest's job would have it read."""
    spec = TableSpec(
        path=_alias_path(config, alias),
        id_column=host_id_column(config, {"data": alias}),
        features=config.features.get(alias, FeatureSpec()),
        label_like=label_column,
    )
    return check_table(spec, warn_binary=True, duplicates=config.psi.for_alias(alias).duplicates)


def job_report(*, config: PartyConfig, job_id: str) -> tuple[Path, dict[str, Any]]:
    """Where a finished job's report is, and its ``report.json``."""
    folder = config.state_dir / "jobs" / job_id / REPORT_FOLDER
    path = folder / REPORT_FILE
    if not path.is_file():
        raise DataError(
            f"no report for job {job_id!r} in {folder}: the job has not finished here, or it "
            "is not a binary split-NN job of this party (see `vfl status`)"
        )
    body: dict[str, Any] = json.loads(path.read_text())
    return folder, body


def _alias_path(config: PartyConfig, alias: str) -> Path:
    if alias not in config.data:
        known = ", ".join(sorted(config.data)) or "none"
        raise ConfigError(f"{config.source}: no data alias {alias!r} (aliases: {known})")
    return config.data[alias]
