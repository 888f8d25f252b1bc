"""The ``Channel``: how one party sends envelopes to others and receives them.

Roles: every party owns one channel. Sending pushes an envelope to the receiver
(``send``); the receiver's channel validates it and either hands it to a
registered handler (services that answer whatever arrives: the arbiter's
decryption requests, job submissions) or keeps it in a mailbox keyed by
``(job_id, run_id, sender, tag, step)`` until a protocol calls ``recv``.

Receiving an envelope (both implementations run exactly these steps):

1. decode the header (:func:`protocols.envelope.decode`);
2. check the receiver is this party (:class:`WrongReceiverError`);
3. check the sender is the authenticated peer, id and role (:class:`PeerIdentityError`);
4. check the tag is registered (:class:`UnknownTagError`);
5. apply the replay rules (:mod:`protocols.transport.replay`); a byte-identical
   repeat is acknowledged as a duplicate and not processed again (a handler may
   register ``on_duplicate`` to resend a cached reply, e.g. the arbiter's);
6. dispatch to the first matching handler, else store in the mailbox (or drop it if
   its run was stopped with :meth:`Channel.abort_run`).

Sequence numbers are assigned by the sender's channel, strictly increasing per
``(job_id, receiver)``; :meth:`Channel.stream_state` exports them for checkpoints.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

from protocols.envelope import Envelope, decode, mail_key
from protocols.errors import (
    PeerIdentityError,
    ProtocolError,
    ReceiverBusyError,
    RunAbortedError,
    TransportError,
    WrongReceiverError,
)
from protocols.roles import Party
from protocols.tags import TagRegistry, tag_value
from protocols.transport.options import ENVELOPE_OVERHEAD_BYTES
from protocols.transport.replay import ReplayGuard, Verdict

logger = logging.getLogger(__name__)

MailKey = tuple[str, str, str, str, int]  # (job_id, run_id, sender id, tag, step)
Handler = Callable[[Envelope], None]
_Task = tuple[Handler, Envelope, str, int]  # handler, envelope, sender charged, charge
_ACTIVE_JOBS = 4096  # jobs whose last local activity is remembered (only this party's own)


class DeliveryStatus(Enum):
    """What the receiver did with an envelope."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class MessageFilter:
    """Selects envelopes by job, sender, tag and run; ``None`` matches anything."""

    job_id: str | None = None
    sender: str | None = None
    tags: frozenset[str] | None = None
    run_id: str | None = None

    @classmethod
    def for_tags(cls, *tags: Enum | str, job_id: str | None = None) -> MessageFilter:
        """A filter for the given tags (enum members or strings)."""
        return cls(job_id=job_id, tags=frozenset(tag_value(t) for t in tags))

    def matches(self, envelope: Envelope) -> bool:
        """Whether ``envelope`` passes this filter."""
        return (
            (self.job_id is None or envelope.job_id == self.job_id)
            and (self.sender is None or envelope.sender.party_id == self.sender)
            and (self.tags is None or envelope.tag in self.tags)
            and (self.run_id is None or envelope.run_id == self.run_id)
        )


@dataclass
class _Entry:
    """A queued envelope, who is charged for it, how much, and when it arrived."""

    envelope: Envelope
    sender: str
    charge: int
    stored_at: float


class Reservation:
    """Queue budget reserved for one envelope of one sender (:meth:`Mailbox.reserve`).

    Released when the envelope is refused, handled or read; a queued envelope keeps it.
    """

    def __init__(self, mailbox: Mailbox, sender: str, amount: int) -> None:
        self._mailbox = mailbox
        self.sender = sender
        self.amount = amount
        self._open = True

    def hand_over(self) -> int:
        """The queued envelope or its handler now holds the bytes; return their amount."""
        self._open = False
        return self.amount

    def release(self) -> None:
        """Give the reserved bytes back (idempotent; a no-op after :meth:`hand_over`)."""
        if self._open:
            self._open = False
            self._mailbox._release(self.sender, self.amount)


