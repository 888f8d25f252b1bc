"""The Python API of what the ``vfl`` command does at the guest (the CLI calls these).

Each function talks to the caller's own running party service (admin commands over mutual
TLS with the party's own certificate), exactly as ``vfl run``, ``vfl estimate`` and
``vfl score`` do::

    from vfl import api
    job_id = api.submit_job(Path("job.toml"), config=Path("bank.toml"))
    final = api.wait_for_job(job_id, config=Path("bank.toml"))
    api.score(config=Path("bank.toml"), model=job_id, data="new", out=Path("scores.csv"))
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from psi.result import read_result
from vfl.common.jobfile import JobKind, job_kind, read_job_toml
from vfl.config import load_config
from vfl.data.tables import TableSpec, load_table
from vfl.estimate.job import JobEstimate, estimate_job_file
from vfl.estimate.measure import quick_costs
from vfl.fedavg.jobfile import parse_fed_job, with_defaults
from vfl.service.admin import admin_call
from vfl.splitnn.jobfile import load_job_file
from vfl.transfer.jobfile import parse_ftl_job


def submit_job(job: Path, *, config: Path, plaintext: bool = False) -> str:
    """Check the job file here (a split-NN job, or a horizontal one with ``[job] type =
    "horizontal"``), submit it to the guest's service; returns the job id."""
    party = load_config(config)
    raw = read_job_toml(job)
    if job_kind(raw) is JobKind.TRANSFER:
        parsed_ftl = parse_ftl_job(raw, source=str(job))  # fail here, not remotely
        raw.setdefault("job", {})["id"] = parsed_ftl.job.job_id
    elif job_kind(raw) is JobKind.HORIZONTAL:
        raw = with_defaults(raw)
        parse_fed_job(raw, source=str(job), coordinator=party.party.party_id)  # fail here
    else:
        parsed = load_job_file(job, allow_plaintext=plaintext)  # fail here, not remotely
        raw.setdefault("job", {})["id"] = parsed.job.job_id
    reply = admin_call(party, "train", {"job_file": raw, "allow_plaintext": plaintext})
    return str(reply["job_id"])


def wait_for_job(job_id: str, *, config: Path, poll_s: float = 1.0) -> dict[str, Any]:
    """Poll the service until the job is done or failed; returns its last status."""
    party = load_config(config)
    while True:
        status: dict[str, Any] = admin_call(party, "status").get("jobs", {}).get(job_id, {})
        if status.get("state") in ("done", "failed"):
            return status
        time.sleep(poll_s)


def estimate(
    job: Path, *, config: Path, rows: int | None = None, key_bits: int = 2048
) -> JobEstimate:
    """Predicted run time of ``job`` on this machine (``vfl estimate``).

    ``rows``: the aligned rows to assume; default the job's PSI result if it names one, else
    the guest's data rows (an upper bound on the intersection).
    """
    kind = job_kind(read_job_toml(job))
    if kind is not JobKind.SPLIT_NN:
        raise ConfigError(
            f"{job}: vfl estimate models split-NN jobs (docs/protocol.md §4.9); a {kind.value} job "
            "has no cost model yet"
        )
    parsed = load_job_file(job, allow_plaintext=True)
    party = load_config(config)
    if rows is None and parsed.psi_job:
        rows = int(read_result(party.state_dir, parsed.psi_job)[0]["intersection_size"])
    if rows is None:
        if parsed.guest_data not in party.data:
            raise ConfigError(f"{party.source}: no data alias {parsed.guest_data!r}")
        spec = TableSpec(path=party.data[parsed.guest_data], id_column=parsed.id_column)
        rows = len(load_table(spec))
    return estimate_job_file(
        parsed,
        rows=rows,
        costs=quick_costs(key_bits=key_bits),
        cores=os.cpu_count() or 1,
        run_psi=not parsed.psi_job,
    )


def score(
    *,
    config: Path,
    model: str,
    data: str,
    ids: list[str] | None = None,
    out: Path | None = None,
    id_column: str = "id",
    id_type: str = "generic",
    decoys: int = 0,
) -> dict[str, Any]:
    """Online scores of ``ids`` or batch scores of every row of ``data`` into ``out``."""
    if (ids is None) == (out is None):
        raise ConfigError("score either ids (online) or every row into out (batch)")
    request: dict[str, Any] = {
        "model": model,
        "data": data,
        "id_column": id_column,
        "id_type": id_type,
    }
    if ids is not None:
        request.update(ids=ids, decoys=decoys)
    else:
        request["out"] = str(Path(str(out)).resolve())
    return admin_call(load_config(config), "score", request, timeout=3600)
