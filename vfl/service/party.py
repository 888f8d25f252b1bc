"""The party service: one process per party, serving the transport over mutual TLS.

Roles: any (guest, host or arbiter). Each party's service holds only its own key
and certificate; peers are authenticated by their certificates (SAN = party id,
OU = role) and, where configured, by the certificate pinned for them.

What it does now (later capabilities add protocols to this same service):

1. listens on ``[party] listen`` with the standard gRPC health service;
2. answers ``service.PING`` envelopes from peers with ``service.PONG`` carrying
   the SHA-256 of the received body, so the sender can check integrity;
3. as host, answers a guest's PSI ``HELLO`` for one of its own data aliases, on the id
   column and duplicates policy its own ``[psi]`` config names, and writes its result to
   ``<state_dir>/psi/<job_id>/`` (with the alias, column and guest it aligned);
4. runs split-NN jobs (:mod:`vfl.service.jobs`): the arbiter answers key, setup and masked
   decryption requests; the guest runs jobs its operator submits (``train``); the host
   follows a guest's ``JOB_START`` for one of its own data aliases; host and arbiter check
   what a guest asks (PSI too) against their ``[accept]`` policy (:mod:`vfl.service.accept`;
   a PSI also against the host's ``[psi]`` policy, which fixes the columns it uses);
   every party appends its job events to ``<state_dir>/audit.jsonl``; jobs a stop
   interrupted resume when the services start again (lifecycle in :mod:`vfl.service.jobs`);
5. scores new customers after training (:mod:`vfl.service.scoring`): the arbiter keeps
   scoring grants, the host answers scoring sessions, the guest's operator scores;
6. serves its own operator's admin commands (``status``, ``ping``, ``psi``, ``train``,
   ``score``, ``set_peer_address``), authenticated by the party's own certificate;
7. stops gracefully: health turns NOT_SERVING, in-flight calls finish.

Logs carry ids, tags, steps, sizes and timings only, never data values.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import Any

from protocols.arbiter.service import SetupTag
from protocols.envelope import ControlBlock, Envelope, PlainBlock
from protocols.errors import (
    ConfigError,
    MalformedEnvelopeError,
    TransportError,
    VflError,
)
from protocols.executor import Backend, Executor, ExecutorSettings, make_executor
from protocols.files import atomic_write
from protocols.ids import MAX_USER_ID_LENGTH, check_identifier
from protocols.roles import PartyAddress, Role
from protocols.tags import TagRegistry
from protocols.transport.base import MessageFilter
from protocols.transport.grpc_channel import GrpcChannel
from protocols.transport.tls import TlsIdentity
from psi.canon import DuplicatePolicy, IdType
from psi.protocol import PsiMode, PsiOptions, PsiTag, run_guest
from psi.result import write_result
from vfl.config import PartyConfig
from vfl.fedavg.protocol import FedTag
from vfl.scoring.protocol import ScoreTag
from vfl.service.jobs import JobRunner, decrypts_on_ray
from vfl.service.probe import HealthProbe
from vfl.service.psihost import answer_psi, prepare_alias
from vfl.service.scoring import ScoringService
from vfl.splitnn.interactive import SplitTag
from vfl.splitnn.job import JobTag
from vfl.splitnn.spec import DecTag
from vfl.transfer.session import FtlDecTag, FtlTag

logger = logging.getLogger(__name__)

PORT_FILE = "service.port"
MAX_PING_BYTES = 256 << 20


class ServiceTag(StrEnum):
    """Tags of the service's own messages."""

    PING = "service.PING"
    PONG = "service.PONG"


class AdminCommand(StrEnum):
    """Commands the party's own operator may send to its service."""

    STATUS = "status"
    PING = "ping"
    PSI = "psi"
    TRAIN = "train"
    SCORE = "score"
    SET_PEER_ADDRESS = "set_peer_address"
    RELEASE = "release"  # [testing] allow_hold: end a job's hold_at_step


