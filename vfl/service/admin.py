"""Talking to one's own party service: admin commands and health checks.

The operator's tools run with the party's own certificate and key (from the same
config file as the service), so the service knows the caller is its own operator.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocols.errors import PeerUnavailableError
from protocols.transport.grpc_client import PeerClient, open_channel
from protocols.transport.tls import TlsIdentity
from vfl.config import PartyConfig
from vfl.service.party import read_port


def service_address(config: PartyConfig) -> str:
    """Where the party's own service can be reached from this machine."""
    host, _, port = config.listen.rpartition(":")
    bound = read_port(config.state_dir)
    if host in ("0.0.0.0", "[::]", "::", ""):  # noqa: S104 - a wildcard listen is reached locally
        host = "127.0.0.1"
    return f"{host}:{bound if bound is not None else port}"


def _identity(config: PartyConfig, insecure: bool) -> TlsIdentity | None:
    if insecure:
        return None
    return config.tls.load()


def admin_call(
    config: PartyConfig,
    command: str,
    data: dict[str, Any] | None = None,
    *,
    timeout: float = 120.0,
    insecure: bool = False,
) -> dict[str, Any]:
    """Run an admin command on the party's own running service."""
    options = dataclasses.replace(config.transport, retry_seconds=5.0)
    client = PeerClient(
        peer=config.party,
        address=service_address(config),
        identity=_identity(config, insecure),
        options=options,
    )
    try:
        return client.admin(command, data or {}, timeout=timeout)
    finally:
        client.close()


def wait_healthy(config: PartyConfig, *, timeout: float, insecure: bool = False) -> None:
    """Wait until the party's service reports SERVING on the standard health service."""
    give_up = time.monotonic() + timeout
    last = "no port file yet"
    while time.monotonic() < give_up:
        if read_port(config.state_dir) is None and config.listen.endswith(":0"):
            time.sleep(0.05)
            continue
        channel = open_channel(
            peer_id=config.party.party_id,
            address=service_address(config),
            identity=_identity(config, insecure),
            options=config.transport,
        )
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:
            last = f"{err.code().name}"
        finally:
            channel.close()
        time.sleep(0.1)
    raise PeerUnavailableError(
        f"{config.party} at {service_address(config)} is not healthy after {timeout:.0f} s "
        f"({last}); is `vfl serve --config {config.source}` running?"
    )
