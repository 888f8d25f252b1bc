"""Several party services as local processes on one machine (demo, tests, benchmarks).

1. :func:`start_services` runs ``vfl serve --config ...`` per party, logging to a file each;
2. :func:`connect_services` waits until each reports SERVING on the gRPC health service,
   then tells each where the others listen (they may have bound port 0);
3. :func:`stop_services` sends SIGTERM (graceful shutdown) and collects exit codes;
4. :func:`reconnect_service` re-links one service that was restarted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from vfl.config import PartyConfig
from vfl.service.admin import admin_call, service_address, wait_healthy

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
