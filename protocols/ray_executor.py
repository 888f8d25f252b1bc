"""The ``ray`` backend of :class:`~protocols.executor.Executor`: a silo's own Ray cluster.

Roles: one party (G, H or A) is the Ray *driver*; the silo's cluster (a head node and worker
nodes, all inside the silo) runs its chunks. Parties never talk to each other through Ray:
each keeps speaking only through its own gRPC service. Ray is an optional extra
(``pip install 'vfl-engine[ray]'``); nothing here imports it until a backend is built.

Who holds what: the driver sends each chunk's arguments to the cluster, so every node sees
what a local worker process would see: for PSI the run's ephemeral X25519 key and the
ids' hashes, for Paillier work public keys and ciphertexts. The arbiter's private key is
never sent: without Ray TLS the arbiter decrypts in its own processes; with it, its actors
load the key from the arbiter's key file themselves (:class:`protocols.arbiter.service.
ArbiterService`, ``key_file``). Without Ray TLS (``RAY_USE_TLS=1`` on every node) chunks
cross the silo's network unencrypted, so a cluster without TLS needs
``allow_plaintext_cluster``, which logs a warning.

Steps (the code comments cite them):

1. Connect to the cluster named in the party config (``ray.init(address=...)``) once per
   process and start ``workers`` long-lived actors, one CPU each (default: one per free
   CPU of the cluster). Per-job state that is expensive to derive (the fixed-base table of
   the obfuscator base ``h_s``, about 110 MB at 2048 bits; the CRT constants of a key the
   arbiter's actor loaded) is built once per actor by the chunk functions' per-process
   caches and kept for the actor's life, while the key itself (768 bytes) rides along with
   each chunk; the per-step fixed-base tables of a product are built inside the actor that
   runs the chunk.
2. Each chunk goes to the actor with the fewest chunks in flight (at most ``depth`` each).
   Chunks and results up to ``INLINE_BYTES`` travel inside the task messages
   (``RAY_max_direct_call_object_size``, set for this driver here and for the nodes by
   whoever starts them): through Ray's object store a PSI chunk of 128 KB between two
   nodes took 50-280 ms here, inline about 1 ms.
3. Results are assembled **by chunk index**, never by completion order, so a run is
   bit-identical to the ``local`` backend's.
4. A chunk whose actor died (process killed, node lost, out of memory) is resubmitted to
   another actor; Ray restarts the dead actor in the background. A chunk that has failed
   ``retries + 1`` times stops the map with :class:`~protocols.executor.ExecutorError`. An
   exception raised by the chunk function itself is re-raised at once, as itself.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any, TypeVar

from protocols.errors import ConfigError, InsecureConfigError
from protocols.executor import Executor, ExecutorError, fill_window

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

NAMESPACE = "vfl-engine"
INLINE_BYTES = 8 << 20
INLINE_ENV = "RAY_max_direct_call_object_size"
_TLS_ON = {"1", "true", "yes"}
_connect_lock = threading.Lock()


def import_ray() -> ModuleType:
    """The ``ray`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "executor backend 'ray' needs Ray, which is not installed: run "
            "pip install 'vfl-engine[ray]' on this machine and on every node of the silo's "
            'Ray cluster (or set [executor] backend = "local")'
        ) from None
    return ray


def ray_tls_on() -> bool:
    """Whether this process was started with Ray TLS (``RAY_USE_TLS``)."""
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in _TLS_ON


class ChunkWorker:
    """A long-lived actor: runs chunk functions; its per-process caches outlive the chunks."""

    def run(self, fn: Callable[[Any], Any], chunk: Any) -> Any:
        """``fn(chunk)`` in this actor's process."""
        return fn(chunk)

    def pid(self) -> int:
        """This actor's process id (tests kill it)."""
        return os.getpid()


def connect(address: str, *, allow_plaintext_cluster: bool) -> ModuleType:
    """Step 1: join the silo's Ray cluster as a driver (once per process)."""
    ray = import_ray()
    if not ray_tls_on():
        if not allow_plaintext_cluster:
            raise InsecureConfigError(
                f"the Ray cluster at {address} would carry PSI keys and ciphertexts without "
                "TLS: start every node and this party with RAY_USE_TLS=1 and "
                "RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY, RAY_TLS_CA_CERT, or set "
                "[executor] allow_plaintext_cluster = true for a cluster on a trusted network"
            )
        logger.warning(
            "Ray TLS is off: chunks for the cluster at %s (PSI keys, ciphertexts) cross the "
            "silo's network unencrypted (allow_plaintext_cluster = true)",
            address,
        )
    with _connect_lock:
        if not ray.is_initialized():
            os.environ.setdefault(INLINE_ENV, str(INLINE_BYTES))  # step 2
            ray.init(
                address=address,
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
    return ray


class RayExecutor(Executor):
    """Chunks on long-lived actors of the silo's Ray cluster (see the module docstring).

    Parameters
    ----------
    address
        The cluster's head, ``host:port`` of its GCS (``ray start --head --port ...``),
        or ``"auto"`` for the cluster this machine's ``ray start`` joined.
    workers
        Actors to start, one CPU each (default: every free CPU of the cluster).
    startup_timeout
        How long to wait for every actor to run before saying the cluster is too small.
    retries
        Resubmissions of one chunk after its actor died.
    depth
        Chunks queued at one actor at a time (hides the round trip between chunks).
    allow_plaintext_cluster
        Accept a cluster without Ray TLS (logs a warning).
    """

    def __init__(
        self,
        *,
        address: str,
        workers: int | None = None,
        retries: int = 2,
        depth: int = 2,
        allow_plaintext_cluster: bool = False,
        startup_timeout: float = 120.0,
    ) -> None:
        if (workers is not None and workers < 1) or retries < 0 or depth < 1:
            raise ConfigError("executor needs at least one worker and a non-negative retry count")
        self._ray = connect(address, allow_plaintext_cluster=allow_plaintext_cluster)
        free = int(self._ray.available_resources().get("CPU", 0))
        if workers is None and free < 1:
            raise ConfigError(
                f"the Ray cluster at {address} has no free CPU for this party's workers "
                "(see `ray status`; another driver may hold them)"
            )
        self._workers = workers or free
        self._retries = retries
        self._depth = depth
        remote = self._ray.remote(ChunkWorker).options(
            num_cpus=1, max_restarts=-1, max_task_retries=0
        )
        self._actors = [remote.remote() for _ in range(self._workers)]  # step 1
        self._load = [0] * self._workers
        self._lock = threading.Lock()
        self._death = self._death_errors()
        try:
            self.pids(timeout=startup_timeout)
        except self._ray.exceptions.GetTimeoutError:
            self.close()
            raise ConfigError(
                f"the Ray cluster at {address} did not start {self._workers} workers of one "
                f"CPU each within {startup_timeout:.0f} s: `ray status` shows what it has free; "
                "lower [executor] workers or add nodes"
            ) from None
        logger.info("Ray executor: %d actors (%d CPUs were free)", self._workers, free)

    @property
    def workers(self) -> int:
        return self._workers

    def pids(self, *, timeout: float | None = None) -> list[int]:
        """The actors' process ids, in actor order (waits until every actor runs)."""
        refs = [a.pid.remote() for a in self._actors]
        return [int(p) for p in self._ray.get(refs, timeout=timeout)]

    def _death_errors(self) -> tuple[type[BaseException], ...]:
        exc = self._ray.exceptions
        names = ("RayActorError", "ActorUnavailableError", "WorkerCrashedError", "ObjectLostError")
        return tuple(getattr(exc, name) for name in names if hasattr(exc, name))

    def _submit(self, fn: Callable[[Any], Any], chunk: Any, *, avoid: int = -1) -> tuple[Any, int]:
        """Step 2: to the least loaded actor (not ``avoid`` if there is another)."""
        with self._lock:
            order = sorted(range(self._workers), key=lambda i: (i == avoid, self._load[i]))
            index = order[0]
            self._load[index] += 1
        return self._actors[index].run.remote(fn, chunk), index

    def _collect(self, ref: Any, index: int) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, None)`` when the actor died (step 4)."""
        try:
            return True, self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:  # the function's own exception
            cause = exc.cause
            raise (cause if isinstance(cause, BaseException) else exc) from None
        except self._death:
            logger.warning("a Ray worker died; its chunk is resubmitted to another worker")
            return False, None
        finally:
            with self._lock:
                self._load[index] -= 1

    def _give_up(self, tries: int) -> ExecutorError:
        return ExecutorError(
            f"a chunk's Ray worker died {tries} times (killed, node lost or out of memory?); "
            "check the cluster with `ray status`"
        )

    def map(self, fn: Callable[[T], R], chunks: Sequence[T]) -> list[R]:
        return list(self.imap(fn, chunks))

    def imap(
        self, fn: Callable[[T], R], chunks: Iterable[T], *, window: int | None = None
    ) -> Iterator[R]:
        window = window or self._workers * self._depth
        source = iter(chunks)
        # (chunk, ref, actor index, failures so far), in chunk order (step 3)
        in_flight: deque[tuple[T, Any, int, int]] = deque()
        try:
            while True:
                fill_window(in_flight, source, window, lambda c: (c, *self._submit(fn, c), 0))
                if not in_flight:
                    return
                chunk, ref, index, failures = in_flight.popleft()
                ok, result = self._collect(ref, index)
                if not ok:  # step 4
                    if failures + 1 > self._retries:
                        raise self._give_up(failures + 1)
                    resubmitted = (chunk, *self._submit(fn, chunk, avoid=index), failures + 1)
                    in_flight.appendleft(resubmitted)
                    continue
                yield result
        finally:  # abandoned chunks (an error, or the caller stopped reading)
            with self._lock:
                for _, _, index, _ in in_flight:
                    self._load[index] -= 1

    def close(self) -> None:
        for actor in self._actors:
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001 - the cluster may already be gone
                logger.debug("could not stop a Ray actor", exc_info=True)
        self._actors = []
