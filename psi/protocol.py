"""ECDH private set intersection between guest and host (docs/protocol.md §3.3-3.5).

Roles and keys: the guest G (label holder) starts the run and chooses the 16-byte salt
(= run id); G and H each draw an ephemeral X25519 key ``k_G``, ``k_H`` for this run only.
The arbiter takes no part.

What each party learns (§3.5), by mode:

* ``BOTH`` (default): G learns the intersection ``I`` and ``|Y'|``; H learns which of its
  rows are in ``I`` and ``|X'|``. Both get the same row order.
* ``GUEST_ONLY``: G learns ``I`` and ``|Y'|``; H learns ``|X'|`` only.
* ``CARDINALITY``: G learns ``|I|`` and ``|Y'|`` only (H shuffles ``D_G``); H learns ``|X'|``.

With ``pad_to = N_max`` both lists are padded with dummy points, so only ``N_max`` shows.

Steps (code comments cite them):

0. G → H ``HELLO`` {run id, mode, id type, canonicalisation version, padding, size, and
   for a host service the data alias it asks for}; H → G ``HELLO_ACK`` {accept or a
   peer-safe reason, its size}. H's service decides, under its own ``[psi]`` policy,
   which id column, timestamp column and duplicates policy it uses, which modes it
   serves and the least padding it accepts; the guest only chooses among what H allows
   (docs/protocol.md §3.4.1).
1. H → G ``A_H`` = shuffled ``M_kH(u(c))`` of its ids plus dummies, in chunks;
1'. G → H ``A_G`` likewise (concurrently).
2. H → G ``D_G[i] = M_kH(A_G[i])``, same order (shuffled in ``CARDINALITY``), streamed
   as the chunks of ``A_G`` arrive.
3. G: ``D_H = M_kG(A_H)``; matches are the values in both ``D_G`` and ``D_H``; the shared
   row order sorts matches by their 32-byte doubly-masked value.
4. G → H ``RESULT`` (``BOTH`` only): H's positions in ``A_H``, in the shared order.

Every received list is validated (32-byte canonical points, no duplicates, announced
sizes); lists travel in chunks of at most 65,536 points, and hashing and masking run
in the executor's worker processes while chunks stream, so memory grows linearly.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from protocols.envelope import ControlBlock, Envelope, IndexBlock, PointBlock
from protocols.errors import (
    AlignmentError,
    ConfigError,
    InvalidPointError,
    MalformedEnvelopeError,
    VflError,
    peer_reason,
)
from protocols.executor import Executor
from protocols.link import JobLink
from protocols.roles import Party
from protocols.transport.base import Channel
from psi import ecdh
from psi.canon import CANON_VERSION, IdType, PreparedIds

logger = logging.getLogger(__name__)

MAX_CHUNK_POINTS = 65_536


class PsiMode(StrEnum):
    """Who learns what (§3.5)."""

    BOTH = "both"
    GUEST_ONLY = "guest_only"
    CARDINALITY = "cardinality"


class PsiTag(StrEnum):
    """Message tags of the PSI."""

    HELLO = "psi.HELLO"
    HELLO_ACK = "psi.HELLO_ACK"
    A_H = "psi.A_H"
    A_G = "psi.A_G"
    D_G = "psi.D_G"
    RESULT = "psi.RESULT"
    ABORT = "psi.ABORT"


@dataclass(frozen=True)
class PsiOptions:
    """Parameters of one run (the guest's choice; sent to the host in ``HELLO``)."""

    mode: PsiMode = PsiMode.BOTH
    pad_to: int | None = None
    chunk_points: int = MAX_CHUNK_POINTS
    task_points: int = 4096
    timeout: float = 3600.0

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_points <= MAX_CHUNK_POINTS:
            raise ConfigError(f"PSI chunk_points must lie in [1, {MAX_CHUNK_POINTS}]")
        if self.task_points < 1 or (self.pad_to is not None and self.pad_to < 1):
            raise ConfigError("PSI task_points and pad_to must be positive")


@dataclass(frozen=True)
class PsiResult:
    """One party's outcome. ``rows`` are indices into its own input rows, in the shared
    order (``None`` where this party learns no intersection)."""

    role: str
    mode: PsiMode
    run_id: str
    intersection_size: int | None
    rows: np.ndarray | None
    own_list_size: int
    peer_list_size: int
    summary: dict[str, Any] = field(default_factory=dict)
    # GUEST_ONLY, for batch scoring (§5.2): at G, the position in ``A_H`` of each row's
    # match; at H, its own input row at each position of ``A_H`` (-1: a padding dummy)
    peer_positions: np.ndarray | None = None
    list_rows: np.ndarray | None = None

    def require_shared(self, *, detail: str = "") -> None:
        """Raise :class:`AlignmentError` if this party learned an empty intersection: there
        is nothing to train on (``detail``, e.g. counts, is added to the message only)."""
        if self.intersection_size == 0:
            extra = f"; {detail}" if detail else ""
            raise AlignmentError(NO_SHARED_CUSTOMERS + extra, public=NO_SHARED_CUSTOMERS)


NO_SHARED_CUSTOMERS = (
    "no shared customers: the two parties' ids have no value in common (check id_type and "
    "the id columns)"
)

# ---------------------------------------------------------------------------
# shared helpers


class _Run:
    """State both sides share: channel, peer, ids, key, permutation of list positions."""

    def __init__(
        self,
        *,
        channel: Channel,
        peer: Party,
        job_id: str,
        ids: PreparedIds,
        executor: Executor,
        options: PsiOptions,
        salt: bytes,
    ) -> None:
        self.channel = channel
        self.peer = peer
        self.job_id = job_id
        self.link = JobLink(
            channel=channel, job_id=job_id, run_id=salt.hex(), timeout=options.timeout
        )
        self.ids = ids
        self.executor = executor
        self.options = options
        self.salt = salt
        self.run_id = salt.hex()
        self.key = ecdh.new_key()
        n_real = len(ids.canonical)
        size = options.pad_to or n_real
        if n_real > size:
            raise AlignmentError(
                f"{n_real} ids exceed the agreed padding size {size}",
                public=f"the set is larger than the agreed padding pad_to = {size}",
            )
        self.size = size
        self.n_real = n_real
        # a uniformly random order of list positions from the OS CSPRNG (ties: negligible)
        keys = np.frombuffer(os.urandom(8 * size), dtype="<u8")
        self.perm = np.argsort(keys, kind="stable")  # position -> item (items >= n_real: dummies)
        self.sender_error: list[BaseException] = []

    def recv(self, tag: PsiTag, step: int) -> Envelope:
        """Wait for one message, failing fast if the peer aborts or our sender failed."""
        deadline = time.monotonic() + self.options.timeout
        while True:
            if self.sender_error:
                raise AlignmentError("PSI stopped: sending our list failed") from self.sender_error[
                    0
                ]
            try:
                return self.link.recv(self.peer, tag, step, timeout=0.2)
            except TimeoutError:
                pass
            try:
                abort = self.link.recv(self.peer, PsiTag.ABORT, 0, timeout=0)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"PSI {self.job_id}: no {tag} chunk {step} from {self.peer} within "
                        f"{self.options.timeout:.0f} s"
                    ) from None
                continue
            reason = (
                abort.body.obj().get("reason", "") if isinstance(abort.body, ControlBlock) else ""
            )
            raise AlignmentError(f"{self.peer} aborted the PSI: {reason}")

    def result(
        self,
        role: str,
        size: int | None,
        rows: np.ndarray | None,
        *,
        peer_size: int,
        started: float,
        peer_positions: np.ndarray | None = None,
        list_rows: np.ndarray | None = None,
    ) -> PsiResult:
        """This party's outcome with its summary (counts only)."""
        summary: dict[str, Any] = {
            **self.ids.summary(),
            "own_list_size": self.size,
            "peer_list_size": peer_size,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if size is not None:
            summary["intersection_size"] = size
        return PsiResult(
            role=role,
            mode=self.options.mode,
            run_id=self.run_id,
            intersection_size=size,
            rows=rows,
            own_list_size=self.size,
            peer_list_size=peer_size,
            summary=summary,
            peer_positions=peer_positions,
            list_rows=list_rows,
        )

    def abort(self, reason: str) -> None:
        """Tell the peer we stopped (best effort), so it does not wait for its timeout, and
        drop this run's unread chunks and any still arriving (they would otherwise hold the
        peer's queue budget here, docs/protocol.md §2.9.1)."""
        try:
            self.link.send(self.peer, PsiTag.ABORT, 0, {"reason": reason[:300]})
        except Exception:  # noqa: BLE001 - the original error matters more
            logger.debug("could not send PSI ABORT to %s", self.peer)
        self.channel.abort_run(self.job_id, self.run_id)

    def start_sender(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Run ``fn`` in a thread; the returned function joins it and re-raises its error."""

        def target() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.sender_error.append(exc)

        thread = threading.Thread(target=target, name="psi-send", daemon=True)
        thread.start()

        def join() -> None:
            thread.join()
            if self.sender_error:
                raise self.sender_error[0]

        return join

    def own_list(self) -> Iterator[bytes]:
        """Steps 1 / 1': the masked, shuffled own list, chunk by chunk."""
        prefix = ecdh.dst(self.ids.id_type.value) + self.salt
        canonical = self.ids.canonical
        cut = self.options.chunk_points * ecdh.POINT_BYTES
        task = self.options.task_points

        def tasks() -> Iterator[tuple[bytes, bytes, list[bytes | None]]]:
            for start in range(0, self.size, task):
                items = self.perm[start : start + task]
                yield self.key, prefix, [canonical[i] if i < self.n_real else None for i in items]

        yield from _rechunk(self.executor.imap(ecdh.hash_and_mask_chunk, tasks()), cut)

    def send_list(self, tag: PsiTag, chunks: Iterator[bytes]) -> None:
        for step, chunk in enumerate(chunks):
            self.link.send(self.peer, tag, step, PointBlock(chunk))

    def recv_list(self, tag: PsiTag, count: int) -> Iterator[bytes]:
        """Receive and validate the chunks of a list of ``count`` points."""
        chunks = max(1, math.ceil(count / self.options.chunk_points))
        started = time.monotonic()
        reported = 0
        for step in range(chunks):
            env = self.recv(tag, step)
            if not isinstance(env.body, PointBlock):
                raise MalformedEnvelopeError(f"{tag} chunk {step} carries no points")
            expected = min(self.options.chunk_points, count - step * self.options.chunk_points)
            # duplicates are checked over the whole list once it is in (_sorted_unique)
            ecdh.validate(
                env.body.data,
                expected=max(expected, 0),
                what=f"{tag} chunk {step}",
                duplicates=False,
            )
            done = step + 1
            if chunks >= 8 and done * 4 // chunks > reported:  # progress at each quarter
                reported = done * 4 // chunks
                elapsed = time.monotonic() - started
                rate = done * self.options.chunk_points / max(elapsed, 1e-9)
                logger.info(
                    "PSI %s: %s %d/%d chunks (%d%%), %.0f points/s, about %.0f s left",
                    self.job_id,
                    tag,
                    done,
                    chunks,
                    100 * done // chunks,
                    rate,
                    elapsed * (chunks - done) / done,
                )
            yield env.body.data

    def mask_stream(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """``M_k`` of a received list, chunk by chunk, via the executor."""
        task_bytes = self.options.task_points * ecdh.POINT_BYTES

        def tasks() -> Iterator[tuple[bytes, bytes]]:
            for chunk in chunks:
                for i in range(0, len(chunk), task_bytes):
                    yield self.key, chunk[i : i + task_bytes]

        yield from self.executor.imap(ecdh.mask_chunk, tasks())


def _rechunk(parts: Iterator[bytes], cut: int) -> Iterator[bytes]:
    """Regroup a stream of byte strings into messages of ``cut`` bytes (the last may be short)."""
    buffer = bytearray()
    for part in parts:
        buffer += part
        while len(buffer) >= cut:
            yield bytes(buffer[:cut])
            del buffer[:cut]
    if buffer:
        yield bytes(buffer)


def _sorted_unique(parts: Iterator[bytes], *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole list as sorted values and their positions; duplicates abort (§3.4)."""
    points = np.frombuffer(b"".join(parts), dtype="S32")
    order = np.argsort(points, kind="stable")
    values = points[order]
    if len(values) > 1 and np.any(values[1:] == values[:-1]):
        raise InvalidPointError(f"{what}: duplicate elements (an honest peer deduplicates)")
    return values, order


def _match(
    g: tuple[np.ndarray, np.ndarray], h: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Positions in D_G and D_H of the common values, in increasing value order (step 3)."""
    (g_values, g_order), (h_values, h_order) = g, h
    if not len(g_values) or not len(h_values):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    at = np.minimum(np.searchsorted(h_values, g_values), len(h_values) - 1)
    hit = h_values[at] == g_values
    return g_order[hit], h_order[at[hit]]


# ---------------------------------------------------------------------------
# guest


def run_guest(
    *,
    channel: Channel,
    host: Party,
    job_id: str,
    ids: PreparedIds,
    executor: Executor,
    options: PsiOptions = PsiOptions(),
    request: dict[str, Any] | None = None,
) -> PsiResult:
    """The guest's side of steps 0-4; ``request`` adds fields for the host's service."""
    started = time.perf_counter()
    run = _Run(
        channel=channel,
        peer=host,
        job_id=job_id,
        ids=ids,
        executor=executor,
        options=options,
        salt=ecdh.new_salt(),
    )
    hello = {
        "run_id": run.run_id,
        "mode": options.mode.value,
        "id_type": ids.id_type.value,
        "canon_version": CANON_VERSION,
        "pad_to": options.pad_to,
        "size": run.size,
        "chunk_points": options.chunk_points,
        "request": request or {},
    }
    run.link.send(host, PsiTag.HELLO, 0, hello)  # step 0
    # Step 1' needs only our own key and salt: compute A_G while the host loads its data,
    # and send it once the host has accepted.
    accepted, cancelled = threading.Event(), threading.Event()
    join_sender = run.start_sender(lambda: _send_when_accepted(run, accepted, cancelled))
    try:
        ack = run.recv(PsiTag.HELLO_ACK, 0)
        reply = ack.body.obj() if isinstance(ack.body, ControlBlock) else {}
        if not reply.get("accept"):
            raise AlignmentError(
                f"{host} refused the PSI: {reply.get('reason', 'no reason given')}"
            )
    except BaseException:
        cancelled.set()
        join_sender_quietly(join_sender)
        raise
    accepted.set()
    try:
        return _guest_exchange(run, join_sender, host_size=int(reply["size"]), started=started)
    except (VflError, TimeoutError, ValueError) as exc:
        cancelled.set()
        run.abort(f"guest stopped: {type(exc).__name__}")
        raise


def join_sender_quietly(join: Callable[[], None]) -> None:
    """Join a sender thread whose outcome no longer matters."""
    try:
        join()
    except BaseException:  # noqa: BLE001 - the caller is already raising the real error
        logger.debug("PSI sender stopped after the run failed")


def _send_when_accepted(run: _Run, accepted: threading.Event, cancelled: threading.Event) -> None:
    """Step 1': compute A_G at once, hold it until the host accepts, then stream it."""

    def held() -> Iterator[bytes]:
        waiting: list[bytes] = []
        for chunk in run.own_list():
            if cancelled.is_set():
                return
            waiting.append(chunk)
            if accepted.is_set():
                yield from waiting
                waiting.clear()
        while not accepted.wait(0.2):
            if cancelled.is_set():
                return
        yield from waiting

    run.send_list(PsiTag.A_G, held())


def _guest_exchange(
    run: _Run, join_sender: Callable[[], None], *, host_size: int, started: float
) -> PsiResult:
    options, ids = run.options, run.ids
    if options.pad_to is not None and host_size != options.pad_to:
        raise AlignmentError(
            f"{run.peer} announced {host_size} elements, not the agreed {options.pad_to}"
        )
    d_h = _sorted_unique(
        run.mask_stream(run.recv_list(PsiTag.A_H, host_size)), what="D_H"
    )  # step 3
    d_g = _sorted_unique(run.recv_list(PsiTag.D_G, run.size), what="D_G")  # step 2, received
    join_sender()
    idx_g, idx_h = _match(d_g, d_h)  # step 3: sorted by doubly-masked value

    if options.mode is PsiMode.CARDINALITY:
        logger.info("PSI %s: cardinality %d", run.job_id, len(idx_g))
        return run.result("guest", len(idx_g), None, peer_size=host_size, started=started)
    items = run.perm[idx_g]
    if np.any(items >= run.n_real):
        raise AlignmentError("a padding dummy matched; aborting (probability negligible)")
    rows = ids.rows[items]
    if options.mode is PsiMode.BOTH:
        run.link.send(run.peer, PsiTag.RESULT, 0, IndexBlock.from_indices(idx_h))  # step 4
    logger.info(
        "PSI %s: intersection %d of %d guest / %d host elements",
        run.job_id,
        len(rows),
        run.size,
        host_size,
    )
    positions = idx_h.astype(np.int64) if options.mode is PsiMode.GUEST_ONLY else None
    return run.result(
        "guest", len(rows), rows, peer_size=host_size, started=started, peer_positions=positions
    )


# ---------------------------------------------------------------------------
# host


def read_hello(envelope: Envelope) -> dict[str, Any]:
    """Parse and check a ``HELLO`` (step 0) before the host loads its data."""
    if not isinstance(envelope.body, ControlBlock):
        raise MalformedEnvelopeError("PSI HELLO carries no control block")
    hello = envelope.body.obj()
    try:
        PsiMode(hello["mode"])
        IdType(hello["id_type"])
        int(hello["size"])
        int(hello["chunk_points"])
        bytes.fromhex(hello["run_id"])
    except (KeyError, ValueError, TypeError) as exc:
        raise MalformedEnvelopeError(f"PSI HELLO is malformed: {exc}") from None
    return hello


def refuse(channel: Channel, hello_envelope: Envelope, reason: str) -> None:
    """Answer a ``HELLO`` with a refusal; ``reason`` must be peer-safe (a rule, never the
    host's paths, columns, row numbers or counts: :func:`protocols.errors.peer_reason`)."""
    hello = read_hello(hello_envelope)
    link = JobLink(channel=channel, job_id=hello_envelope.job_id, run_id=hello["run_id"])
    link.send(hello_envelope.sender, PsiTag.HELLO_ACK, 0, {"accept": False, "reason": reason[:300]})


def run_host(
    *,
    channel: Channel,
    hello_envelope: Envelope,
    ids: PreparedIds,
    executor: Executor,
    timeout: float = 3600.0,
) -> PsiResult:
    """The host's side of steps 0-4, after its service received ``HELLO``."""
    started = time.perf_counter()
    hello = read_hello(hello_envelope)
    if hello["canon_version"] != CANON_VERSION or IdType(hello["id_type"]) is not ids.id_type:
        reason = (
            f"canonicalisation differs (guest {hello['id_type']} v{hello['canon_version']}, "
            f"host {ids.id_type.value} v{CANON_VERSION})"
        )
        refuse(channel, hello_envelope, reason)  # protocol parameters only, no data
        raise AlignmentError(reason)
    try:
        options = PsiOptions(
            mode=PsiMode(hello["mode"]),
            pad_to=hello["pad_to"],
            chunk_points=int(hello["chunk_points"]),
            timeout=timeout,
        )
        run = _Run(
            channel=channel,
            peer=hello_envelope.sender,
            job_id=hello_envelope.job_id,
            ids=ids,
            executor=executor,
            options=options,
            salt=bytes.fromhex(hello["run_id"]),
        )
    except VflError as exc:
        refuse(channel, hello_envelope, peer_reason(exc))  # never str(exc): counts stay here
        raise
    run.link.send(run.peer, PsiTag.HELLO_ACK, 0, {"accept": True, "size": run.size})  # step 0
    try:
        return _host_exchange(run, guest_size=int(hello["size"]), started=started)
    except (VflError, TimeoutError, ValueError) as exc:
        run.abort(f"host stopped: {type(exc).__name__}")
        raise


def _host_exchange(run: _Run, *, guest_size: int, started: float) -> PsiResult:
    options = run.options
    join_sender = run.start_sender(lambda: run.send_list(PsiTag.A_H, run.own_list()))  # step 1
    received: list[bytes] = []

    def keep(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            received.append(chunk)
            yield chunk

    masked = run.mask_stream(keep(run.recv_list(PsiTag.A_G, guest_size)))  # step 2
    cut = options.chunk_points * ecdh.POINT_BYTES
    if options.mode is PsiMode.CARDINALITY:
        d_g = np.frombuffer(b"".join(masked), dtype="S32")
        order = np.argsort(np.frombuffer(os.urandom(8 * len(d_g)), dtype="<u8"), kind="stable")
        data = d_g[order].tobytes()
        run.send_list(PsiTag.D_G, _rechunk(iter([data]), cut))
    else:
        run.send_list(PsiTag.D_G, _rechunk(masked, cut))
    _sorted_unique(iter(received), what="A_G")  # duplicates across chunks abort before step 4
    received.clear()
    join_sender()

    if options.mode is PsiMode.GUEST_ONLY:
        real = run.perm < run.n_real
        list_rows = np.full(run.size, -1, dtype=np.int64)
        list_rows[real] = run.ids.rows[run.perm[real]]
        return run.result(
            "host", None, None, peer_size=guest_size, started=started, list_rows=list_rows
        )
    if options.mode is not PsiMode.BOTH:
        return run.result("host", None, None, peer_size=guest_size, started=started)
    message = run.recv(PsiTag.RESULT, 0)  # step 4
    if not isinstance(message.body, IndexBlock):
        raise MalformedEnvelopeError("PSI RESULT carries no index block")
    positions = message.body.indices().astype(np.int64)
    if positions.size and (
        positions.max() >= run.size or len(np.unique(positions)) != len(positions)
    ):
        raise AlignmentError("PSI RESULT holds positions out of range or twice")
    items = run.perm[positions]
    if np.any(items >= run.n_real):
        raise AlignmentError("PSI RESULT points at padding dummies")
    rows = run.ids.rows[items]
    logger.info("PSI %s: intersection %d of %d host elements", run.job_id, len(rows), run.size)
    return run.result("host", len(rows), rows, peer_size=guest_size, started=started)
