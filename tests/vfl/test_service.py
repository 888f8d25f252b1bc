"""Three party services as real processes talking gRPC over mutual TLS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protocols.envelope import Envelope, PlainBlock, encode
from protocols.errors import PeerIdentityError, VflError
from protocols.roles import PartyAddress
from protocols.tags import TagRegistry
from protocols.transport.base import DeliveryStatus
from protocols.transport.grpc_channel import GrpcChannel
from protocols.transport.grpc_client import DELIVER, PeerClient, open_channel
from protocols.transport.options import TransportOptions
from vfl.config import PartyConfig, load_config
from vfl.data.datasets import data_dir
from vfl.service.admin import admin_call, service_address, wait_healthy
from vfl.service.demo import write_demo_setup
from vfl.service.local import connect_services, start_services, stop_services
from vfl.service.party import ServiceTag
from vfl.service.probe import HealthProbe

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Running:
    configs: dict[str, PartyConfig]
    procs: dict[str, subprocess.Popen[bytes]]
    logs: Path


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("services")
    paths = write_demo_setup(root, data_folder=data_dir(os.environ))
    with socket.socket() as probe_socket:  # a free port for the bank's health endpoint
        probe_socket.bind(("127.0.0.1", 0))
        probe_port = probe_socket.getsockname()[1]
    text = paths["bank"].read_text()
    paths["bank"].write_text(text.replace("[party]\n", f"[party]\nhealth = {probe_port}\n", 1))
    configs = {pid: load_config(p) for pid, p in paths.items()}
    procs = start_services(configs, logs=root / "logs")
    try:
        connect_services(configs)
        yield Running(configs, procs, root / "logs")
    finally:
        codes = stop_services(procs)
    assert list(codes.values()) == [0, 0, 0], "services did not shut down cleanly"


def test_three_services_ping_each_other_concurrently(services: Running) -> None:
    def ping(cfg: PartyConfig) -> dict[str, object]:
        return admin_call(cfg, "ping", {"bytes": 5 << 20, "rounds": 2})

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(ping, services.configs.values()))
    pairs = {(r["party"], x["peer"]) for r in replies for x in r["results"] if x.get("verified")}  # type: ignore[index, union-attr, attr-defined]
    assert len(pairs) == 6, replies  # every ordered pair, i.e. both directions


def test_health_endpoint_answers_probes_without_a_certificate(services: Running) -> None:
    address = services.configs["bank"].health
    assert address is not None and address.startswith("127.0.0.1:")
    for path, code, body in (("/healthz", 200, b"ok\n"), ("/readyz", 200, b"ok\n")):
        with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as reply:
            assert (reply.status, reply.read()) == (code, body)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{address}/jobs", timeout=30)
    assert info.value.code == 404
    assert services.configs["retailer"].health is None  # off unless configured


def test_health_probe_reports_not_ready() -> None:
    ready = [False]
    probe = HealthProbe(listen="127.0.0.1:0", ready=lambda: ready[0])
    probe.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{probe.port}/readyz", timeout=30)
        assert info.value.code == 503
        ready[0] = True
        with urllib.request.urlopen(f"http://127.0.0.1:{probe.port}/readyz", timeout=30) as r:
            assert r.status == 200
    finally:
        probe.stop()


def test_status_through_the_cli(services: Running) -> None:
    cfg = services.configs["retailer"]
    out = subprocess.run(
        [sys.executable, "-m", "vfl", "status", "--config", str(cfg.source)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    status = json.loads(out)
    assert status["party"] == "retailer" and status["role"] == "host"
    assert set(status["peers"]) == {"bank", "arbiter"}
    assert status["data"]["credit"]["exists"] is True


def test_malformed_input_does_not_stop_the_service(services: Running) -> None:
    bank, retailer = services.configs["bank"], services.configs["retailer"]
    identity = bank.tls.load()
    raw = open_channel(
        peer_id="retailer",
        address=service_address(retailer),
        identity=identity,
        options=TransportOptions(),
    )
    try:
        for junk in (b"\x00\xff\xfe", b"\x0a\x05hello"):
            with pytest.raises(grpc.RpcError) as info:
                raw.unary_unary(DELIVER)(junk, timeout=5)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        raw.close()
    reply = admin_call(bank, "ping", {"peers": ["retailer"], "rounds": 1})
    assert reply["results"][0]["verified"] is True


def test_admin_is_only_for_the_partys_own_operator(services: Running) -> None:
    bank, retailer = services.configs["bank"], services.configs["retailer"]
    client = PeerClient(
        peer=retailer.party,
        address=service_address(retailer),
        identity=bank.tls.load(),
        options=TransportOptions(retry_seconds=2),
    )
    try:
        with pytest.raises(PeerIdentityError, match="own operator"):
            client.admin("status", {}, timeout=5)
    finally:
        client.close()
    with pytest.raises(VflError, match="unknown admin command"):
        admin_call(bank, "format-disk", {})


def test_sigterm_then_restart_keeps_replay_marks(tmp_path: Path) -> None:
    paths = write_demo_setup(tmp_path, data_folder=data_dir(os.environ))
    host_cfg = load_config(paths["retailer"])
    bank_cfg = load_config(paths["bank"])
    (tmp_path / "logs").mkdir()
    bank_identity = bank_cfg.tls.load()
    bank = GrpcChannel(me=bank_cfg.party, identity=bank_identity, tags=TagRegistry([ServiceTag]))
    bank.start()
    envelope = Envelope(
        job_id="restart-job",
        sender=bank_cfg.party,
        receiver=host_cfg.party,
        tag=ServiceTag.PING,
        step=0,
        seq=1,
        body=PlainBlock(b"hello"),
    )
    header, payload = encode(envelope)
    statuses = []
    try:
        for round_ in range(2):
            proc = start_services({"retailer": host_cfg}, logs=tmp_path / "logs")["retailer"]
            wait_healthy(host_cfg, timeout=60)
            admin_call(
                host_cfg, "set_peer_address", {"peer": "bank", "address": f"127.0.0.1:{bank.port}"}
            )
            bank.add_peer(PartyAddress(host_cfg.party, service_address(host_cfg)))
            client = PeerClient(
                peer=host_cfg.party,
                address=service_address(host_cfg),
                identity=bank_identity,
                options=TransportOptions(),
            )
            statuses.append(client.deliver(header, payload))
            client.close()
            if round_ == 0:
                pong = bank.recv(
                    job_id="restart-job",
                    sender=host_cfg.party,
                    tag=ServiceTag.PONG,
                    step=0,
                    timeout=10,
                )
                assert pong.body is not None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        assert statuses == [DeliveryStatus.ACCEPTED, DeliveryStatus.DUPLICATE]
        log = (tmp_path / "logs" / "retailer.log").read_text()
        assert log.count("retailer (host) stopped") == 2 and "restored 1 replay marks" in log
        assert "hello" not in log  # no data values in logs
    finally:
        bank.close(grace=0.1)


def test_serve_with_a_bad_config_names_the_key(tmp_path: Path) -> None:
    paths = write_demo_setup(tmp_path, data_folder=data_dir(os.environ))
    text = paths["bank"].read_text().replace('role = "guest"', 'role = "gust"', 1)
    paths["bank"].write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "vfl", "serve", "--config", str(paths["bank"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2
    assert "party.role: 'gust' is not a role" in result.stderr
