"""PSI benchmark: this engine (in memory and between two services over mTLS gRPC) against
openmined-psi, and against the floor of the work the protocol cannot avoid.

* ``inmemory_wall_s``: both parties in this process over the in-memory channel, each with
  its own worker pool, from id lists to written results;
* ``grpc_wall_s``: two ``vfl serve`` processes over mutual TLS, started with the ``psi``
  admin command from the guest, from id files to both parties' written results;
* ``openmined_wall_s``: openmined-psi 2.0.6 (ECDH P-256) on the same sets in one process,
  intersection revealed to the client; it pins protobuf 6.30.2, so it runs in its own
  virtualenv (``benchmarks/.peers-venv``, created on first use) as a separate process;
* ``floor_s``: hash-to-curve plus two X25519 multiplications per id per party, each timed
  here in this run (just before and just after the gRPC run, averaged, since the machine's
  speed drifts), summed over both parties and divided by the cores;
* ``peak_rss_mb``: the largest sum of resident memory over one party's process tree
  (its worker processes included), sampled every 0.2 s during the gRPC run.

Targets at 1e6 ids per side, 50 % overlap, 2 cores: speedup_vs_openmined >= 3,
ratio_to_floor <= 1.3, peak_rss_mb <= 1536.

Usage: ``python -m benchmarks.psi --n 1000000`` (default ``--n 20000``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named psi.py: keep its folder off the import path so `psi` is the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import subprocess
import tempfile
import threading
import time

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocols.executor import LocalProcessExecutor
from protocols.files import atomic_write
from psi import ecdh
from psi.canon import IdType, prepare_ids
from psi.inprocess import align_in_process, channel_pair
from psi.result import read_result, result_dir, write_result
from vfl.config import load_config
from vfl.service.admin import admin_call
from vfl.service.demo import DEMO_PARTIES, write_demo_setup
from vfl.service.local import connect_services, start_services, stop_services

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "psi.json"
PEERS_VENV = ROOT / "benchmarks" / ".peers-venv"
GUEST, HOST = DEMO_PARTIES[0], DEMO_PARTIES[1]

OPENMINED_SCRIPT = """
import sys, time, json
import private_set_intersection.python as psi
guest = open(sys.argv[1]).read().split("\\n")[1:-1]
host = open(sys.argv[2]).read().split("\\n")[1:-1]
t = time.perf_counter()
client = psi.client.CreateWithNewKey(True)
server = psi.server.CreateWithNewKey(True)
setup = server.CreateSetupMessage(1e-9, len(guest), host, psi.DataStructure.RAW)
response = server.ProcessRequest(client.CreateRequest(guest))
found = client.GetIntersection(setup, response)
print(json.dumps({"wall_s": time.perf_counter() - t, "intersection": len(found)}))
"""


def make_ids(n: int, overlap: float, folder: Path) -> tuple[Path, Path, int]:
    """Guest and host id files (one e-mail-like id per line) with the given overlap."""
    shared = int(n * overlap)
    guest = [f"customer{i:09d}@bank.example" for i in range(n)]
    host = [f"customer{i:09d}@bank.example" for i in range(n - shared, 2 * n - shared)]
    host.reverse()
    paths = (folder / "guest_ids.csv", folder / "host_ids.csv")
    for path, ids in zip(paths, (guest, host), strict=True):
        path.write_text("email\n" + "\n".join(ids) + "\n")
    return paths[0], paths[1], shared


def read_ids(path: Path) -> list[str]:
    return path.read_text().split("\n")[1:-1]


def floor_seconds(n: int, cores: int) -> tuple[float, float, float]:
    """Per-id hash-to-curve and X25519 costs measured now; the protocol's floor in seconds."""
    sample = [f"customer{i:09d}@bank.example".encode() for i in range(50_000)]
    prefix = ecdh.dst("email") + bytes(16)
    t = time.perf_counter()
    points = [ecdh.hash_to_curve(c, prefix=prefix) for c in sample]
    hash_s = (time.perf_counter() - t) / len(sample)
    key = X25519PrivateKey.generate()
    t = time.perf_counter()
    for u in points:
        key.exchange(X25519PublicKey.from_public_bytes(u))
    x_s = (time.perf_counter() - t) / len(points)
    return 2 * n * (hash_s + 2 * x_s) / cores, hash_s, x_s


def run_inmemory(guest_path: Path, host_path: Path, out: Path) -> float:
    with LocalProcessExecutor(workers=2) as eg, LocalProcessExecutor(workers=2) as eh:
        eg.map(abs, [0, 0]), eh.map(abs, [0, 0])  # start the workers before timing
        t = time.perf_counter()
        guest, host = align_in_process(
            guest_ids=prepare_ids(read_ids(guest_path), id_type=IdType.EMAIL),
            host_ids=prepare_ids(read_ids(host_path), id_type=IdType.EMAIL),
            guest_executor=eg,
            host_executor=eh,
            job_id="bench",
            timeout=600,
            channels=channel_pair(GUEST, HOST),
        )
        write_result(out / "guest", "bench", guest)
        write_result(out / "host", "bench", host)
        return time.perf_counter() - t


