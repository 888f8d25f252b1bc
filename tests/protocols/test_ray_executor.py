"""The ``ray`` executor backend on a local Ray cluster started by these tests: chunk order,
errors, a killed worker, and PSI and split-NN results bit-identical to the ``local`` pool."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.errors import ConfigError, InsecureConfigError, InvalidPointError
from protocols.executor import (
    Backend,
    Executor,
    ExecutorSettings,
    LocalProcessExecutor,
    make_executor,
)
from protocols.ray_cluster import LocalRayCluster
from protocols.ray_executor import RayExecutor
from psi import ecdh
from psi.canon import IdType, prepare_ids
from psi.inprocess import align_in_process
from psi.protocol import PsiOptions, PsiResult
from tests.vfl.session_setup import synthetic_tables
from vfl.splitnn.inprocess import run_in_process
from vfl.splitnn.job import SplitJob
from vfl.splitnn.training import TrainConfig


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray head as local processes, for this module: 4 logical CPUs, so that the module's
    executor (2 actors) and one more of 2 actors fit."""
    with LocalRayCluster(node_cpus=(4,)) as c:
        yield c.address


@pytest.fixture(scope="module")
def ray_executor(cluster: str) -> Iterator[RayExecutor]:
    with RayExecutor(address=cluster, workers=2, allow_plaintext_cluster=True) as ex:
        yield ex  # type: ignore[misc]


@pytest.fixture(scope="module")
def local_executor() -> Iterator[Executor]:
    with LocalProcessExecutor(workers=2) as ex:
        yield ex


def _slow_square(x: int) -> int:
    time.sleep(0.02 * (x % 3))  # later chunks often finish first
    return x * x


def test_results_come_back_in_chunk_order(ray_executor: RayExecutor) -> None:
    assert ray_executor.workers == 2
    assert ray_executor.map(_slow_square, list(range(12))) == [x * x for x in range(12)]
    assert list(ray_executor.imap(_slow_square, iter(range(9)), window=3)) == [
        x * x for x in range(9)
    ]


def test_a_chunk_functions_own_error_is_raised_as_itself(ray_executor: RayExecutor) -> None:
    key = ecdh.new_key()
    good = ecdh.hash_and_mask_chunk((key, b"p", [b"a", b"b"]))
    with pytest.raises(InvalidPointError, match="small-order"):
        ray_executor.map(ecdh.mask_chunk, [(key, good)] * 3 + [(key, bytes(32))] + [(key, good)])
    assert ray_executor._load == [0, 0]  # nothing counted as in flight after the error


def test_obfuscators_made_on_the_cluster_encrypt_zero(
    ray_executor: RayExecutor, pk: PublicKey, sk: PrivateKey
) -> None:
    pool = ObfuscatorPool(pk, executor=ray_executor)
    pool.fill(40)
    rhos = pool.take(40)
    assert len(set(rhos)) == 40
    assert all(sk.decrypt(rho) == 0 for rho in rhos)


def test_without_ray_tls_the_plaintext_flag_is_required(cluster: str) -> None:
    with pytest.raises(InsecureConfigError, match="RAY_USE_TLS"):
        RayExecutor(address=cluster)


def test_a_missing_ray_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'vfl-engine\[ray\]'"):
        make_executor(ExecutorSettings(backend=Backend.RAY, ray_address="127.0.0.1:1"))


def test_more_workers_than_free_cpus_is_a_clear_error(cluster: str) -> None:
    with pytest.raises(ConfigError, match="did not start 3 workers"):
        RayExecutor(address=cluster, workers=3, allow_plaintext_cluster=True, startup_timeout=2)


# -- PSI ----------------------------------------------------------------------------------

GUEST_IDS = [f"user{i:05d}" for i in range(0, 6000)]
HOST_IDS = [f"user{i:05d}" for i in range(4000, 9000)]
OPTIONS = PsiOptions(task_points=256, chunk_points=1024)


def _psi(executor: Executor) -> tuple[PsiResult, PsiResult]:
    return align_in_process(
        guest_ids=prepare_ids(GUEST_IDS, id_type=IdType.GENERIC),
        host_ids=prepare_ids(HOST_IDS, id_type=IdType.GENERIC),
        guest_executor=executor,
        options=OPTIONS,
        job_id="ray-psi",
        timeout=60,
    )


