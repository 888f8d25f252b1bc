"""Run the Flower half of the FedAvg benchmark: a real Flower deployment on localhost.

Importable from ``benchmarks/fedavg.py`` under the project's venv: this module never imports
flwr. Flower lives in its own virtualenv (``benchmarks/.flower-venv``, created on first use),
because flwr needs protobuf < 7 while the engine needs protobuf >= 7.

:func:`run_flower` starts, as local processes with their own process groups,

* one SuperLink: ``flower-superlink --insecure --host 127.0.0.1 --port P
  --disable-runtime-dependency-installation``,
* three SuperNodes: ``flower-supernode --insecure --superlink 127.0.0.1:P --host 127.0.0.1
  --port Qi --node-config 'partition-id=i num-partitions=3'``,

then ``flwr run benchmarks/flower_app bench --stream --run-config <work>/flower_home/run.toml``
(``work-dir`` and ``repo-root``), with ``FLWR_HOME=<work>/flower_home`` so that nothing is
written to ``~/.flwr``. The app (``benchmarks/flower_app``) writes ``flower_rounds.json`` and
``flower_final.npz`` into ``work``; logs are kept in ``work/flower_logs``. Every process is
ended at the end, also on error or timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
FLOWER_VENV = ROOT / "benchmarks" / ".flower-venv"
FLOWER_APP = ROOT / "benchmarks" / "flower_app"
FLWR_VERSION = "1.42.0"  # newest flwr that installs with protobuf<7 and cryptography<51
TORCH_VERSION = "2.13.0"  # the CPU build that pip takes from a local file on these machines
NUM_CLIENTS = 3
INPUTS = ("config.json", "init.npz", *(f"client{i}.npz" for i in range(NUM_CLIENTS)))
_READY = FLOWER_VENV / ".ready"
_READY_TEXT = f"torch=={TORCH_VERSION} flwr=={FLWR_VERSION}\n"


def _venv_python() -> Path:
    return FLOWER_VENV / "bin" / "python"


def ensure_venv() -> Path:
    """The Flower venv's python, creating the venv on first use (idempotent, fast when present).

    torch is installed first and alone: any torch request other than ``torch==2.13.0`` would
    download a multi-GB CUDA build. flwr does not depend on torch; it is installed second,
    with torch pinned again so that pip never replaces it.
    """
    python = _venv_python()
    if python.exists() and _READY.is_file() and _READY.read_text() == _READY_TEXT:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(
        [
            *pip,
            f"torch=={TORCH_VERSION}",
            f"flwr=={FLWR_VERSION}",
            "numpy",
            "protobuf<7",
            "cryptography<51",
        ],
        check=True,
    )
    subprocess.run(
        [str(python), "-c", "import flwr.serverapp, flwr.clientapp, numpy, torch"], check=True
    )
    _READY.write_text(_READY_TEXT)
    return python


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now (bound to 0, then released)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (or a note that it is missing)."""
    if not path.is_file():
        return f"[{path.name}: missing]"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return f"[{path}, last {min(lines, len(text))} lines]\n" + "\n".join(text[-lines:])


