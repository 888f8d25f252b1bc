"""A Ray cluster of local processes: one head and worker nodes on this machine.

For the tests, the scale-out benchmark and a silo operator's first try. A real silo starts
the same processes with ``ray start`` on each of its machines (docs/deployment.md, "Scale out
inside a silo"): this class runs exactly those commands, with ``--block`` so that stopping it stops
only the nodes it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from protocols.errors import ConfigError
from protocols.ray_executor import INLINE_BYTES, INLINE_ENV, connect, import_ray

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRayCluster:
    """``ray start --head`` plus ``ray start --address`` per worker node, as child processes.

    Parameters
    ----------
    node_cpus
        CPUs of the head, then of each worker node (``(1, 1)``: a head and one worker node).
    worker_niceness
        Nice value of the nodes' worker processes (Ray's default is 15, which on a machine
        shared with other work gives the cluster only leftover CPU time).
    """

    def __init__(self, *, node_cpus: Sequence[int] = (2,), worker_niceness: int = 0) -> None:
        if not node_cpus or min(node_cpus) < 0:
            raise ConfigError("a local Ray cluster needs a head and non-negative CPU counts")
        import_ray()
        self.node_cpus = tuple(node_cpus)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._ray_bin = str(Path(sys.executable).with_name("ray"))
        self._env = {
            **os.environ,
            "RAY_worker_niceness": str(worker_niceness),
            INLINE_ENV: os.environ.get(INLINE_ENV, str(INLINE_BYTES)),
        }
        self._nodes: list[subprocess.Popen[bytes]] = []

    def _start_node(self, *args: str, cpus: int) -> None:
        self._nodes.append(
            subprocess.Popen(
                [self._ray_bin, "start", *args, f"--num-cpus={cpus}", "--block"]
                + ["--disable-usage-stats"],
                env=self._env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def start(self, *, timeout: float = 120.0) -> str:
        """Start every node; return the head's address once all CPUs have joined."""
        head, *workers = self.node_cpus
        self._start_node("--head", f"--port={self.port}", "--include-dashboard=false", cpus=head)
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            self._check_alive(deadline)
            time.sleep(0.2)
        for cpus in workers:
            self._start_node(f"--address={self.address}", cpus=cpus)
        ray = connect(self.address, allow_plaintext_cluster=True)  # local processes only
        while ray.cluster_resources().get("CPU", 0) < sum(self.node_cpus):
            self._check_alive(deadline)
            time.sleep(0.2)
        return self.address

    def _check_alive(self, deadline: float) -> None:
        if any(node.poll() is not None for node in self._nodes) or time.monotonic() > deadline:
            self.stop()
            raise ConfigError(
                "the local Ray cluster did not start; run `ray start --head` by hand to see why"
            )

    def stop(self) -> None:
        """Stop the nodes this object started (and disconnect this process from them)."""
        ray = import_ray()
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(self._nodes):
            _signal_group(node, signal.SIGTERM)
        for node in reversed(self._nodes):
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_group(node, signal.SIGKILL)
                node.wait(timeout=10)
        self._nodes = []

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _signal_group(node: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, sig)