def _fixed_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys, salt and shuffles from a seeded generator, so two runs can be compared bit by bit."""
    rng = np.random.default_rng(11)

    def draw(n: int) -> bytes:
        return rng.bytes(n)

    monkeypatch.setattr(ecdh, "new_key", lambda: draw(32))
    monkeypatch.setattr(ecdh, "new_salt", lambda: draw(16))
    monkeypatch.setattr("psi.protocol.os.urandom", draw)


def test_psi_is_bit_identical_with_local_and_ray(
    monkeypatch: pytest.MonkeyPatch, ray_executor: RayExecutor, local_executor: Executor
) -> None:
    _fixed_randomness(monkeypatch)
    local = _psi(local_executor)
    _fixed_randomness(monkeypatch)
    on_ray = _psi(ray_executor)
    assert len(local[0].rows) == 2000
    for a, b in zip(local, on_ray, strict=True):
        assert a.rows is not None and b.rows is not None
        assert np.array_equal(a.rows, b.rows)  # same rows in the same shared order
        assert (a.run_id, a.intersection_size) == (b.run_id, b.intersection_size)


class _KillOnce(RayExecutor):
    """Kills one of its actors (SIGKILL) after a few chunks have come back."""

    def __init__(self, *args: Any, after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after, self.done, self.victim = after, 0, 0
        self.died = 0

    def _collect(self, ref: Any, index: int) -> tuple[bool, Any]:
        ok, result = super()._collect(ref, index)
        self.done += ok
        self.died += not ok
        if self.done == self.after:
            self.victim = self.pids()[0]
            os.kill(self.victim, signal.SIGKILL)
        return ok, result


def test_a_killed_ray_worker_mid_psi_still_gives_the_right_intersection(cluster: str) -> None:
    with _KillOnce(address=cluster, workers=2, allow_plaintext_cluster=True, after=5) as killer:
        guest, host = _psi(killer)
        assert killer.victim and killer.died >= 1  # chunks were lost and resubmitted
        assert killer.victim not in killer.pids()  # Ray restarted the actor
    assert guest.rows is not None and host.rows is not None
    found = [GUEST_IDS[i] for i in guest.rows]
    assert sorted(found) == sorted(set(GUEST_IDS) & set(HOST_IDS))
    assert [HOST_IDS[i] for i in host.rows] == found  # one shared order


# -- split NN -----------------------------------------------------------------------------


def _train(executor: Executor, state: Path) -> tuple[list[Any], list[Any], dict[str, np.ndarray]]:
    guest_table, host_table, splits = synthetic_tables(rows=120)
    job = SplitJob(
        job_id="ray-splitnn",
        train=TrainConfig(d=2, k=2, guest_widths=(4, 2), host_widths=(4, 2)),
        batch=32,
        batch_eval=64,
        epochs=1,
    )
    run = run_in_process(
        job=job,
        guest_table=guest_table,
        host_table=host_table,
        splits=splits,
        executor=executor,
        state_dir=state,
        key_bits=1024,
        seed=5,  # the guest's protection noise, keyed (docs/protocol.md §4.4.2)
        w0_seed=3,
        order_seed=bytes(32),
        host_seed=7,
        allow_test_key=True,
        timeout=120,
    )
    host_weights = {k: v.detach().numpy().copy() for k, v in run.host.bottom.state_dict().items()}
    return run.result.history, run.result.test_scores, host_weights


def test_split_nn_is_bit_identical_with_local_and_ray(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ray_executor: RayExecutor,
    local_executor: Executor,
) -> None:
    # the label-protection noise (the guest's seed) and the host's (its seed) repeat
    history_l, scores_l, host_l = _train(local_executor, tmp_path / "local")
    history_r, scores_r, host_r = _train(ray_executor, tmp_path / "ray")
    assert history_l == history_r
    assert scores_l == scores_r
    assert host_l.keys() == host_r.keys()
    for name in host_l:
        assert np.array_equal(host_l[name], host_r[name]), name
