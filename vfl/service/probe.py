"""A plain HTTP health endpoint for an orchestrator's probes (Kubernetes, systemd, a load
balancer), on its own address, separate from the party's mTLS service.

Off unless ``[party] health`` is set; give a port alone and it listens on loopback only.
It answers ``GET /healthz`` (liveness: the process answers) and ``GET /readyz``
(readiness: the party's gRPC service is accepting calls) with ``200 ok`` or
``503 unavailable`` and nothing else: no party id, no job, no version, no count, so an
unauthenticated caller learns only that the service is up. The mTLS gRPC health service
(``grpc.health.v1``) stays on the party's own address for peers with a certificate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class HealthProbe:
    """Serve ``/healthz`` and ``/readyz`` on ``listen`` until :meth:`stop`.

    Parameters
    ----------
    listen
        ``host:port`` (port 0 picks a free one; see :attr:`port`).
    ready
        Whether the party's service is accepting calls now.
    """

    def __init__(self, *, listen: str, ready: Callable[[], bool]) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        if host not in _LOOPBACK:
            logger.warning(
                "the health endpoint listens on %s, beyond this machine: it answers anyone "
                "with up/down and nothing more",
                listen,
            )
        handler = _handler_for(ready)
        self._server = _BoundedServer((host, int(port)), handler)
        self.port: int = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-probe", daemon=True
        )

    def start(self) -> None:
        """Start answering probes."""
        self._thread.start()
        logger.info("health endpoint on port %d (/healthz, /readyz)", self.port)

    def stop(self) -> None:
        """Stop answering and close the socket."""
        self._server.shutdown()
        self._server.server_close()


_CONNECTIONS = 16  # probes open at once; more are closed at once
_SOCKET_SECONDS = 5.0  # a probe that sends nothing for this long is closed


class _BoundedServer(ThreadingHTTPServer):
    """At most ``_CONNECTIONS`` connections at once, each with a socket timeout, and no
    tracebacks for a client that went away."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("health probe connection ended with an error", exc_info=True)


def _handler_for(ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = ""
        sys_version = ""
        timeout = _SOCKET_SECONDS

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path == "/healthz":
                self._answer(True)
            elif self.path == "/readyz":
                self._answer(ready())
            else:
                self._send(404, b"not found\n")

        def _answer(self, up: bool) -> None:
            self._send(200, b"ok\n") if up else self._send(503, b"unavailable\n")

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            logger.debug("health probe: " + format, *args)

    return Handler
