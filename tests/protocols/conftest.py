"""Three connected channels per implementation, shared by the contract suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from protocols.roles import PartyAddress
from protocols.tags import TagRegistry
from protocols.transport.base import Channel
from protocols.transport.grpc_channel import GrpcChannel
from protocols.transport.inmemory import InMemoryNetwork
from tests.conftest import PARTIES, Pki, TestTag


def grpc_trio(pki: Pki, **kwargs: object) -> dict[str, GrpcChannel]:
    """Three gRPC channels on ports bound to 0, each knowing the others."""
    channels = {
        p.party_id: GrpcChannel(
            me=p,
            identity=pki.identity(p),
            tags=TagRegistry([TestTag]),
            **kwargs,  # type: ignore[arg-type]
        )
        for p in PARTIES
    }
    for ch in channels.values():
        ch.start()
    for ch in channels.values():
        for other in channels.values():
            if other is not ch:
                pem = (pki.dir / f"{other.me.party_id}.pem").read_bytes()
                ch.add_peer(PartyAddress(other.me, f"127.0.0.1:{other.port}", pem))
    return channels


@pytest.fixture(scope="session")
def grpc_channels(pki: Pki) -> Iterator[dict[str, GrpcChannel]]:
    channels = grpc_trio(pki)
    yield channels
    for ch in channels.values():
        ch.close(grace=1.0)


@pytest.fixture(scope="session")
def inmemory_channels() -> Iterator[dict[str, Channel]]:
    net = InMemoryNetwork()
    channels: dict[str, Channel] = {
        p.party_id: net.channel(p, tags=TagRegistry([TestTag])) for p in PARTIES
    }
    yield channels
    for ch in channels.values():
        ch.close()


@pytest.fixture(params=["inmemory", "grpc"])
def channels(request: pytest.FixtureRequest) -> dict[str, Channel]:
    """The shared contract runs on both implementations."""
    fixture = "inmemory_channels" if request.param == "inmemory" else "grpc_channels"
    result: dict[str, Channel] = request.getfixturevalue(fixture)
    return result
