"""The three-party demo: bank (guest), retailer (host) and arbiter as local processes.

1. verify the real data sets against their sha256 list;
2. issue a demo CA and one certificate per party (``vfl certs --demo``);
3. write one TOML config per party and start ``vfl serve`` for each as its own process,
   listening on a port the OS picks;
4. wait for the standard gRPC health service of each to report SERVING, then tell each
   service where its peers listen (admin command, authenticated by its own certificate);
5. make every party PING every other party at the same time, over mutual TLS, with small
   bodies and with a body large enough to be streamed in chunks; PONGs carry a hash;
6. align the bank's and the retailer's rows of the credit data by private set
   intersection (``vfl psi``), each writing the shared row order to its state folder;
7. stop every service with SIGTERM (graceful shutdown) and show what each one logged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from protocols.roles import Party, Role
from protocols.transport.tls import create_demo_pki
from vfl.config import PartyConfig, load_config
from vfl.data.datasets import verify_all
from vfl.service.admin import admin_call
from vfl.service.local import connect_services, start_services, stop_services
from vfl.service.party import AdminCommand

DEMO_PARTIES = (
    Party("bank", Role.GUEST),
    Party("retailer", Role.HOST),
    Party("arbiter", Role.ARBITER),
)
_DATA = {
    "bank": {"credit": "default_credit_hetero_guest.csv", "breast": "breast_hetero_guest.csv"},
    "retailer": {"credit": "default_credit_hetero_host.csv", "breast": "breast_hetero_host.csv"},
    "arbiter": {},
}


def write_demo_setup(out: Path, *, data_folder: Path) -> dict[str, Path]:
    """Certificates and one config per demo party under ``out``; returns config paths."""
    certs = out / "certs"
    create_demo_pki(certs, list(DEMO_PARTIES))
    paths = {}
    for party in DEMO_PARTIES:
        lines = [
            "[party]",
            f'id = "{party.party_id}"',
            f'role = "{party.role.value}"',
            'listen = "127.0.0.1:0"',
            f'state_dir = "state/{party.party_id}"',
            "",
            "[tls]",
            'ca = "certs/ca.pem"',
            f'certificate = "certs/{party.party_id}.pem"',
            f'key = "certs/{party.party_id}.key"',
            "",
        ]
        for peer in DEMO_PARTIES:
            if peer == party:
                continue
            lines += [
                "[[peers]]",
                f'id = "{peer.party_id}"',
                f'role = "{peer.role.value}"',
                'address = "127.0.0.1:0"  # set at start-up by the demo',
                f'certificate = "certs/{peer.party_id}.pem"',
                "",
            ]
        lines.append("[data]")
        lines += [
            f'{alias} = "{data_folder / name}"' for alias, name in _DATA[party.party_id].items()
        ]
        path = out / f"{party.party_id}.toml"
        path.write_text("\n".join(lines) + "\n")
        paths[party.party_id] = path
    return paths


def run_demo(
    out: Path,
    *,
    data_folder: Path,
    echo: Callable[[str], None],
    big_bytes: int = 8 << 20,
) -> dict[str, Any]:
    """Run steps 1-6 of the module docstring; return the ping results per party."""
    echo(f"1. data sets in {data_folder}:")
    for ds in verify_all(folder=data_folder):
        echo(f"   ok  {ds.name:36s} {ds.size / 1e6:7.2f} MB  sha256 {ds.sha256[:12]}...")
    out.mkdir(parents=True, exist_ok=True)
    configs = write_demo_setup(out, data_folder=data_folder)
    echo(f"2. demo CA and certificates for {', '.join(map(str, DEMO_PARTIES))} in {out / 'certs'}")
    parsed = {pid: load_config(path) for pid, path in configs.items()}
    procs = start_services(parsed, logs=out / "logs")
    for pid, proc in procs.items():
        echo(f"3. started `vfl serve --config {pid}.toml` as pid {proc.pid} ({parsed[pid].party})")
    try:
        connect_services(parsed)
        echo("4. all three report SERVING on grpc.health.v1 and know where their peers listen")
        echo("5. every party pings every other party at once (mutual TLS, PONG carries a SHA-256)")
        results = _ping_all(parsed, big_bytes)
        for pid, reply in results.items():
            for r in reply["results"]:
                if "error" in r:
                    echo(f"   {pid:>8} -> {r['peer']:<8} FAILED: {r['error']}")
                else:
                    echo(
                        f"   {pid:>8} -> {r['peer']:<8} {r['rounds']} x {_size(r['bytes']):>8}: "
                        f"median round trip {r['median_rtt_ms']:8.2f} ms, hash verified"
                    )
        echo("6. private set intersection of the bank's and the retailer's credit customers")
        psi = admin_call(
            parsed["bank"],
            AdminCommand.PSI,
            {"peer": "retailer", "data": "credit", "id_column": "id", "job_id": "demo-psi"},
            timeout=600,
        )
        echo(
            f"   {psi['usable_ids']} bank ids, {psi['peer_list_size']} retailer ids -> "
            f"{psi['intersection_size']} shared customers in one row order, "
            f"{psi['seconds']:.1f} s; written to {psi['result_dir']} and at the retailer"
        )
    finally:
        codes = stop_services(procs)
    echo("7. SIGTERM sent; exit codes: " + ", ".join(f"{p}={c}" for p, c in codes.items()))
    for pid in parsed:
        log = (out / "logs" / f"{pid}.log").read_text(errors="replace").splitlines()
        keys = ("PING from", "serving on", "PSI demo-psi", "stopped")
        shown = [ln for ln in log if any(k in ln for k in keys)]
        echo(f"   {pid}.log ({len(log)} lines), e.g.:")
        for line in shown[:2] + shown[-2:]:
            echo(f"     {line[:150]}")
    failed = [r for reply in results.values() for r in reply["results"] if "error" in r]
    if failed or any(codes.values()):
        raise SystemExit("demo failed: see the lines above and the logs in " + str(out / "logs"))
    return results


def _ping_all(configs: Mapping[str, PartyConfig], big_bytes: int) -> dict[str, Any]:
    def one(cfg: PartyConfig) -> dict[str, Any]:
        small = admin_call(cfg, AdminCommand.PING, {"bytes": 1024, "rounds": 5})
        big = admin_call(cfg, AdminCommand.PING, {"bytes": big_bytes, "rounds": 2})
        return {"party": cfg.party.party_id, "results": small["results"] + big["results"]}

    with ThreadPoolExecutor(len(configs)) as pool:
        futures = {pid: pool.submit(one, cfg) for pid, cfg in configs.items()}
        return {pid: f.result() for pid, f in futures.items()}


def _size(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"
