"""Split-NN jobs inside the party services (guest drives, host follows, arbiter decrypts).

Roles: the arbiter's service holds the Paillier key pair (made at its first start and kept
owner-only in its state folder) and answers key requests, JOB_SPEC registrations, RESUME
and masked decryptions under the job's policy. The guest's operator submits a job to the
guest's own service (admin command ``train``); the guest runs PSI if needed, then the
session of :mod:`vfl.splitnn.session`. The host's service answers ``JOB_START`` for one of
its own data aliases and the PSI result it holds, and refuses anything else.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from protocols.crypto.arbiter import ArbiterService
from protocols.crypto.paillier import PrivateKey, PublicKey, generate_keypair
from protocols.envelope import Envelope
from protocols.errors import ConfigError, CryptoError, DataError
from protocols.executor import Executor, LocalProcessExecutor
from protocols.files import atomic_write
from protocols.roles import Party, Role
from protocols.transport.base import Channel, MessageFilter
from psi.result import read_result
from vfl.config import PartyConfig
from vfl.data.tables import PartyTable, TableSpec, load_table, split_rows
from vfl.splitnn.jobfile import TrainJobFile, parse_job
from vfl.splitnn.session import (
    GuestSession,
    HostSession,
    JobTag,
    Progress,
    serve_decryptions,
)

logger = logging.getLogger(__name__)

KEY_FILE = "arbiter_key.json"


def arbiter_key(
    state_dir: Path, *, bits: int, allow_test_key: bool
) -> tuple[PublicKey, PrivateKey]:
    """The arbiter's key pair: loaded from its state folder, or made and saved (0600) once."""
    path = state_dir / KEY_FILE
    if path.is_file():
        if path.stat().st_mode & 0o077:
            logger.warning("%s is readable by others; chmod 600 it", path)
        try:
            obj = json.loads(path.read_text())
            public = PublicKey.from_json(obj["public"], allow_test_key=allow_test_key)
            return public, PrivateKey(public=public, p=int(obj["p"], 16), q=int(obj["q"], 16))
        except (OSError, ValueError, KeyError, TypeError, CryptoError) as exc:
            raise DataError(
                f"the arbiter's key file {path} is unreadable ({type(exc).__name__}); restore it "
                "from backup (running jobs need this key), or move it away to make a new key"
            ) from None
    started = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, private = generate_keypair(bits=bits, allow_test_key=allow_test_key)
    body = {
        "public": public.to_json(),
        "p": format(int(private.p), "x"),
        "q": format(int(private.q), "x"),
    }
    atomic_write(path, json.dumps(body).encode(), mode=0o600)
    logger.info(
        "made a %d-bit Paillier key (id %s) in %.1f s",
        bits,
        public.key_id.hex()[:16],
        time.monotonic() - started,
    )
    return public, private


def serve_arbiter(config: PartyConfig, channel: Channel, executor: Executor) -> ArbiterService:
    """Start answering key, setup and decryption requests."""
    public, private = arbiter_key(
        config.state_dir, bits=config.key_bits, allow_test_key=config.allow_test_key
    )
    return serve_decryptions(
        channel=channel, public_key=public, private_key=private, executor=executor
    )


def _peer_with_role(config: PartyConfig, role: Role) -> Party:
    found = [p.party for p in config.peers if p.party.role is role]
    if len(found) != 1:
        raise ConfigError(
            f"{config.source}: needs exactly one [[peers]] entry with role {role.value}"
        )
    return found[0]


def _aligned_table(
    config: PartyConfig, request: dict[str, Any], *, labels: str | None
) -> PartyTable:
    """This party's rows for the job, in the PSI's shared order."""
    alias = str(request.get("data", ""))
    if alias not in config.data:
        known = ", ".join(sorted(config.data)) or "none"
        raise ConfigError(f"{config.party.party_id} has no data alias {alias!r} (aliases: {known})")
    spec = TableSpec(
        path=config.data[alias], id_column=str(request.get("id_column", "id")), label_column=labels
    )
    table = load_table(spec)
    psi_job = str(request.get("psi_job", ""))
    _, rows = read_result(config.state_dir, psi_job)
    if rows is None:
        raise ConfigError(
            f"PSI {psi_job} at {config.party.party_id} kept no rows (cardinality mode?)"
        )
    return table.take(rows)


