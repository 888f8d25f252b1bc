"""Scale-out benchmark: the guest's PSI and obfuscator work on a Ray cluster against the
local process pool, in the same run, on this machine.

* ``psi_local_s``: a 1e6-id PSI per side (50 % overlap), both parties in this process over
  the in-memory channel, the guest's hashing and masking on a local pool of 2 processes;
* ``psi_ray_s``: the same PSI with the guest's chunks on a Ray cluster of one head and one
  worker node (1 CPU each) started here as local processes; the host keeps its local pool
  of 2 processes in both runs (the same CPU budget); cluster start-up is not included;
* ``ray_startup_s``: starting the two nodes plus the guest's two actors;
* ``obfuscators_local_per_s`` / ``obfuscators_ray_per_s``: one batch of fixed-base
  obfuscators for a 2048-bit key, after a warm-up batch built each worker's table of
  ``h_s`` (per-job state, kept by the long-lived workers);
* ``ray_overhead`` = ``psi_ray_s / psi_local_s`` (target <= 1.15).

It also measures the per-chunk costs (hash-and-mask and mask of one PSI task, a Ray round
trip of one task's bytes, the driver's own CPU per id) and projects the wall time of a
1e8-id PSI on a silo of 4 machines x 16 cores from them.

Usage: ``python -m benchmarks.scaleout`` (default ``--n 1000000``; ``--n 20000`` to try).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script: keep benchmarks/ off the import path so `psi` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import time
from typing import Any

from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import generate_keypair
from protocols.executor import Executor, LocalProcessExecutor
from protocols.files import atomic_write
from protocols.ray_cluster import LocalRayCluster
from protocols.ray_executor import RayExecutor
from protocols.roles import Party, Role
from psi import ecdh
from psi.canon import IdType, PreparedIds, prepare_ids
from psi.inprocess import align_in_process, channel_pair
from psi.protocol import PsiOptions

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "scaleout.json"
GUEST, HOST = Party("bank", Role.GUEST), Party("retailer", Role.HOST)
OBFUSCATOR_BATCH = 4096
TARGET_OVERHEAD = 1.15
# the silo of the projection
MACHINES, CORES = 4, 16


def make_ids(n: int, overlap: float) -> tuple[PreparedIds, PreparedIds, int]:
    shared = int(n * overlap)
    guest = [f"customer{i:09d}@bank.example" for i in range(n)]
    host = [f"customer{i:09d}@bank.example" for i in range(n - shared, 2 * n - shared)]
    return (
        prepare_ids(guest, id_type=IdType.EMAIL),
        prepare_ids(host, id_type=IdType.EMAIL),
        shared,
    )


def run_psi(
    guest_ids: PreparedIds, host_ids: PreparedIds, eg: Executor, eh: Executor
) -> dict[str, Any]:
    """One in-memory PSI; wall time and this process's own CPU (both drivers)."""
    cpu0 = time.process_time()
    t = time.perf_counter()
    guest, _ = align_in_process(
        guest_ids=guest_ids,
        host_ids=host_ids,
        guest_executor=eg,
        host_executor=eh,
        job_id="scaleout",
        timeout=600,
        channels=channel_pair(GUEST, HOST),
    )
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu0
    return {"wall_s": wall, "drivers_cpu_s": cpu, "intersection": guest.intersection_size}


def obfuscator_rate(executor: Executor, key: Any) -> float:
    pool = ObfuscatorPool(key, executor=executor)
    pool.fill(64 * executor.workers)  # warm-up: every worker builds its table of h_s once
    t = time.perf_counter()
    pool.fill(OBFUSCATOR_BATCH)
    return OBFUSCATOR_BATCH / (time.perf_counter() - t)


def _echo(chunk: bytes) -> bytes:
    return chunk


def chunk_costs(executor: RayExecutor) -> dict[str, float]:
    """Per-chunk figures of one PSI task (``task_points`` ids), measured here."""
    task = PsiOptions().task_points
    key = ecdh.new_key()
    prefix = ecdh.dst(IdType.EMAIL.value) + ecdh.new_salt()
    items = [f"c{i:09d}@bank.example".encode() for i in range(task)]
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        points = ecdh.hash_and_mask_chunk((key, prefix, items))  # type: ignore[arg-type]
    hash_mask = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps):
        ecdh.mask_chunk((key, points))
    mask = (time.perf_counter() - t) / reps
    # a Ray round trip of one task's bytes with no work: the backend's own cost per chunk
    trips = 200
    t = time.perf_counter()
    executor.map(_echo, [points] * trips)
    round_trip = (time.perf_counter() - t) / trips * executor.workers
    return {
        "task_points": task,
        "hash_and_mask_chunk_s": hash_mask,
        "mask_chunk_s": mask,
        "ray_round_trip_s": round_trip,
    }


