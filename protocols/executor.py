"""One interface for every heavy parallel path: PSI hashing and masking, Paillier products,
obfuscator generation, the arbiter's decryptions.

Backends (:class:`Backend`, chosen by the party config's ``[executor]`` table, built by
:func:`make_executor`): ``local``, a process pool on this machine (the default; needs
nothing else), and ``ray``, long-lived actors on the silo's own Ray cluster
(:mod:`protocols.ray_executor`; optional extra ``vfl-engine[ray]``).

Work is a list of chunks; :meth:`Executor.map` applies a top-level function to each
chunk and returns the results **in chunk order**, whatever order workers finish in.
A chunk whose worker died (killed, out of memory) is retried on a fresh pool; the map
gives up after ``retries`` consecutive pool failures in which no chunk completed (a dead
worker takes its pool down, so the innocent chunks of that pool are retried too, and
no single chunk can be blamed). An exception raised by the function itself is a bug or bad input
and propagates at once. Chunks and results are pickled between this party's own
processes only; nothing a peer sent is ever unpickled here (callers parse peer bytes
into integers first). ``gmpy2`` does not speed up with threads, hence processes.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from protocols.errors import ConfigError, VflError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class ExecutorError(VflError):
    """A chunk failed even after its retries."""


def split(count: int, parts: int) -> list[range]:
    """Split ``range(count)`` into at most ``parts`` contiguous, nearly equal ranges."""
    parts = max(1, min(parts, count))
    size, extra = divmod(count, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        if stop > start:
            out.append(range(start, stop))
        start = stop
    return out


X = TypeVar("X")


def fill_window(
    in_flight: deque[X], source: Iterator[T], window: int, submit: Callable[[T], X]
) -> None:
    """Submit chunks from ``source`` until ``window`` are in flight or it runs out."""
    while len(in_flight) < window:
        try:
            chunk = next(source)
        except StopIteration:
            return
        in_flight.append(submit(chunk))


class Executor(ABC):
    """Runs chunks of work; see the module docstring."""

    @property
    @abstractmethod
    def workers(self) -> int:
        """How many chunks run at once."""

    @abstractmethod
    def map(self, fn: Callable[[T], R], chunks: Sequence[T]) -> list[R]:
        """``[fn(c) for c in chunks]``, computed in parallel, in chunk order."""

    def imap(
        self, fn: Callable[[T], R], chunks: Iterable[T], *, window: int | None = None
    ) -> Iterator[R]:
        """Like :meth:`map` but lazy: at most ``window`` chunks in flight, results in order.

        For streams whose chunks are produced or consumed as they go (PSI messages).
        """
        for chunk in chunks:
            yield fn(chunk)

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the workers."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs every chunk in the calling process (tests, tiny work)."""

    @property
    def workers(self) -> int:
        return 1

    def map(self, fn: Callable[[T], R], chunks: Sequence[T]) -> list[R]:
        return [fn(c) for c in chunks]


class LocalProcessExecutor(Executor):
    """A local process pool (the default backend).

    Parameters
    ----------
    workers
        Number of worker processes (default: the CPU count).
    retries
        How many consecutive fruitless pool failures are retried before giving up.
    start_method
        ``"forkserver"`` (default; safe beside gRPC's threads) or ``"spawn"``.
    nice
        Added to the workers' nice value: background work (e.g. filling obfuscator pools)
        then only uses CPU time the protocol's critical path leaves idle.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        retries: int = 2,
        start_method: str = "forkserver",
        nice: int = 0,
    ) -> None:
        self._workers = workers or os.cpu_count() or 1
        if self._workers < 1 or retries < 0:
            raise ConfigError("executor needs at least one worker and a non-negative retry count")
        self._retries = retries
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(["gmpy2", "numpy", "protocols.crypto.paillier"])
        self._pool: ProcessPoolExecutor | None = None
        self._nice = nice

    @property
    def workers(self) -> int:
        return self._workers

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=self._context,
                initializer=functools.partial(os.nice, self._nice) if self._nice else None,
            )
        return self._pool

    def map(self, fn: Callable[[T], R], chunks: Sequence[T]) -> list[R]:
        results: dict[int, R] = {}
        pending = list(range(len(chunks)))
        fruitless = 0
        while pending:
            pool = self._get_pool()
            futures: dict[int, Future[Any]] = {i: pool.submit(fn, chunks[i]) for i in pending}
            broken: list[int] = []
            for i, future in futures.items():
                try:
                    results[i] = future.result()
                except BrokenProcessPool:
                    broken.append(i)
            if broken:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                fruitless = fruitless + 1 if len(broken) == len(pending) else 0
                if fruitless > self._retries:
                    raise ExecutorError(
                        f"{len(broken)} of {len(chunks)} chunks failed: worker processes died "
                        f"{fruitless} times in a row without progress (killed or out of memory?)"
                    )
                logger.warning("a worker died; retrying %d chunk(s) on a fresh pool", len(broken))
            pending = broken
        return [results[i] for i in range(len(chunks))]

    def imap(
        self, fn: Callable[[T], R], chunks: Iterable[T], *, window: int | None = None
    ) -> Iterator[R]:
        window = window or 2 * self._workers
        source = iter(chunks)
        in_flight: deque[tuple[T, Future[Any]]] = deque()
        fruitless = 0
        while True:
            fill_window(in_flight, source, window, lambda c: (c, self._get_pool().submit(fn, c)))
            if not in_flight:
                return
            chunk, future = in_flight[0]
            try:
                result = future.result()
            except BrokenProcessPool:
                fruitless += 1
                if fruitless > self._retries:
                    raise ExecutorError(
                        f"worker processes died {fruitless} times in a row without progress "
                        "(killed or out of memory?)"
                    ) from None
                logger.warning(
                    "a worker died; resubmitting %d chunk(s) on a fresh pool", len(in_flight)
                )
                broken = self._pool
                self._pool = None
                if broken is not None:
                    broken.shutdown(wait=False, cancel_futures=True)
                pool = self._get_pool()
                in_flight = deque((c, pool.submit(fn, c)) for c, _ in in_flight)
                continue
            fruitless = 0
            in_flight.popleft()
            yield result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class Backend(StrEnum):
    """Where a party's heavy parallel work runs."""

    LOCAL = "local"
    RAY = "ray"


@dataclass(frozen=True)
class ExecutorSettings:
    """A party's ``[executor]`` table.

    Attributes
    ----------
    backend
        ``local`` (process pool, default) or ``ray`` (the silo's Ray cluster).
    workers
        Local processes or Ray actors (default: this machine's / the cluster's CPUs).
    ray_address
        The Ray cluster's head, ``host:port`` (``ray`` only; ``"auto"``: the cluster this
        machine joined with ``ray start``).
    allow_plaintext_cluster
        Accept a Ray cluster without TLS (``RAY_USE_TLS``); logs a warning.
    """

    backend: Backend = Backend.LOCAL
    workers: int | None = None
    ray_address: str = "auto"
    allow_plaintext_cluster: bool = False

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"executor.workers must be at least 1, got {self.workers}")


def make_executor(settings: ExecutorSettings, *, nice: int = 0) -> Executor:
    """The executor ``settings`` name (``nice`` applies to local worker processes only)."""
    if settings.backend is Backend.RAY:
        from protocols.ray_executor import RayExecutor

        return RayExecutor(
            address=settings.ray_address,
            workers=settings.workers,
            allow_plaintext_cluster=settings.allow_plaintext_cluster,
        )
    return LocalProcessExecutor(workers=settings.workers, nice=nice)
