"""The party service: one process per party, serving the transport over mutual TLS.

Roles: any (guest, host or arbiter). Each party's service holds only its own key
and certificate; peers are authenticated by their certificates (SAN = party id,
OU = role) and, where configured, by the certificate pinned for them.

What it does now (later capabilities add protocols to this same service):

1. listens on ``[party] listen`` with the standard gRPC health service;
2. answers ``service.PING`` envelopes from peers with ``service.PONG`` carrying
   the SHA-256 of the received body, so the sender can check integrity;
3. runs its jobs through the job runner (:mod:`vfl.service.runner`), which knows no kind of
   job: each kind (split NN, FedAvg, FTL, PSI, scoring) is a driver registered once in
   :data:`vfl.service.drivers.DRIVERS`, which answers the peers' messages of its kind and
   adds its admin commands; the arbiter answers key, setup and masked decryption requests
   (:mod:`vfl.service.arbiter`); host and arbiter check what a guest asks against their
   ``[accept]`` policy (:mod:`vfl.service.accept`; a PSI also against the host's ``[psi]``
   policy); every party appends its job events to ``<state_dir>/audit.jsonl``; jobs a stop
   interrupted resume when the services start again;
4. serves its own operator's admin commands (:class:`~vfl.service.requests.AdminCommand`:
   ``status``, ``ping``, ``set_peer_address`` here; ``train``, ``cancel``, ``release`` and
   the drivers' ``psi`` and ``score`` through the runner), authenticated by the party's own
   certificate, each request parsed once into a typed one (:mod:`vfl.service.requests`);
5. stops gracefully: health turns NOT_SERVING, in-flight calls finish.

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

from protocols.envelope import ControlBlock, Envelope, PlainBlock
from protocols.errors import (
    ConfigError,
    MalformedEnvelopeError,
    TransportError,
    VflError,
)
from protocols.executor import Backend, Executor, ExecutorSettings, make_executor
from protocols.files import atomic_write
from protocols.link import JobLink
from protocols.roles import PartyAddress, Role
from protocols.tags import TagRegistry
from protocols.transport.base import MessageFilter
from protocols.transport.grpc_channel import GrpcChannel
from protocols.transport.tls import TlsIdentity
from vfl.config import PartyConfig
from vfl.service.arbiter import decrypts_on_ray
from vfl.service.driver import AdminHandler
from vfl.service.probe import HealthProbe
from vfl.service.requests import AdminCommand, PeerAddressRequest, PingRequest
from vfl.service.runner import JobRunner, message_tags

logger = logging.getLogger(__name__)

PORT_FILE = "service.port"


class ServiceTag(StrEnum):
    """Tags of the service's own messages."""

    PING = "service.PING"
    PONG = "service.PONG"


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
        self.channel = GrpcChannel(
            me=config.party,
            identity=identity,
            tags=TagRegistry([ServiceTag, *message_tags()]),
            listen=config.listen,
            peers=tuple(p.address_entry() for p in config.peers),
            journal_dir=config.state_dir / "replay",
            options=config.transport,
            admin=self._admin,
            insecure=insecure,
        )
        self.channel.add_handler(MessageFilter.for_tags(ServiceTag.PING), self._on_ping)
        self._executor: Executor | None = None
        self._executor_lock = threading.Lock()
        self._started = time.time()
        self._stats_lock = threading.Lock()
        self._received: dict[str, int] = {}
        self._stopped = threading.Event()
        self._closing = threading.Event()
        self._probe: HealthProbe | None = None
        self.jobs = JobRunner(config=config, channel=self.channel, executor=self.executor())
        self._commands: dict[AdminCommand, AdminHandler] = {
            AdminCommand.STATUS: lambda data: self._status(),
            AdminCommand.PING: self._admin_ping,
            AdminCommand.SET_PEER_ADDRESS: self._set_peer_address,
            **self.jobs.commands(),
        }

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
        """Block until :meth:`stop` is called (waking each second, so that a signal's handler
        runs at once in the main thread whatever the lock wait does)."""
        while not self._stopped.wait(1.0):
            pass

    def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: NOT_SERVING, finish in-flight calls, close."""
        if self._stopped.is_set():
            return
        logger.info("%s shutting down (grace %.1f s)", self.party, grace)
        if self._probe is not None:
            self._probe.stop()
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
        JobLink.answering(self.channel, envelope).reply(
            envelope, ServiceTag.PONG, {"bytes": len(envelope.payload), "sha256": body_hash}
        )

    def ping(self, peer_id: str, *, payload_bytes: int, rounds: int) -> dict[str, Any]:
        """Send ``rounds`` PINGs of ``payload_bytes`` random bytes to a peer; time the PONGs."""
        peer = self.config.peer(peer_id).party
        link = JobLink(
            channel=self.channel,
            job_id=f"ping-{uuid.uuid4().hex[:12]}",
            timeout=self.config.transport.deadline(payload_bytes) + 10,
        )
        payload = secrets.token_bytes(payload_bytes)
        expected = hashlib.sha256(payload).hexdigest()
        rtts = []
        for step in range(rounds):
            started = time.perf_counter()
            link.send(peer, ServiceTag.PING, step, PlainBlock(payload))
            pong = link.recv(peer, ServiceTag.PONG, step)
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

    # -- workers ------------------------------------------------------------------

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
        return self._commands[cmd](data)

    def _set_peer_address(self, data: dict[str, Any]) -> dict[str, Any]:
        request = PeerAddressRequest.from_json(data)
        peer_cfg = self.config.peer(request.peer)
        pinned = peer_cfg.address_entry().certificate_pem
        self.channel.add_peer(PartyAddress(peer_cfg.party, request.address, pinned))
        return {"peer": peer_cfg.party.party_id, "address": request.address}

    def _admin_ping(self, data: dict[str, Any]) -> dict[str, Any]:
        request = PingRequest.from_json(data, max_bytes=self.config.transport.max_envelope_bytes)
        peers = list(request.peers) or [p.party.party_id for p in self.config.peers]
        results: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max(1, len(peers))) as pool:
            futures = [
                pool.submit(self.ping, p, payload_bytes=request.bytes, rounds=request.rounds)
                for p in peers
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