class Mailbox:
    """Receive side of a channel: steps 1-6 of the module docstring, within the limits of
    docs/protocol.md §2.9.1.

    Every envelope is charged ``len(header) + len(payload) + ENVELOPE_OVERHEAD_BYTES``
    against its sender's ``max_queued_bytes`` from before its body is read until it is
    read, handled or dropped (:meth:`reserve`); an envelope a local receive is waiting for
    is admitted even over budget, so a full budget never blocks the message that would
    drain it. At most ``handler_threads // 2`` handlers of one sender run at once; its
    others wait in its own queue, so one sender cannot occupy every handler thread.
    Unread messages of a job with no local activity (no local protocol sent, awaited or
    read a message of it) for ``stale_mail_seconds`` are dropped; those of a stopped run
    at once.
    """

    def __init__(
        self,
        *,
        me: Party,
        tags: TagRegistry,
        replay: ReplayGuard,
        max_queued_bytes: int,
        handler_threads: int = 8,
        stale_mail_seconds: float = 300.0,
    ) -> None:
        self.me = me
        self.tags = tags
        self._replay = replay
        self._max_queued = max_queued_bytes
        self._stale_seconds = stale_mail_seconds
        self._queued: dict[str, int] = {}  # sender id -> bytes charged
        self._cond = threading.Condition()
        self._box: dict[str, dict[MailKey, _Entry]] = {}  # job id -> its unread mail
        self._handlers: list[tuple[MessageFilter, Handler, Handler | None]] = []
        self._pool = ThreadPoolExecutor(handler_threads, thread_name_prefix=f"{me.party_id}-h")
        self._max_handled = max(1, handler_threads // 2)
        self._handled: dict[str, int] = {}  # sender id -> its handlers running
        self._backlog: dict[str, deque[_Task]] = {}  # sender id -> its handlers waiting
        self._closed = False
        self._aborted: set[tuple[str, str]] = set()  # (job_id, run_id) of stopped runs
        self._activity: OrderedDict[str, float] = OrderedDict()  # job id -> last local use
        self._waiting: dict[MailKey, int] = {}  # keys local receives wait for
        self._waiting_jobs: dict[str, int] = {}
        self._next_sweep = 0.0

    def add_handler(
        self, message_filter: MessageFilter, handler: Handler, on_duplicate: Handler | None = None
    ) -> None:
        """Route matching envelopes to ``handler`` (run on a worker thread).

        ``on_duplicate`` is called with a byte-identical repeat of an envelope already
        handled (for example to resend a cached reply whose first delivery was lost).
        """
        with self._cond:
            self._handlers.append((message_filter, handler, on_duplicate))

    # -- budget -----------------------------------------------------------------

    def reserve(self, sender: str, size: int, *, key: MailKey | None = None) -> Reservation:
        """Reserve room for an envelope of ``size`` bytes (header and body) from ``sender``
        before its body is received.

        Raises :class:`ReceiverBusyError` (the sender retries) if the sender's unread,
        unhandled and in-flight envelopes would exceed ``max_queued_bytes``, unless a local
        receive is waiting for ``key``, the envelope's mail key.
        """
        amount = size + ENVELOPE_OVERHEAD_BYTES
        with self._cond:
            held = self._queued.get(sender, 0)
            if held + amount > self._max_queued and key not in self._waiting:
                raise ReceiverBusyError(
                    f"{self.me.party_id} holds {self._max_queued} B of unread messages from "
                    f"{sender or 'this sender'} already; it is not keeping up, retry later"
                )
            self._queued[sender] = held + amount
        return Reservation(self, sender, amount)

    def _release(self, sender: str, amount: int) -> None:
        with self._cond:
            left = self._queued.get(sender, 0) - amount
            if left > 0:
                self._queued[sender] = left
            else:
                self._queued.pop(sender, None)

    def queued_bytes(self, sender: str) -> int:
        """Bytes currently charged to ``sender``."""
        with self._cond:
            return self._queued.get(sender, 0)

    def note_job(self, job_id: str) -> None:
        """Record local activity on ``job_id`` (this party sent, awaits or read a message)."""
        with self._cond:
            self._touch(job_id)

    def _touch(self, job_id: str) -> None:
        self._activity[job_id] = time.monotonic()
        self._activity.move_to_end(job_id)
        if len(self._activity) > _ACTIVE_JOBS:
            self._activity.popitem(last=False)

    # -- steps 1-6 ----------------------------------------------------------------

    def deliver(
        self,
        header: bytes,
        payload: bytes,
        digest: bytes,
        *,
        authenticated: Party | None,
        reservation: Reservation | None = None,
    ) -> DeliveryStatus:
        """Run steps 1-6; ``authenticated`` is the peer from TLS (``None``: insecure mode).

        ``reservation`` is the budget the transport reserved before reading the body;
        without one it is reserved here.
        """
        if reservation is None:
            sender = "" if authenticated is None else authenticated.party_id
            reservation = self.reserve(sender, len(header) + len(payload), key=mail_key(header))
        try:
            return self._deliver(header, payload, digest, authenticated, reservation)
        finally:
            reservation.release()  # no-op if a queued envelope or a handler holds it

    def _deliver(
        self,
        header: bytes,
        payload: bytes,
        digest: bytes,
        authenticated: Party | None,
        reservation: Reservation,
    ) -> DeliveryStatus:
        envelope = decode(header, payload)  # step 1
        if envelope.receiver != self.me:  # step 2
            raise WrongReceiverError(
                f"envelope for {envelope.receiver} arrived at {self.me}: {envelope.describe()}"
            )
        if authenticated is not None and envelope.sender != authenticated:  # step 3
            logger.warning(
                "refused envelope: certificate names %s but the envelope claims %s (%s)",
                authenticated,
                envelope.sender,
                envelope.describe(),
            )
            raise PeerIdentityError(
                f"the certificate names {authenticated} but the envelope claims {envelope.sender}"
            )
        self.tags.check(envelope.tag)  # step 4
        with self._cond:
            # Under the lock, so that a replay mark is never recorded for an envelope that
            # a closing mailbox then refuses (its retry would be taken for a duplicate).
            if self._closed:
                raise TransportError(f"{self.me} is shutting down; envelope not accepted")
            handler = self._handler_for(envelope)
            if self._replay.check(envelope, digest) is Verdict.DUPLICATE:  # step 5
                logger.info("duplicate acknowledged, not processed again: %s", envelope.describe())
                if handler is not None and handler[1] is not None:
                    self._submit(handler[1], envelope, reservation)
                return DeliveryStatus.DUPLICATE
            if handler is not None:  # step 6
                self._submit(handler[0], envelope, reservation)
            else:
                self._store(envelope, reservation)
        return DeliveryStatus.ACCEPTED

    def _handler_for(self, envelope: Envelope) -> tuple[Handler, Handler | None] | None:
        for message_filter, handler, on_duplicate in self._handlers:
            if message_filter.matches(envelope):
                return handler, on_duplicate
        return None

    def _store(self, envelope: Envelope, reservation: Reservation) -> None:
        """Step 6 without a handler (called with the lock held)."""
        if (envelope.job_id, envelope.run_id) in self._aborted:
            logger.info("dropped a message of a stopped run: %s", envelope.describe())
            return
        key: MailKey = (
            envelope.job_id,
            envelope.run_id,
            envelope.sender.party_id,
            envelope.tag,
            envelope.step,
        )
        now = time.monotonic()
        self._sweep(now)
        entry = _Entry(envelope, reservation.sender, reservation.hand_over(), now)
        self._box.setdefault(envelope.job_id, {})[key] = entry
        self._cond.notify_all()

    def _sweep(self, now: float) -> None:
        """Drop unread mail of jobs with no local activity for ``stale_mail_seconds``."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        cutoff = now - self._stale_seconds
        for job_id in list(self._box):
            if self._waiting_jobs.get(job_id) or self._activity.get(job_id, -math.inf) > cutoff:
                continue
            mail = self._box[job_id]
            stale = [k for k, e in mail.items() if e.stored_at < cutoff]
            for key in stale:
                entry = mail.pop(key)
                self._release(entry.sender, entry.charge)
            if not mail:
                del self._box[job_id]
            if stale:
                logger.warning(
                    "dropped %d unread messages of job %s from %s: nothing here used the job "
                    "for %.0f s (transport.stale_mail_seconds)",
                    len(stale),
                    job_id,
                    ", ".join(sorted({k[2] for k in stale})),
                    self._stale_seconds,
                )

    def _submit(self, handler: Handler, envelope: Envelope, reservation: Reservation) -> None:
        """Run ``handler`` on a worker, at most ``handler_threads // 2`` at once per sender
        (the rest wait in the sender's own queue); the envelope stays charged until its
        handler returns. Called with the lock held."""
        task = (handler, envelope, reservation.sender, reservation.hand_over())
        if self._handled.get(task[2], 0) < self._max_handled:
            self._start(task)
        else:
            self._backlog.setdefault(task[2], deque()).append(task)

    def _start(self, task: _Task) -> None:
        self._handled[task[2]] = self._handled.get(task[2], 0) + 1
        self._pool.submit(self._run_handler, task)

    def _run_handler(self, task: _Task) -> None:
        handler, envelope, sender, amount = task
        try:
            handler(envelope)
        except Exception:  # a handler bug must not kill the service
            logger.exception("handler for %s failed", envelope.describe())
        finally:
            with self._cond:
                self._release(sender, amount)
                waiting = self._backlog.get(sender)
                if waiting and not self._closed:
                    self._pool.submit(self._run_handler, waiting.popleft())
                else:
                    self._handled[sender] -= 1
                    if not self._handled[sender]:
                        del self._handled[sender]
                if not waiting:
                    self._backlog.pop(sender, None)

    # -- reading ------------------------------------------------------------------

    def _wait(self, key: MailKey) -> None:
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self._waiting_jobs[key[0]] = self._waiting_jobs.get(key[0], 0) + 1

    def _unwait(self, key: MailKey) -> None:
        left = self._waiting[key] - 1
        if left:
            self._waiting[key] = left
        else:
            del self._waiting[key]
        jobs_left = self._waiting_jobs[key[0]] - 1
        if jobs_left:
            self._waiting_jobs[key[0]] = jobs_left
        else:
            del self._waiting_jobs[key[0]]

    def take(self, key: MailKey, timeout: float | None) -> Envelope:
        """Remove and return the envelope under ``key``, waiting up to ``timeout`` s."""
        run = (key[0], key[1])

        def ready() -> bool:
            return key in self._box.get(key[0], {}) or self._closed or run in self._aborted

        with self._cond:
            self._touch(key[0])
            self._wait(key)
            try:
                if not self._cond.wait_for(ready, timeout):
                    raise TimeoutError(
                        f"{self.me}: no message job={key[0]} run={key[1] or '-'} from {key[2]} "
                        f"tag={key[3]} step={key[4]} within {timeout} s"
                    )
            finally:
                self._unwait(key)
            self._touch(key[0])
            self._check_aborted(run)
            return self._pop(key)

    def take_any(self, message_filter: MessageFilter, timeout: float | None) -> Envelope:
        """Remove and return the oldest envelope matching ``message_filter``."""
        found: list[MailKey] = []
        run = (message_filter.job_id, message_filter.run_id)
        job = message_filter.job_id

        def ready() -> bool:
            boxes = [self._box.get(job, {})] if job is not None else list(self._box.values())
            found[:] = [
                k for mail in boxes for k, e in mail.items() if message_filter.matches(e.envelope)
            ][:1]
            return bool(found) or self._closed or run in self._aborted

        with self._cond:
            if job is not None:
                self._touch(job)
            if not self._cond.wait_for(ready, timeout):
                raise TimeoutError(
                    f"{self.me}: no message matching {message_filter} in {timeout} s"
                )
            if job is not None and message_filter.run_id is not None:
                self._check_aborted((job, message_filter.run_id))
            return self._pop(found[0] if found else None)

    def _check_aborted(self, run: tuple[str, str]) -> None:
        if run in self._aborted:
            raise RunAbortedError(f"{self.me}: run {run[1] or '-'} of job {run[0]} was stopped")

    def abort_run(self, job_id: str, run_id: str) -> int:
        """Stop run ``run_id`` of ``job_id``: its waiting receives (and any later ones) raise
        :class:`RunAbortedError`, its unread messages are dropped, and so are any that still
        arrive. Returns the number of messages dropped."""
        with self._cond:
            self._aborted.add((job_id, run_id))
            mail = self._box.get(job_id, {})
            stale = [k for k in mail if k[1] == run_id]
            for key in stale:
                entry = mail.pop(key)
                self._release(entry.sender, entry.charge)
            if not mail:
                self._box.pop(job_id, None)
            self._cond.notify_all()
        if stale:
            logger.info(
                "job %s run %s stopped: dropped %d unread messages",
                job_id,
                run_id or "-",
                len(stale),
            )
        return len(stale)

    def _pop(self, key: MailKey | None) -> Envelope:
        mail = None if key is None else self._box.get(key[0])
        if key is None or mail is None or key not in mail:
            raise TransportError(f"{self.me}: channel closed while waiting for a message")
        entry = mail.pop(key)
        if not mail:
            del self._box[key[0]]
        self._release(entry.sender, entry.charge)
        return entry.envelope

    def pending(self) -> int:
        """Number of envelopes waiting in the mailbox."""
        with self._cond:
            return sum(len(mail) for mail in self._box.values())

    def close(self) -> None:
        """Wake all waiters, refuse new envelopes, let running handlers finish and drop
        the queued ones."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._replay.close()


class Channel(ABC):
    """Send and receive envelopes; implementations differ only in :meth:`_transmit`."""

    def __init__(self, *, me: Party, mailbox: Mailbox) -> None:
        self.me = me
        self._mailbox = mailbox
        self._seq_lock = threading.Lock()
        self._next_seq: dict[tuple[str, str], int] = {}

    @property
    def tags(self) -> TagRegistry:
        """The tags this party accepts and sends."""
        return self._mailbox.tags

    # -- sending ------------------------------------------------------------

    def send(self, envelope: Envelope) -> Envelope:
        """Deliver ``envelope`` to its receiver; return it with its sequence number.

        Returns once the receiver has accepted it (or acknowledged a byte-identical
        repeat). An envelope whose ``seq`` is already set is sent as it is, which is
        how a retransmission repeats the original bytes.
        """
        if envelope.sender != self.me:
            raise ProtocolError(
                f"{self.me} cannot send an envelope claiming sender {envelope.sender}"
            )
        self.tags.check(envelope.tag)
        self._mailbox.note_job(envelope.job_id)
        if envelope.seq == 0:
            envelope = envelope.with_seq(self._assign_seq(envelope))
        started = time.perf_counter()
        status = self._transmit(envelope)
        logger.debug(
            "sent %s in %.1f ms (%s)",
            envelope.describe(),
            1e3 * (time.perf_counter() - started),
            status.value,
        )
        return envelope

    def _assign_seq(self, envelope: Envelope) -> int:
        key = (envelope.job_id, envelope.receiver.party_id)
        with self._seq_lock:
            seq = self._next_seq.get(key, 1)
            self._next_seq[key] = seq + 1
            return seq

    def stream_state(self, job_id: str) -> dict[str, int]:
        """Next sequence number per receiver for ``job_id`` (for checkpoints)."""
        with self._seq_lock:
            return {r: s for (j, r), s in self._next_seq.items() if j == job_id}

    def restore_stream_state(self, job_id: str, state: dict[str, int]) -> None:
        """Continue the sequence numbers of ``job_id`` from a checkpoint."""
        with self._seq_lock:
            for receiver, seq in state.items():
                self._next_seq[(job_id, receiver)] = max(
                    seq, self._next_seq.get((job_id, receiver), 1)
                )

    def fresh_stream(self, job_id: str, receivers: Iterable[Party]) -> None:
        """Move this party's sequence numbers of ``job_id`` towards ``receivers`` to the current
        time in microseconds: past every number an earlier session or process of this party
        used (the receivers' replay guards remember those across restarts), as no party sends
        one message per microsecond. Sessions call it before their first message of a run."""
        base = time.time_ns() // 1000
        self.restore_stream_state(job_id, {p.party_id: base for p in receivers})

    @abstractmethod
    def _transmit(self, envelope: Envelope) -> DeliveryStatus:
        """Hand the envelope to the receiver's mailbox; raise on failure."""

    # -- receiving ----------------------------------------------------------

    def recv(
        self,
        *,
        job_id: str,
        sender: Party | str,
        tag: Enum | str,
        step: int,
        run_id: str = "",
        timeout: float | None = None,
    ) -> Envelope:
        """Wait for the one envelope with this ``(job_id, run_id, sender, tag, step)``.

        Raises ``TimeoutError`` after ``timeout`` seconds (``None``: wait for ever).
        """
        sender_id = sender.party_id if isinstance(sender, Party) else sender
        return self._mailbox.take((job_id, run_id, sender_id, tag_value(tag), step), timeout)

    def recv_any(self, message_filter: MessageFilter, *, timeout: float | None = None) -> Envelope:
        """Wait for the oldest envelope matching ``message_filter``."""
        return self._mailbox.take_any(message_filter, timeout)

    def add_handler(
        self,
        message_filter: MessageFilter,
        handler: Handler,
        *,
        on_duplicate: Handler | None = None,
    ) -> None:
        """Route every matching envelope that arrives to ``handler`` instead of the mailbox.

        ``on_duplicate`` receives byte-identical repeats of envelopes already handled.
        """
        self._mailbox.add_handler(message_filter, handler, on_duplicate)

    def abort_run(self, job_id: str, run_id: str) -> int:
        """Stop one run of a job: its receives raise :class:`RunAbortedError` (see
        :meth:`Mailbox.abort_run`); returns the number of its unread messages dropped."""
        return self._mailbox.abort_run(job_id, run_id)

    def close(self) -> None:
        """Stop receiving; waiters get a :class:`TransportError`."""
        self._mailbox.close()
