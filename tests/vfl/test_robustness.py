"""A quick slice of benchmarks/robustness.py over three real services (mutual TLS, a 512-bit
test key): fuzzed envelopes through decode and the gRPC receive path, an honest peer's
envelope while another peer stalls streams, and a party killed mid-job. Nothing here
depends on timing: deadlines only bound how long a broken service takes to fail."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vfl.service.local import LocalCluster

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "robustness", ROOT / "benchmarks" / "robustness.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["robustness"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


rb = _load()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    services = rb.start_cluster(tmp_path_factory.mktemp("robust"), key_bits=512)
    try:
        yield services
    finally:
        codes = services.stop()
    assert codes == {"bank": 0, "retailer": 0, "arbiter": 0}, codes


def test_fuzzed_envelopes_are_refused_with_typed_errors(cluster: LocalCluster) -> None:
    """A few hundred mutated envelopes of every kind: decode raises only typed errors, the
    arbiter's service answers every call with a status other than INTERNAL/UNKNOWN, none of
    its handlers crashes, and it still serves afterwards."""
    got = rb.fuzz_envelopes(cluster, cases=300, seed=7, warm_up=5, settle_s=0.0)
    assert got["untyped_errors"] == 0, got["untyped_examples"]
    assert got["handler_crashes"] == 0 and got["internal_errors_logged"] == 0
    assert got["receiver_alive_after"]
    assert got["decode"].get("typed", 0) > 0 and got["decode"].get("accepted", 0) > 0
    assert got["grpc_status"]["push"].get("INVALID_ARGUMENT", 0) > 0
    assert len(got["mutations"]) >= 15  # most mutation kinds were drawn


def test_fuzz_corpus_is_reproducible() -> None:
    """The same seed makes the same cases (a failure can be replayed)."""
    first, second = rb.Corpus(3), rb.Corpus(3)
    second.seq = first.seq  # sequence numbers start from the clock
    for _ in range(50):
        a, b = first.case(), second.case()
        assert (a.kind, a.header, a.payload, a.frames) == (b.kind, b.header, b.payload, b.frames)


def test_an_honest_envelope_is_delivered_while_another_peer_stalls_streams(
    cluster: LocalCluster,
) -> None:
    """The bank holds 8 Push streams open at the arbiter (a frame header, then nothing);
    the retailer's small envelope is still accepted."""
    staller = rb.RawPeer(
        identity=cluster.configs["bank"].tls.load(),
        peer_id="arbiter",
        address=rb.service_address(cluster.configs["arbiter"]),
    )
    sender = rb.HonestSender(cluster)
    try:
        assert sender.send(deadline=120)[0] == "OK"  # unloaded
        stalls = rb.StalledStreams(staller, count=8)
        try:
            assert stalls.wait_sent(120) == 8
            code, _ = sender.send(deadline=60)  # generous: a served envelope takes ms
        finally:
            stalls.release()
        assert sender.send(deadline=120)[0] == "OK"  # and it recovers
    finally:
        sender.close()
        staller.close()
    assert code == "OK"


@pytest.fixture(scope="module")
def reference(cluster: LocalCluster) -> dict[str, Any]:
    rb.run_psi(cluster)
    result, _ = rb.reference_run(cluster, "quick-ref")
    out: dict[str, Any] = result
    return out


def test_a_guest_killed_mid_job_resumes_to_the_same_result(
    cluster: LocalCluster, reference: dict[str, Any]
) -> None:
    """SIGKILL of the bank while it holds the job after step 3 (a kill that certainly
    lands mid-job); restarted, it resubmits the job, which finishes once with exactly the
    uninterrupted run's scores."""
    row = rb.kill_trial(
        cluster,
        job_id="quick-kill",
        party="bank",
        reference=reference,
        timeout=900,
        hold_at_step=3,
    )
    assert row["exit_code"] == -9 and row["mid_job"], row
    assert row["state"] == "done" and row["identical"], row
    assert row["job_finished_records"] == 1 and not row["lost_or_duplicated"], row
    assert row["runs"] >= 1