def grpc_driver_cpu_per_id() -> float | None:
    """The guest service's own CPU per id over mTLS gRPC, from the PSI benchmark's last run
    (``benchmarks/psi.py``: serialising, TLS and validation on top of the in-memory work)."""
    try:
        psi = json.loads((RESULT.parent / "psi.json").read_text())
        return float(psi["grpc_cpu_s_per_party"]["bank"]["main"]) / int(psi["n_per_side"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def projection(costs: dict[str, float], driver_cpu_per_id: float, n: float = 1e8) -> dict[str, Any]:
    """Expected wall time of an n-id PSI per side on MACHINES x CORES, from measured costs.

    Each party hashes and masks its own n ids and masks the peer's n points: n/task chunks of
    each kind, spread over every core of the cluster; its driver (the party's service
    process) validates, forwards and matches every point itself, on one core.
    """
    chunks = n / costs["task_points"]
    cores = MACHINES * CORES
    worker_s = chunks * (costs["hash_and_mask_chunk_s"] + costs["mask_chunk_s"]) / cores
    ray_s = 2 * chunks * costs["ray_round_trip_s"] / cores
    driver_s = n * driver_cpu_per_id
    grpc = grpc_driver_cpu_per_id()
    driver_grpc_s = None if grpc is None else n * grpc
    return {
        "ids_per_side": n,
        "machines": MACHINES,
        "cores_per_machine": CORES,
        "workers_s": round(worker_s, 1),
        "ray_overhead_s": round(ray_s, 1),
        "driver_s": round(driver_s, 1),
        "driver_grpc_s": None if driver_grpc_s is None else round(driver_grpc_s, 1),
        # workers and driver overlap (chunks stream); the longer of the two bounds the run
        "expected_wall_s": round(max(worker_s + ray_s, driver_grpc_s or driver_s), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="ids per side")
    args = parser.parse_args()
    print(f"ids per side: {args.n:,}; machine: {os.cpu_count()} CPUs")
    guest_ids, host_ids, shared = make_ids(args.n, 0.5)
    key, _ = generate_keypair(bits=2048)
    out: dict[str, Any] = {"n_per_side": args.n, "n_intersection": shared}

    with LocalProcessExecutor(workers=2) as eh:  # the host: the same pool in both runs
        eh.map(abs, [0, 0])
        with LocalProcessExecutor(workers=2) as eg:
            eg.map(abs, [0, 0])
            local = run_psi(guest_ids, host_ids, eg, eh)
            print(f"PSI, guest on local pool: {local['wall_s']:.1f} s")
            out["obfuscators_local_per_s"] = round(obfuscator_rate(eg, key), 1)
        t = time.perf_counter()
        cluster = LocalRayCluster(node_cpus=(1, 1))
        cluster.start()
        try:
            with RayExecutor(address=cluster.address, allow_plaintext_cluster=True) as eg_ray:
                out["ray_startup_s"] = round(time.perf_counter() - t, 2)
                print(f"Ray cluster (head + 1 worker node) up in {out['ray_startup_s']} s")
                on_ray = run_psi(guest_ids, host_ids, eg_ray, eh)
                print(f"PSI, guest on Ray: {on_ray['wall_s']:.1f} s")
                out["obfuscators_ray_per_s"] = round(obfuscator_rate(eg_ray, key), 1)
                costs = chunk_costs(eg_ray)
        finally:
            cluster.stop()
    if local["intersection"] != shared or on_ray["intersection"] != shared:
        raise SystemExit(f"wrong intersection: {local['intersection']}, {on_ray['intersection']}")
    # both drivers run in this process: half of its CPU is one party's
    driver_cpu_per_id = local["drivers_cpu_s"] / 2 / args.n
    out.update(
        {
            "psi_local_s": round(local["wall_s"], 2),
            "psi_ray_s": round(on_ray["wall_s"], 2),
            "ray_overhead": round(on_ray["wall_s"] / local["wall_s"], 3),
            "target_ray_overhead": TARGET_OVERHEAD,
            "drivers_cpu_s": {
                "local": round(local["drivers_cpu_s"], 1),
                "ray": round(on_ray["drivers_cpu_s"], 1),
            },
            "chunk_costs": {k: round(v, 6) for k, v in costs.items()},
            "driver_cpu_us_per_id": round(1e6 * driver_cpu_per_id, 2),
            "projection_1e8": projection(costs, driver_cpu_per_id),
            "obfuscator_batch": OBFUSCATOR_BATCH,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    atomic_write(RESULT, (json.dumps(out, indent=2) + "\n").encode())
    print(
        f"ray_overhead = {out['ray_overhead']:.3f} (target <= {TARGET_OVERHEAD}); "
        f"obfuscators/s local {out['obfuscators_local_per_s']}, ray {out['obfuscators_ray_per_s']}"
    )
    p = out["projection_1e8"]
    print(
        f"1e8 ids on {MACHINES}x{CORES} cores: workers {p['workers_s']} s "
        f"+ Ray {p['ray_overhead_s']} s, driver {p['driver_s']} s "
        f"(over gRPC {p['driver_grpc_s']} s) -> about {p['expected_wall_s']} s"
    )
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