class JobRunner:
    """The service's split-NN jobs: started, tracked for ``status``, one thread each."""

    def __init__(
        self,
        *,
        config: PartyConfig,
        channel: Channel,
        executor: Executor,
        run_psi: Any,
    ) -> None:
        self.config, self.channel, self.executor = config, channel, executor
        self.run_psi = run_psi
        self._lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}
        self._background: LocalProcessExecutor | None = None
        if config.party.role is Role.HOST:
            channel.add_handler(MessageFilter.for_tags(JobTag.JOB_START), self._on_job_start)

    def background(self) -> LocalProcessExecutor:
        """Low-priority workers that fill obfuscator pools with otherwise idle CPU time."""
        with self._lock:
            if self._background is None:
                self._background = LocalProcessExecutor(nice=10)
            return self._background

    def close(self) -> None:
        """Stop the background workers."""
        with self._lock:
            if self._background is not None:
                self._background.close()

    def status(self) -> dict[str, Any]:
        """Progress of every job this service ran since it started."""
        with self._lock:
            return {job_id: dict(state) for job_id, state in self.jobs.items()}

    def _update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            self.jobs.setdefault(job_id, {}).update(fields)

    # -- guest -----------------------------------------------------------------------

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Admin ``train``: validate the job now, run it in the background."""
        if self.config.party.role is not Role.GUEST:
            raise ConfigError("only the guest (label holder) submits training jobs")
        job_file = parse_job(
            dict(request.get("job_file", {})),
            source="train request",
            allow_plaintext=bool(request.get("allow_plaintext", False)),
        )
        if job_file.guest_data not in self.config.data:
            known = ", ".join(sorted(self.config.data)) or "none"
            raise ConfigError(f"no data alias {job_file.guest_data!r} here (aliases: {known})")
        job_id = job_file.job.job_id
        with self._lock:
            if self.jobs.get(job_id, {}).get("state") == "running":
                raise ConfigError(f"job {job_id} is already running")
            self.jobs[job_id] = {"state": "running", "phase": "starting", "started": time.time()}
        threading.Thread(
            target=self._guest_job, args=(job_file,), name=f"job-{job_id}", daemon=True
        ).start()
        return {"job_id": job_id, "state": "running"}

    def _guest_job(self, job_file: TrainJobFile) -> None:
        job_id = job_file.job.job_id
        try:
            psi_job = job_file.psi_job
            if not psi_job:
                self._update(job_id, phase="psi")
                psi_job = f"{job_id}.psi"
                self.run_psi(
                    {
                        "peer": _peer_with_role(self.config, Role.HOST).party_id,
                        "data": job_file.guest_data,
                        "host_data": job_file.host_data,
                        "id_column": job_file.id_column,
                        "job_id": psi_job,
                    }
                )
            request = {
                "data": job_file.guest_data,
                "id_column": job_file.id_column,
                "psi_job": psi_job,
            }
            table = _aligned_table(self.config, request, labels=job_file.label_column)
            if table.labels is None:
                raise ConfigError(f"data {job_file.guest_data!r} has no label column")
            splits = split_rows(
                table.labels,
                test_fraction=job_file.test_fraction,
                validation_fraction=job_file.validation_fraction,
                seed=job_file.split_seed,
            )
            self._update(job_id, phase="training", rows=len(table))
            session = GuestSession(
                channel=self.channel,
                host=_peer_with_role(self.config, Role.HOST),
                arbiter=_peer_with_role(self.config, Role.ARBITER),
                job=job_file.job,
                table=table,
                splits=splits,
                executor=self.executor,
                state_dir=self.config.state_dir,
                impute=job_file.impute,
                allow_test_key=self.config.allow_test_key,
                progress=lambda p: self._on_progress(p),
                pool_executor=self.background(),
                host_request={
                    "data": job_file.host_data,
                    "id_column": job_file.id_column,
                    "psi_job": psi_job,
                },
            )
            result = session.run()
            self._update(
                job_id,
                state="done",
                phase="done",
                test=result.test,
                best_epoch=result.best_epoch,
                result=str(session.job_dir / "result.json"),
            )
        except Exception as exc:  # noqa: BLE001 - reported through status
            logger.error("job %s failed: %s", job_id, exc)
            logger.debug("%s", traceback.format_exc())
            self._update(job_id, state="failed", error=f"{type(exc).__name__}: {exc}"[:500])

    def _on_progress(self, p: Progress) -> None:
        fields: dict[str, Any] = {
            "epoch": p.epoch + 1,
            "epochs": p.epochs,
            "step": p.step,
            "total_steps": p.total_steps,
        }
        if p.validation is None:
            fields.update(rows_per_s=round(p.rows_per_s, 1), eta_s=round(p.eta_s), loss=p.loss)
        else:
            fields["validation"] = {k: round(v, 5) for k, v in p.validation.items()}
        self._update(p.job_id, **fields)

    # -- host ------------------------------------------------------------------------

    def _on_job_start(self, envelope: Envelope) -> None:
        job_id = envelope.job_id
        self._update(job_id, state="running", phase="training", started=time.time())
        session = HostSession(
            channel=self.channel,
            guest=envelope.sender,
            arbiter=_peer_with_role(self.config, Role.ARBITER),
            table_for=lambda request: _aligned_table(self.config, request, labels=None),
            executor=self.executor,
            state_dir=self.config.state_dir,
            allow_test_key=self.config.allow_test_key,
            pool_executor=self.background(),
        )
        try:
            session.run(envelope)
            self._update(job_id, state="done", phase="done")
        except Exception as exc:  # noqa: BLE001 - reported through status and the log
            logger.error("job %s failed at the host: %s", job_id, exc)
            self._update(job_id, state="failed", error=f"{type(exc).__name__}: {exc}"[:500])