class PartyService:
    """A running party: transport channel, handlers and admin commands."""

    def __init__(self, config: PartyConfig, *, insecure: bool = False) -> None:
        self.config = config
        self.party = config.party
        identity: TlsIdentity | None = None
        if not insecure:
            identity = config.tls.load()
            if identity.party != config.party:
                raise ConfigError(
                    f"{config.source}: [party] is {config.party} but {config.tls.certificate} "
                    f"names {identity.party}"
                )
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tags = TagRegistry(
            [ServiceTag, PsiTag, SetupTag, DecTag, SplitTag, JobTag, ScoreTag, FedTag, FtlTag]
            + [FtlDecTag]
        )
        self.channel = GrpcChannel(
            me=config.party,
            identity=identity,
            tags=tags,
            listen=config.listen,
            peers=tuple(p.address_entry() for p in config.peers),
            journal_dir=config.state_dir / "replay",
            options=config.transport,
            admin=self._admin,
            insecure=insecure,
        )
        self.channel.add_handler(MessageFilter.for_tags(ServiceTag.PING), self._on_ping)
        self.channel.add_handler(MessageFilter.for_tags(PsiTag.HELLO), self._on_psi_hello)
        self._executor: Executor | None = None
        self._executor_lock = threading.Lock()
        self._started = time.time()
        self._stats_lock = threading.Lock()
        self._received: dict[str, int] = {}
        self._stopped = threading.Event()
        self._closing = threading.Event()
        self._probe: HealthProbe | None = None
        self.jobs = JobRunner(
            config=config, channel=self.channel, executor=self.executor(), run_psi=self._admin_psi
        )
        arbiter = None
        if config.party.role is Role.ARBITER:  # with its [accept] policy and audit records
            arbiter = self.jobs.serve_arbiter()
        self.scoring = ScoringService(
            config=config,
            channel=self.channel,
            executor=self.executor(),
            run_psi=self._admin_psi,
            arbiter_service=arbiter,
            pool_executor=self.jobs.background() if config.party.role is Role.HOST else None,
        )

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> int:
        """Start serving; write the bound port to ``<state_dir>/service.port``."""
        port = self.channel.start()
        if self.config.health is not None:
            self._probe = HealthProbe(
                listen=self.config.health,
                ready=lambda: self.channel.serving and not self._closing.is_set(),
            )
            self._probe.start()
        threading.Thread(target=self._prewarm, name="prewarm", daemon=True).start()
        atomic_write(self.config.state_dir / PORT_FILE, f"{port}\n".encode())
        self.jobs.start()  # resubmit / announce jobs a stop interrupted
        logger.info(
            "%s serving on port %d with %d peer(s): %s",
            self.party,
            port,
            len(self.config.peers),
            ", ".join(str(p.party) for p in self.config.peers) or "none",
        )
        return port

    def wait(self) -> None:
        """Block until :meth:`stop` is called."""
        self._stopped.wait()

    def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: NOT_SERVING, finish in-flight calls, close."""
        if self._stopped.is_set():
            return
        logger.info("%s shutting down (grace %.1f s)", self.party, grace)
        if self._probe is not None:
            self._probe.stop()
        self.scoring.close()
        self.jobs.close()  # stops the runs first, so their receives end at once
        self.channel.close(grace)
        with self._executor_lock:
            self._closing.set()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.close()
        (self.config.state_dir / PORT_FILE).unlink(missing_ok=True)
        self._stopped.set()
        logger.info("%s stopped", self.party)

    # -- peer messages --------------------------------------------------------

    def _count(self, tag: str) -> None:
        with self._stats_lock:
            self._received[tag] = self._received.get(tag, 0) + 1

    def _on_ping(self, envelope: Envelope) -> None:
        self._count(envelope.tag)
        body_hash = hashlib.sha256(envelope.payload).hexdigest()
        logger.info(
            "%s: PING from %s job=%s step=%d, %d B; replying PONG",
            self.party.party_id,
            envelope.sender,
            envelope.job_id,
            envelope.step,
            len(envelope.payload),
        )
        self.channel.send(
            Envelope(
                job_id=envelope.job_id,
                sender=self.party,
                receiver=envelope.sender,
                tag=ServiceTag.PONG,
                step=envelope.step,
                body=ControlBlock.from_obj({"bytes": len(envelope.payload), "sha256": body_hash}),
            )
        )

    def ping(self, peer_id: str, *, payload_bytes: int, rounds: int) -> dict[str, Any]:
        """Send ``rounds`` PINGs of ``payload_bytes`` random bytes to a peer; time the PONGs."""
        peer = self.config.peer(peer_id).party
        job_id = f"ping-{uuid.uuid4().hex[:12]}"
        payload = secrets.token_bytes(payload_bytes)
        expected = hashlib.sha256(payload).hexdigest()
        rtts = []
        for step in range(rounds):
            started = time.perf_counter()
            self.channel.send(
                Envelope(
                    job_id=job_id,
                    sender=self.party,
                    receiver=peer,
                    tag=ServiceTag.PING,
                    step=step,
                    body=PlainBlock(payload),
                )
            )
            pong = self.channel.recv(
                job_id=job_id,
                sender=peer,
                tag=ServiceTag.PONG,
                step=step,
                timeout=self.config.transport.deadline(payload_bytes) + 10,
            )
            rtts.append(time.perf_counter() - started)
            self._count(pong.tag)
            if not isinstance(pong.body, ControlBlock) or pong.body.obj().get("sha256") != expected:
                raise MalformedEnvelopeError(f"{peer} returned a PONG that does not match the PING")
        rtts.sort()
        logger.info(
            "%s: %d PING/PONG with %s, %d B each, median %.2f ms",
            self.party.party_id,
            rounds,
            peer,
            payload_bytes,
            1e3 * rtts[len(rtts) // 2],
        )
        return {
            "peer": peer_id,
            "role": peer.role.value,
            "rounds": rounds,
            "bytes": payload_bytes,
            "median_rtt_ms": round(1e3 * rtts[len(rtts) // 2], 3),
            "max_rtt_ms": round(1e3 * rtts[-1], 3),
            "verified": True,
        }

    # -- PSI ----------------------------------------------------------------------

    def _prewarm(self) -> None:
        """Start the worker processes now, so the first PSI or decryption does not wait."""
        try:
            executor = self.executor()
            executor.map(abs, list(range(executor.workers)))
        except Exception:  # noqa: BLE001 - they start on first use instead
            logger.warning("could not start worker processes ahead of use", exc_info=True)

    def executor(self) -> Executor:
        """The party's workers: its local process pool (started on first use) or its actors
        on the silo's Ray cluster (``[executor]``)."""
        with self._executor_lock:
            if self._closing.is_set():
                raise TransportError(f"{self.party} is shutting down")
            if self._executor is None:
                self._executor = make_executor(self._executor_settings())
            return self._executor

    def _executor_settings(self) -> ExecutorSettings:
        """The arbiter decrypts on its Ray cluster only with Ray TLS on (its workers then load
        the key from its key file); otherwise in its own processes."""
        settings = self.config.executor
        if (
            self.party.role is Role.ARBITER
            and settings.backend is Backend.RAY
            and not decrypts_on_ray(self.config)
        ):
            logger.warning(
                "%s: Ray TLS is off (RAY_USE_TLS), so the arbiter decrypts in its own "
                "processes, not on the Ray cluster",
                self.config.source,
            )
            return ExecutorSettings()
        return settings

    def _on_psi_hello(self, envelope: Envelope) -> None:
        """A guest's PSI, under this party's ``[accept]`` and ``[psi]`` policy
        (:mod:`vfl.service.psihost`)."""
        answer_psi(
            config=self.config, channel=self.channel, envelope=envelope, executor=self.executor()
        )

    def _admin_psi(self, data: dict[str, Any]) -> dict[str, Any]:
        """Admin ``psi`` (guest): align this party's alias ``data`` with the host's alias
        ``host_data``. The host decides its own columns and duplicates policy (its ``[psi]``
        config); ``host_id_column``, ``host_duplicates`` and ``host_timestamp_column`` are
        sent only when given, and the host refuses values other than its own."""
        peer = self.config.peer(str(data.get("peer", ""))).party
        id_type = IdType(data.get("id_type", "generic"))
        mode = PsiMode(data.get("mode", "both"))
        pad_to = data.get("pad_to")
        job_id = check_identifier(
            data.get("job_id") or f"psi-{uuid.uuid4().hex[:12]}",
            what="PSI job id",
            error=ConfigError,
        )
        stamp = data.get("timestamp_column")
        ids = prepare_alias(
            self.config,
            str(data.get("data", "")),
            id_type=id_type,
            column=str(data.get("id_column", "id")),
            duplicates=DuplicatePolicy(data.get("duplicates", "error")),
            timestamp_column=str(stamp) if stamp else None,
        )
        host_request: dict[str, Any] = {"data": data.get("host_data", data.get("data"))}
        for key in ("id_column", "duplicates", "timestamp_column"):
            if data.get(f"host_{key}"):
                host_request[key] = data[f"host_{key}"]
        result = run_guest(
            channel=self.channel,
            host=peer,
            job_id=job_id,
            ids=ids,
            executor=self.executor(),
            options=PsiOptions(mode=mode, pad_to=int(pad_to) if pad_to else None),
            request=host_request,
        )
        folder = write_result(self.config.state_dir, job_id, result)
        return {"job_id": job_id, "result_dir": str(folder), **result.summary}

    # -- admin ------------------------------------------------------------------

    def _admin(self, command: str, data: dict[str, Any]) -> dict[str, Any]:
        try:
            cmd = AdminCommand(command)
        except ValueError:
            raise ConfigError(
                f"unknown admin command {command[:40]!r}; one of "
                f"{', '.join(c.value for c in AdminCommand)}"
            ) from None
        logger.log(
            logging.DEBUG if cmd is AdminCommand.STATUS else logging.INFO,
            "%s: admin command %s",
            self.party.party_id,
            cmd.value,
        )
        if cmd is AdminCommand.STATUS:
            return self._status()
        if cmd is AdminCommand.PSI:
            if data.get("job_id"):  # one the operator chose (derived ids may be longer)
                check_identifier(
                    data["job_id"],
                    what="PSI job id",
                    max_length=MAX_USER_ID_LENGTH,
                    error=ConfigError,
                )
            return self._admin_psi(data)
        if cmd is AdminCommand.TRAIN:
            return self.jobs.submit(data)
        if cmd is AdminCommand.RELEASE:
            return self.jobs.release(str(data.get("job_id", ""))[:128])
        if cmd is AdminCommand.SCORE:
            return self.scoring.score(data)
        if cmd is AdminCommand.SET_PEER_ADDRESS:
            peer_cfg = self.config.peer(str(data.get("peer", "")))
            address = str(data.get("address", ""))
            pinned = peer_cfg.address_entry().certificate_pem
            self.channel.add_peer(PartyAddress(peer_cfg.party, address, pinned))
            return {"peer": peer_cfg.party.party_id, "address": address}
        return self._admin_ping(data)

    def _admin_ping(self, data: dict[str, Any]) -> dict[str, Any]:
        peers = data.get("peers") or [p.party.party_id for p in self.config.peers]
        payload_bytes = data.get("bytes", 1024)
        rounds = data.get("rounds", 3)
        most = min(MAX_PING_BYTES, self.config.transport.max_envelope_bytes)
        if not isinstance(payload_bytes, int) or not 0 <= payload_bytes <= most:
            raise ConfigError(
                f"ping bytes must be an integer in [0, {most}] (transport.max_envelope_bytes)"
            )
        if not isinstance(rounds, int) or not 1 <= rounds <= 1000:
            raise ConfigError("ping rounds must be an integer in [1, 1000]")
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise ConfigError("ping peers must be a list of party ids")
        results: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max(1, len(peers))) as pool:
            futures = [
                pool.submit(self.ping, p, payload_bytes=payload_bytes, rounds=rounds) for p in peers
            ]
            for peer_id, future in zip(peers, futures, strict=True):
                try:
                    results.append(future.result())
                except (VflError, TimeoutError) as exc:
                    results.append({"peer": peer_id, "error": f"{type(exc).__name__}: {exc}"})
        return {"party": self.party.party_id, "results": results}

    def _status(self) -> dict[str, Any]:
        with self._stats_lock:
            received = dict(self._received)
        return {
            "party": self.party.party_id,
            "role": self.party.role.value,
            "port": self.channel.port,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self._started, 1),
            "peers": {pid: str(p) for pid, p in self.channel.peers().items()},
            "received": received,
            "data": {
                alias: {"path": str(path), "exists": path.is_file()}
                for alias, path in self.config.data.items()
            },
            "jobs": self.jobs.status(),
        }


def read_port(state_dir: Path) -> int | None:
    """The port a running service wrote to its state folder, if any."""
    try:
        return int((state_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
