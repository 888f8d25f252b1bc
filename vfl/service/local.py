"""Several party services as local processes on one machine (demo, tests, benchmarks).

1. :func:`start_services` runs ``vfl serve --config ...`` per party, logging to a file each;
2. :func:`connect_services` waits until each reports SERVING on the gRPC health service,
   then tells each where the others listen (they may have bound port 0);
3. :func:`stop_services` sends SIGTERM (graceful shutdown) and collects exit codes;
4. :func:`reconnect_service` re-links one service that was restarted;
5. :class:`LocalCluster` holds all of that for one set of configs: start, signal and
   restart a party, follow a job at the guest, read a party's audit log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfl.config import PartyConfig, load_config
from vfl.service.admin import admin_call, service_address, wait_healthy
from vfl.service.audit import AUDIT_FILE, read_audit
from vfl.service.guestjob import OUTCOME_FILE

Processes = dict[str, "subprocess.Popen[bytes]"]


def start_services(configs: Mapping[str, PartyConfig], *, logs: Path) -> Processes:
    """Start one service process per config; output goes to ``logs/<party id>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: Processes = {}
    for pid, cfg in configs.items():
        with (logs / f"{pid}.log").open("ab") as log:
            procs[pid] = subprocess.Popen(
                [sys.executable, "-m", "vfl", "serve", "--config", str(cfg.source)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
    return procs


def connect_services(configs: Mapping[str, PartyConfig], *, timeout: float = 60.0) -> None:
    """Wait for SERVING, then give each service the addresses of the others it knows."""
    for cfg in configs.values():
        wait_healthy(cfg, timeout=timeout)
    for cfg in configs.values():
        _tell_peer_addresses(cfg, configs)


def _tell_peer_addresses(cfg: PartyConfig, configs: Mapping[str, PartyConfig]) -> None:
    """Tell ``cfg``'s service where each of its peers among ``configs`` listens."""
    for peer in cfg.peers:
        other = configs.get(peer.party.party_id)
        if other is not None:
            admin_call(
                cfg,
                "set_peer_address",
                {"peer": peer.party.party_id, "address": service_address(other)},
            )


def reconnect_service(
    configs: Mapping[str, PartyConfig], party_id: str, *, timeout: float = 60.0
) -> None:
    """After ``party_id``'s service restarted (perhaps on another port): wait for SERVING,
    tell it where its peers listen, then tell them where it listens now. Other addresses
    are left alone (replacing a peer's client cuts the sends in flight to it)."""
    cfg = configs[party_id]
    wait_healthy(cfg, timeout=timeout)
    _tell_peer_addresses(cfg, configs)
    for other in configs.values():
        if other is not cfg and any(p.party.party_id == party_id for p in other.peers):
            admin_call(
                other, "set_peer_address", {"peer": party_id, "address": service_address(cfg)}
            )


def stop_services(
    procs: Mapping[str, subprocess.Popen[bytes]], *, timeout: float = 30.0
) -> dict[str, int]:
    """SIGTERM every service; return exit codes (a service still running is killed)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = {}
    deadline = time.monotonic() + timeout
    for pid, proc in procs.items():
        try:
            codes[pid] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[pid] = proc.wait()
    return codes


@dataclass
class LocalCluster:
    """Party services running as local processes, and where each keeps its state and log.

    Deadlines here are generous (a loaded machine starts a service in tens of seconds):
    they only bound how long a broken run takes to report itself.
    """

    root: Path
    paths: dict[str, Path]
    configs: dict[str, PartyConfig]
    procs: Processes
    guest: str = "bank"

    @classmethod
    def launch(
        cls, paths: Mapping[str, Path], *, root: Path, timeout: float = 300.0
    ) -> LocalCluster:
        """Start one service per config under ``paths`` (logs in ``root/logs``) and link
        them; if they do not all come up, stop those that did."""
        configs = {pid: load_config(path) for pid, path in paths.items()}
        procs = start_services(configs, logs=root / "logs")
        try:
            connect_services(configs, timeout=timeout)
        except BaseException:
            stop_services(procs)
            raise
        return cls(root=root, paths=dict(paths), configs=configs, procs=procs)

    @property
    def logs(self) -> Path:
        """The folder of the services' log files (``<party id>.log``)."""
        return self.root / "logs"

    def log(self, party: str) -> str:
        """Everything ``party``'s services logged so far (restarts append)."""
        return (self.logs / f"{party}.log").read_text(errors="replace")

    def audit(self, party: str) -> list[dict[str, Any]]:
        """``party``'s audit records, oldest first."""
        return read_audit(self.configs[party].state_dir / AUDIT_FILE)

    def status(self, party: str | None = None) -> dict[str, Any]:
        """Admin ``status`` of ``party`` (default: the guest)."""
        return admin_call(self.configs[party or self.guest], "status")

    def job(self, job_id: str) -> dict[str, Any]:
        """The guest's status of ``job_id``; if its service started again since the job
        ended, the outcome it recorded (empty if it knows neither)."""
        state: dict[str, Any] = self.status()["jobs"].get(job_id, {})
        if state:
            return state
        outcome = self.configs[self.guest].state_dir / "jobs" / job_id / OUTCOME_FILE
        try:
            recorded: dict[str, Any] = json.loads(outcome.read_text())
        except (OSError, ValueError):
            return {}
        return recorded

    def wait(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool],
        *,
        timeout: float,
        every: float = 0.2,
    ) -> dict[str, Any]:
        """Poll the guest's status of ``job_id`` until ``until`` holds or the job failed;
        ``AssertionError`` after ``timeout`` s."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            state = self.job(job_id)
            if until(state) or state.get("state") == "failed":
                return state
            time.sleep(every)
        raise AssertionError(f"job {job_id} still {self.job(job_id)} after {timeout} s")

    def signal(self, party: str, how: signal.Signals, *, timeout: float = 120.0) -> int:
        """Send ``how`` to ``party``'s service and return its exit code."""
        proc = self.procs[party]
        proc.send_signal(how)
        return proc.wait(timeout=timeout)

    def restart(self, party: str, *, timeout: float = 300.0) -> None:
        """Start ``party``'s service again (same config) and re-link it with the others."""
        self.procs.update(start_services({party: self.configs[party]}, logs=self.logs))
        reconnect_service(self.configs, party, timeout=timeout)

    def stop(self, *, timeout: float = 120.0) -> dict[str, int]:
        """SIGTERM every service; their exit codes."""
        return stop_services(self.procs, timeout=timeout)
