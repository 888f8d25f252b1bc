"""A client for a party's own running service: what the ``vfl`` command does, in Python.

Every call is an admin command to the caller's own service over mutual TLS with the
party's own certificate (the same config file the service runs with), exactly as
``vfl run``, ``vfl status``, ``vfl cancel``, ``vfl estimate`` and ``vfl score`` do::

    from vfl.client import Client

    client = Client(config=Path("bank.toml"))
    job_id = client.submit(job=Path("job.toml"))
    final = client.wait(job_id)
    client.score(model=job_id, data="new", out=Path("scores.csv"))

A job file is parsed here, once, by the driver of its kind (so a mistake is reported before
anything is sent), and submitted as its canonical JSON; the service parses that back into
an equal typed job (:class:`vfl.common.jobfile.TypedJob`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from psi.result import read_result
from vfl.common.jobfile import JobKind, TypedJob
from vfl.config import PartyConfig, load_config
from vfl.data.tables import TableSpec, load_table
from vfl.estimate.job import JobEstimate, estimate_job_file
from vfl.estimate.measure import quick_costs
from vfl.service.admin import admin_call
from vfl.service.drivers import load_job
from vfl.service.requests import AdminCommand, TrainRequest

FINAL_STATES = frozenset({"done", "failed"})
"""The states of a guest's job that do not change any more."""


class Client:
    """The operator's handle on its party's running service.

    Parameters
    ----------
    config
        The party's config file (or the parsed config): where its service listens and the
        certificate it accepts admin commands from.
    """

    def __init__(self, *, config: str | Path | PartyConfig) -> None:
        self.config = config if isinstance(config, PartyConfig) else load_config(Path(config))

    def _typed(self, job: str | Path | TypedJob[Any], *, plaintext: bool) -> TypedJob[Any]:
        if isinstance(job, TypedJob):
            return job
        return load_job(Path(job), party_id=self.config.party.party_id, allow_plaintext=plaintext)

    def submit(self, *, job: str | Path | TypedJob[Any], plaintext: bool = False) -> str:
        """Check the job here, submit it to the guest's service; returns the job id.

        Parameters
        ----------
        job
            A job file of any kind (``[job] type``) or a job parsed already.
        plaintext
            Allow a split-NN job with ``plaintext = true`` (experiments only).
        """
        request = TrainRequest(job=self._typed(job, plaintext=plaintext), allow_plaintext=plaintext)
        reply = admin_call(self.config, AdminCommand.TRAIN, request.to_json())
        return str(reply["job_id"])

    def status(self, *, job_id: str | None = None) -> dict[str, Any]:
        """The service's status, or with ``job_id`` that job's (empty if it knows none)."""
        status: dict[str, Any] = admin_call(self.config, AdminCommand.STATUS)
        if job_id is None:
            return status
        job: dict[str, Any] = status.get("jobs", {}).get(job_id, {})
        return job

    def wait(
        self, job_id: str, *, poll_s: float = 1.0, timeout: float | None = None
    ) -> dict[str, Any]:
        """Poll the service until the job is done or failed; returns its last status.

        Raises :class:`TimeoutError` if it is neither after ``timeout`` seconds.
        """
        give_up = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id=job_id)
            if status.get("state") in FINAL_STATES:
                return status
            if give_up is not None and time.monotonic() + poll_s > give_up:
                raise TimeoutError(
                    f"job {job_id} is still {status.get('state', 'unknown')} after {timeout} s"
                )
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop the job's current run and fail it for good (its peers are told); returns
        ``{"job_id", "state"}`` once the run ended (or after 10 s)."""
        return admin_call(self.config, AdminCommand.CANCEL, {"job_id": job_id})

    def estimate(
        self, *, job: str | Path | TypedJob[Any], rows: int | None = None, key_bits: int = 2048
    ) -> JobEstimate:
        """Predicted run time of a split-NN job on this machine (``vfl estimate``).

        ``rows``: the aligned rows to assume; default the job's PSI result if it names one,
        else the guest's data rows (an upper bound on the intersection).
        """
        typed = self._typed(job, plaintext=True)
        if typed.kind is not JobKind.SPLIT_NN:
            raise ConfigError(
                f"{job}: vfl estimate models split-NN jobs (docs/protocol.md §4.9); a "
                f"{typed.kind.value} job has no cost model yet"
            )
        parsed, party = typed.file, self.config
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
        self,
        *,
        model: str,
        data: str,
        ids: list[str] | None = None,
        out: Path | None = None,
        id_column: str = "id",
        id_type: str = "generic",
        decoys: int = 0,
    ) -> dict[str, Any]:
        """Online scores of ``ids``, or batch scores of every row of ``data`` into ``out``."""
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
        return admin_call(self.config, AdminCommand.SCORE, request, timeout=3600)