class _Processes:
    """Processes started in their own sessions, with their logs; ended with all descendants."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout and stderr going to ``logs/<name>.log``."""
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.logs,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        """The log file of process ``name``."""
        return self.logs / f"{name}.log"

    def check_alive(self, *names: str) -> None:
        """Raise if one of the named processes has exited."""
        for name in names:
            code = self.procs[name].poll()
            if code is not None:
                raise RuntimeError(f"{name} exited with {code}\n{_tail(self.log(name))}")

    def stop_all(self) -> None:
        """End every started process and all its descendants: SIGTERM, then SIGKILL after 10 s.

        Flower's own children (SuperExec, ServerApp, ClientApp processes) are found through
        /proc before anything is signalled: the SuperLink's SuperExec starts a session of its
        own, so process groups do not cover it, and orphans would be reparented.
        """
        leaders = [proc.pid for proc in self.procs.values() if proc.poll() is None]
        tree = _descendants(leaders)
        for pid, started in tree.items():
            _signal(pid, started, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for proc in self.procs.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(_alive(p, t) for p, t in tree.items()):
            time.sleep(0.1)
        # Anything left, and anything those started meanwhile.
        left = [pid for pid, started in tree.items() if _alive(pid, started)]
        for pid, started in {**tree, **_descendants(left)}.items():
            _signal(pid, started, signal.SIGKILL)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.wait(timeout=10.0)
        for file in self._files:
            file.close()


def _stat(pid: int) -> tuple[str, int, int] | None:
    """State, parent pid and start time (clock ticks after boot) of ``pid`` from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _descendants(roots: list[int]) -> dict[int, int]:
    """``roots`` and all their live descendants, each with its start time."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            stats[int(entry)] = stat
            children.setdefault(stat[1], []).append(int(entry))
    out: dict[int, int] = {}
    todo = [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out[pid] = stats[pid][2]
            todo.extend(children.get(pid, []))
    return out


def _alive(pid: int, started: int) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` and not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] not in {"Z", "X"}


def _signal(pid: int, started: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid`` if it is still the process we found (not a reused pid)."""
    if _alive(pid, started):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@contextmanager
def _processes(logs: Path, env: dict[str, str]) -> Iterator[_Processes]:
    procs = _Processes(logs, env)
    try:
        yield procs
    finally:
        procs.stop_all()


def _wait_port(port: int, procs: _Processes, name: str, timeout_s: float) -> None:
    """Wait until ``127.0.0.1:port`` accepts connections, failing early if ``name`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check_alive(name)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"{name} did not listen on {port} in {timeout_s:.0f} s\n{_tail(procs.log(name))}"
    )


def _wait_registered(procs: _Processes, names: list[str], timeout_s: float) -> None:
    """Wait until every SuperNode has logged its node id (it is then registered)."""
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending and time.monotonic() < deadline:
        procs.check_alive("superlink", *pending)
        pending = [
            name
            for name in pending
            if "SuperNode ID" not in procs.log(name).read_text(encoding="utf-8", errors="replace")
        ]
        if pending:
            time.sleep(0.1)
    if pending:
        raise RuntimeError(
            f"{', '.join(pending)} did not register in {timeout_s:.0f} s\n"
            + "\n".join(_tail(procs.log(name)) for name in pending)
        )


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON escaping is valid TOML for these)."""
    return json.dumps(value)


def _flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower process: its own FLWR_HOME and venv, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "VIRTUAL_ENV": str(FLOWER_VENV),
            "PATH": str(FLOWER_VENV / "bin") + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
            "COLUMNS": "200",
        }
    )
    return env


def run_flower(work: Path, *, timeout_s: float = 1800) -> dict[str, Any]:
    """Run the Flower FedAvg on the inputs in ``work`` and return its timings and metrics.

    Parameters
    ----------
    work
        Holds ``client{0,1,2}.npz``, ``init.npz`` and ``config.json``; receives
        ``flower_rounds.json``, ``flower_final.npz``, ``flower_logs/`` and ``flower_home/``.
    timeout_s
        Limit for the whole run, setup included.

    Returns
    -------
    dict
        ``flwr_version``; ``round_end_s`` (end of each round, relative to the start of round
        1); ``round_wall_s`` (``end(r) - end(r-1)`` for r = 2..R) and its median
        ``round_wall_median_s``; ``val_auc`` and ``val_loss`` per round (weighted by
        validation rows); ``final_params`` (path of ``flower_final.npz``); ``total_s`` (wall
        time of ``flwr run``); ``setup_s`` (starting the SuperLink and the SuperNodes until
        all are registered); ``log_dir``.

    Raises
    ------
    RuntimeError
        When a process fails or the run times out; the message has the tail of the
        relevant logs.
    """
    work = Path(work).resolve()
    missing = [name for name in INPUTS if not (work / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing in {work}: {', '.join(missing)}")
    bin_dir = ensure_venv().parent
    start = time.monotonic()

    logs = work / "flower_logs"
    home = work / "flower_home"
    for folder in (logs, home):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    rounds_file = work / "flower_rounds.json"
    final_file = work / "flower_final.npz"
    for stale in (rounds_file, final_file):
        stale.unlink(missing_ok=True)

    link_port, *node_ports = _free_ports(1 + NUM_CLIENTS)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    run_config = home / "run.toml"
    run_config.write_text(
        f"work-dir = {_toml_string(str(work))}\nrepo-root = {_toml_string(str(ROOT))}\n",
        encoding="utf-8",
    )

    with _processes(logs, _flower_env(home)) as procs:
        t_setup = time.time()
        procs.start(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        _wait_port(link_port, procs, "superlink", timeout_s=min(120.0, timeout_s))
        nodes = [f"supernode{i}" for i in range(NUM_CLIENTS)]
        for i, (name, port) in enumerate(zip(nodes, node_ports, strict=True)):
            procs.start(
                name,
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={i} num-partitions={NUM_CLIENTS}",
                ],
            )
        _wait_registered(procs, nodes, timeout_s=min(120.0, timeout_s))
        setup_s = time.time() - t_setup

        t_run = time.time()
        run = procs.start(
            "flwr_run",
            [
                str(bin_dir / "flwr"),
                "run",
                str(FLOWER_APP),
                "bench",
                "--stream",
                "--run-config",
                str(run_config),
            ],
        )
        remaining = timeout_s - (time.monotonic() - start)
        try:
            code = run.wait(timeout=max(1.0, remaining))
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"Flower run timed out after {timeout_s:.0f} s\n"
                + _tail(procs.log("flwr_run"))
                + "\n"
                + _tail(procs.log("superlink"))
            ) from None
        total_s = time.time() - t_run
        if code != 0:
            raise RuntimeError(
                f"flwr run exited with {code}\n"
                + _tail(procs.log("flwr_run"))
                + "\n"
                + _tail(procs.log("superlink"))
            )
        record = _read_record(rounds_file)
        rounds = len(record.get("round_end", []))
        complete = rounds > 0 and all(
            record.get(key) == [NUM_CLIENTS] * rounds
            for key in ("train_replies", "evaluate_replies")
        )
        if not (record.get("done") and complete and final_file.is_file()):
            raise RuntimeError(
                "the Flower run ended without its results\n"
                + _tail(procs.log("flwr_run"))
                + "\n"
                + _tail(procs.log("superlink"))
                + "\n"
                + "\n".join(_tail(procs.log(name), 15) for name in nodes)
            )

    start_r1 = float(record["round1_start"])
    ends = [float(t) - start_r1 for t in record["round_end"]]
    walls = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "flwr_version": str(record["flwr_version"]),
        "round_end_s": ends,
        "round_wall_s": walls,
        "round_wall_median_s": statistics.median(walls) if walls else float("nan"),
        "val_auc": record["val_auc"],
        "val_loss": record["val_loss"],
        "final_params": str(final_file),
        "total_s": total_s,
        "setup_s": setup_s,
        "log_dir": str(logs),
    }


def _read_record(path: Path) -> dict[str, Any]:
    """The ServerApp's ``flower_rounds.json`` (empty when missing or unreadable)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


if __name__ == "__main__":
    print(json.dumps(run_flower(Path(sys.argv[1])), indent=1))