class RssSampler:
    """Samples the resident memory of process trees from /proc."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.cpu: dict[str, dict[int, float]] = {name: {} for name in pids}
        self._start_cpu = {
            name: {p: self._cpu_s(p) for p in self._tree(pid)} for name, pid in pids.items()
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _tree(root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    @staticmethod
    def _rss_kb(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    @staticmethod
    def _cpu_s(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                tree = self._tree(pid)
                total = sum(self._rss_kb(p) for p in tree)
                self.peak[name] = max(self.peak[name], total)
                for p in tree:
                    self.cpu[name][p] = self._cpu_s(p) - self._start_cpu[name].get(p, 0.0)
            self._stop.wait(0.2)

    def cpu_seconds(self) -> dict[str, dict[str, float]]:
        """CPU seconds used during the run: the party's main process and its workers."""
        out = {}
        for name, pid in self.pids.items():
            used = self.cpu[name]
            main = used.get(pid, 0.0)
            out[name] = {"main": round(main, 2), "workers": round(sum(used.values()) - main, 2)}
        return out

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {name: kb / 1024 for name, kb in self.peak.items()}


def run_grpc(
    guest_path: Path, host_path: Path, work: Path
) -> tuple[float, dict[str, float], int, dict[str, dict[str, float]]]:
    paths = write_demo_setup(work, data_folder=work)
    for pid, ids in (("bank", guest_path), ("retailer", host_path)):
        with paths[pid].open("a") as f:
            f.write(f'ids = "{ids}"\n')
    configs = {pid: load_config(paths[pid]) for pid in ("bank", "retailer")}
    procs = start_services(configs, logs=work / "logs")
    try:
        connect_services(configs, timeout=120)
        sampler = RssSampler({pid: p.pid for pid, p in procs.items()})
        t = time.perf_counter()
        reply = admin_call(
            configs["bank"],
            "psi",
            {
                "peer": "retailer",
                "data": "ids",
                "id_column": "email",
                "id_type": "email",
                "job_id": "bench",
            },
            timeout=24 * 3600,
        )
        host_summary = result_dir(configs["retailer"].state_dir, "bench") / "summary.json"
        while not host_summary.exists():
            time.sleep(0.01)
        wall = time.perf_counter() - t
        peaks = sampler.stop()
        cpu = sampler.cpu_seconds()
        read_result(configs["retailer"].state_dir, "bench")
    finally:
        stop_services(procs, timeout=120)
    return wall, peaks, int(reply["intersection_size"]), cpu


def run_openmined(guest_path: Path, host_path: Path) -> dict[str, float]:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "openmined-psi==2.0.6"], check=True
        )
    out = subprocess.run(
        [str(python), "-c", OPENMINED_SCRIPT, str(guest_path), str(host_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000, help="ids per side")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--skip-openmined", action="store_true")
    parser.add_argument("--skip-inmemory", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="vfl-psi-bench-") as tmp:
        work = Path(tmp)
        guest_path, host_path, shared = make_ids(args.n, args.overlap, work)
        floor, hash_s, x_s = floor_seconds(args.n, cores)
        print(
            f"floor: {floor:.2f} s (hash-to-curve {hash_s * 1e6:.1f} us, "
            f"X25519 {x_s * 1e6:.1f} us per id)",
            flush=True,
        )
        inmem = (
            None if args.skip_inmemory else run_inmemory(guest_path, host_path, work / "inmemory")
        )
        print(f"in-memory: {inmem} s", flush=True)
        grpc_wall, peaks, found, cpu = run_grpc(guest_path, host_path, work / "grpc")
        print(
            f"gRPC: {grpc_wall:.2f} s, intersection {found}, peak RSS {peaks}, CPU {cpu}",
            flush=True,
        )
        if found != shared:
            raise SystemExit(f"wrong intersection: {found} != {shared}")
        # the machine's speed drifts: time the floor again right after and use the mean
        floor_after, hash_after, x_after = floor_seconds(args.n, cores)
        print(f"floor after: {floor_after:.2f} s", flush=True)
        floor, hash_s, x_s = (
            (floor + floor_after) / 2,
            (hash_s + hash_after) / 2,
            (x_s + x_after) / 2,
        )
        om = None if args.skip_openmined else run_openmined(guest_path, host_path)
        print(f"openmined: {om}", flush=True)
    result = {
        "n_per_side": args.n,
        "overlap_fraction": args.overlap,
        "n_intersection": shared,
        "inmemory_wall_s": None if inmem is None else round(inmem, 3),
        "grpc_wall_s": round(grpc_wall, 3),
        "openmined_wall_s": None if om is None else round(om["wall_s"], 3),
        "speedup_vs_openmined": None if om is None else round(om["wall_s"] / grpc_wall, 2),
        "floor_s": round(floor, 3),
        "ratio_to_floor": round(grpc_wall / floor, 3),
        "peak_rss_mb": round(max(peaks.values()), 1),
        "peak_rss_mb_per_party": {k: round(v, 1) for k, v in peaks.items()},
        "grpc_cpu_s_per_party": cpu,
        "hash_to_curve_us": round(hash_s * 1e6, 2),
        "x25519_us": round(x_s * 1e6, 2),
        "targets_at_1e6": {"speedup_vs_openmined": 3, "ratio_to_floor": 1.3, "peak_rss_mb": 1536},
        "machine": {"cpus": cores, "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
