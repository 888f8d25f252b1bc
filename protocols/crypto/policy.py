"""The arbiter's decryption policy (docs/protocol.md §2.6, §4.4.1, §5.4).

Roles: the arbiter A enforces it and holds the Paillier key; the guest G and the host H
propose each job's policy (``JOB_SPEC``) and request masked decryptions under it. What A
learns from it is metadata only: tags, steps, counts, digests of ciphertexts, timing.

Rules (the code cites them):

P1. **Registration.** A job is active once each of its parties (its guest and its host,
    two different parties) proposed the byte-equal policy. A proposal from anyone else, a
    policy that names one party twice, or two proposals that differ refuse the job (a
    differing proposal from someone the waiting one does not name is refused alone, the
    waiting one stays); a party has at most :data:`MAX_PENDING_JOBS` proposals waiting for
    the other party.
P2. **Schedule.** Each tag has one requester, a count per request and a step window
    derived from the job's schedule (training tags: epochs × steps per epoch; ``Z_EVAL``:
    every validation and test batch; FTL numbers its runs ``2^32`` apart). A request
    outside the window is refused.
P3. **Forward.** A tag's steps go forward: a new request names a step above every step of
    that tag served so far (its high-water mark), so skipping ahead forfeits the skipped
    steps.
P4. **Once.** Each ``(job, step, tag)`` is decrypted once. A byte-identical repeat gets the
    same reply (from the cache of the newest :data:`CACHED_STEPS` steps per tag, or, once
    per step and process, by decrypting the same ciphertexts again, which yields the same
    plaintext) and is not counted again; any other second request for a served step is
    refused.
P5. **Budget.** Values decrypted per tag over the whole job stay within
    ``count × (window steps + max_resumes × rewind)``.
P6. **Resume.** ``RESUME{step, tag_steps}`` from every party, byte-equal, at most
    ``max_resumes`` times per job, re-opens the steps ``>=`` each tag's resume point; that
    point may lie at most ``rewind`` steps behind the tag's high-water mark. A job that
    numbers its runs (FTL) opens each newer run by ``RESUME{run}`` instead; steps of a run
    not opened so are refused.
P7. **Close.** ``JOB_DONE`` from every party closes the job (no further decryption for it)
    and, for a split-NN job, registers the trained model for scoring with its row width.
P8. **Grants (scoring).** A grant admits whole rows up to a maximum per request, within a
    quota of values and an expiry. With a binder (``INF_Z``: the model's host), a request
    must hold whole rows the binder registered for the same session (``run_id``), not yet
    decrypted, all of one group (one answer of the binder), and a group decrypts at most its
    cap of rows; a group lost (restart, older sessions dropped) cannot be opened again.
P9. **Persistence.** Registrations, served marks, counts, resumes, closes and the model
    registry are written to a :mod:`protocols.crypto.policy_store` (owner-only; a served
    mark is on disk before the reply leaves A) and reloaded when A starts again.
    Proposals, the reply cache and scoring registrations live in memory: losing them only
    makes A refuse.

Every refusal raises :class:`PolicyViolationError` with its reason; the service answers
the requester with it and writes it to its audit log.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from protocols.errors import PolicyViolationError

if TYPE_CHECKING:
    from protocols.crypto.policy_store import PolicyStore

logger = logging.getLogger(__name__)

CACHED_STEPS = 8  # replies kept per (job, tag) for byte-identical repeats (P4)
MAX_PENDING_JOBS = 64  # proposals waiting for the other party, per submitter (P1)
MAX_SESSIONS_PER_JOB = 64  # scoring sessions with registered ciphertexts kept per grant (P8)
MAX_BOUND_PER_JOB = 1 << 22  # registered, unspent ciphertexts kept per grant (P8): the oldest
# sessions are dropped beyond it (their guest then opens a new session)
DIGEST_BYTES = 16


def ciphertext_digests(key_id: bytes, payload: bytes, count: int) -> list[bytes]:
    """The digest of each of the ``count`` fixed-width ciphertexts in ``payload`` (P8):
    the first 16 bytes of ``SHA-256(key id || ciphertext)``."""
    if count < 1 or len(payload) % count:
        raise PolicyViolationError("a cipher block's length is not a whole number of values")
    width = len(payload) // count
    return [
        hashlib.sha256(key_id + payload[i : i + width]).digest()[:DIGEST_BYTES]
        for i in range(0, len(payload), width)
    ]


@dataclass(frozen=True)
class StepWindow:
    """The steps a tag may be served at (P2).

    Offsets ``start <= offset < stop``; with ``run_shift > 0`` a step is
    ``(run << run_shift) + offset`` with ``run <= max_runs`` (FTL numbers its runs so).
    """

    start: int = 0
    stop: int = 1
    run_shift: int = 0
    max_runs: int = 0

    def contains(self, step: int) -> bool:
        """Whether ``step`` lies in the window."""
        if step < 0:
            return False
        offset = step
        if self.run_shift:
            if step >> self.run_shift > self.max_runs:
                return False
            offset = step & ((1 << self.run_shift) - 1)
        return self.start <= offset < self.stop

    @property
    def steps(self) -> int:
        """Steps per run."""
        return self.stop - self.start


@dataclass(frozen=True)
class PolicyRule:
    """Tag ``tag`` may be decrypted for ``requester`` (party id), ``count`` values a request.

    With ``unit > 0`` (scoring, FTL scores) ``count`` is a maximum and a request holds a
    positive multiple of ``unit`` values (whole rows). ``window`` (P2; ``None``: any step,
    scoring grants only), ``rewind`` (P6) and ``budget`` (P5; ``None``: no budget beyond a
    grant's quota).
    """

    tag: str
    requester: str
    count: int
    unit: int = 0
    window: StepWindow | None = None
    rewind: int = 0
    budget: int | None = None


@dataclass(frozen=True)
class JobPolicy:
    """What a job may have decrypted (derived from its JOB_SPEC, or a scoring grant).

    ``parties``: who must propose it and agree on RESUME and JOB_DONE (P1, P6, P7), the
    guest first and the host second;
    ``scoring_unit``: the width ``κ_k`` of a scored row, for the model registry (P7; 0: the
    job's model is not scored through grants); ``binder``: the party whose registered
    ciphertexts bind requests (P8).
    """

    job_id: str
    key_id: bytes
    rules: tuple[PolicyRule, ...]
    parties: tuple[str, ...] = ()
    encrypted: bool = True  # False: a plaintext experiment, A returns the values as they are
    quota: int | None = None  # values this job may have decrypted in all (scoring grants)
    expires_at: float | None = None  # unix time after which every request is refused
    cache_replies: bool = True  # False: scoring, whose requests are never repeated
    max_resumes: int = 0
    scoring_unit: int = 0
    binder: str = ""

    @property
    def requesters(self) -> frozenset[str]:
        """The parties that request decryptions."""
        return frozenset(r.requester for r in self.rules)

    def rule(self, tag: str) -> PolicyRule | None:
        """The rule for ``tag``, if any."""
        return next((r for r in self.rules if r.tag == tag), None)

    def to_json(self) -> dict[str, Any]:
        """JSON form (the policy store)."""
        out = asdict(self)
        out["key_id"] = self.key_id.hex()
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> JobPolicy:
        """Inverse of :meth:`to_json`."""
        rules = tuple(
            PolicyRule(
                **{
                    **r,
                    "window": None if r.get("window") is None else StepWindow(**r["window"]),
                }
            )
            for r in obj["rules"]
        )
        return cls(
            **{
                **obj,
                "key_id": bytes.fromhex(obj["key_id"]),
                "rules": rules,
                "parties": tuple(obj["parties"]),
            }
        )


@dataclass(frozen=True)
class ModelRecord:
    """A model whose training job closed at A (P7): what a scoring grant is bound to."""

    model_id: str
    guest: str
    host: str
    key_id: str
    kappa: int
    closed_at: float


class Admission(Enum):
    """Outcome of a policy check (P4)."""

    NEW = "new"  # decrypt, count, and cache the reply
    CACHED = "cached"  # a byte-identical repeat: send the cached reply
    REPEAT = "repeat"  # a byte-identical repeat whose reply is no longer cached: decrypt again


@dataclass
class _Group:
    cap_rows: int
    used_rows: int = 0
    items: list[bytes] = field(default_factory=list)


@dataclass
class _Session:
    """Ciphertexts a binder registered for one scoring session (P8), in whole rows."""

    groups: dict[int, _Group] = field(default_factory=dict)
    bound: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # digest -> group, row
    rows: dict[int, frozenset[bytes]] = field(default_factory=dict)  # row -> its digests
    spent: set[bytes] = field(default_factory=set)
    next_row: int = 0


@dataclass
class _JobState:
    policy: JobPolicy
    high: dict[str, int] = field(default_factory=dict)  # tag -> high-water step (P3)
    served: dict[tuple[str, int], bytes] = field(default_factory=dict)  # (tag, step) -> digest
    counts: dict[str, int] = field(default_factory=dict)
    resumes: int = 0
    closed: bool = False
    replies: OrderedDict[tuple[str, int], Any] = field(default_factory=OrderedDict)
    redone: set[tuple[str, int]] = field(default_factory=set)  # repeats decrypted again (P4)
    sessions: OrderedDict[str, _Session] = field(default_factory=OrderedDict)
    runs: int = 1  # the newest run of a job numbering its runs (P6: FTL)


class DecryptionPolicy:
    """Rules P1-P9 of the module docstring. Thread-safe.

    ``store``: where the state is kept across restarts (``None``: memory only, for
    in-process runs and tests).
    """

    def __init__(self, *, store: PolicyStore | None = None) -> None:
        self._lock = threading.Lock()
        self._store = store
        self._proposed: dict[str, dict[str, JobPolicy]] = {}
        self._jobs: dict[str, _JobState] = {}
        self._models: dict[str, ModelRecord] = {}
        if store is not None:
            self._load(store)

    # -- P9 ------------------------------------------------------------------------------

    def _load(self, store: PolicyStore) -> None:
        self._models = store.models()
        for policy, records in store.jobs():
            state = _JobState(policy=policy)
            for rec in records:
                self._apply(state, rec)
            self._jobs[policy.job_id] = state
        if self._jobs:
            logger.info("decryption policy: %d registered jobs reloaded", len(self._jobs))

    def _record(self, state: _JobState, record: Mapping[str, Any]) -> None:
        """Journal a change of a job's state (on disk first), then apply it."""
        if self._store is not None:
            self._store.append(state.policy.job_id, record)
        self._apply(state, record)

    @staticmethod
    def _apply(state: _JobState, rec: Mapping[str, Any]) -> None:
        """One journal record: as it happens, and again when A reloads its journal."""
        if "served" in rec:
            tag, step = str(rec["served"]), int(rec["step"])
            state.served[(tag, step)] = bytes.fromhex(rec["digest"])
            state.high[tag] = max(state.high.get(tag, -1), step)
            state.counts[tag] = state.counts.get(tag, 0) + int(rec["n"])
        elif "resume" in rec:
            step, thresholds = int(rec["resume"]), dict(rec.get("tag_steps", {}))
            for tag, s in list(state.served):
                if s >= thresholds.get(tag, step):
                    del state.served[(tag, s)]
                    state.replies.pop((tag, s), None)
            for tag in state.high:
                state.high[tag] = min(state.high[tag], thresholds.get(tag, step) - 1)
            state.resumes += 1
        elif "run" in rec:
            state.runs = max(state.runs, int(rec["run"]))
            state.resumes += 1
        elif rec.get("closed"):
            state.closed = True

    # -- P1 ------------------------------------------------------------------------------

    def propose(self, policy: JobPolicy, *, submitter: str) -> bool:
        """Record one party's JOB_SPEC (P1); returns whether the job is now active."""
        parties = set(policy.parties)
        if len(parties) < 2 or len(parties) != len(policy.parties):
            raise PolicyViolationError(
                f"job {policy.job_id} must name two different parties (guest and host)"
            )
        if not policy.requesters <= parties:
            raise PolicyViolationError(f"job {policy.job_id} has a requester that is no party")
        if submitter not in parties:
            raise PolicyViolationError(f"{submitter} is not a party of job {policy.job_id}")
        with self._lock:
            state = self._jobs.get(policy.job_id)
            if state is not None:
                if state.policy != policy:
                    raise PolicyViolationError(
                        f"job {policy.job_id} is already registered differently"
                    )
                return True
            if policy.job_id not in self._proposed:
                mine = sum(submitter in p for p in self._proposed.values())
                if mine >= MAX_PENDING_JOBS:
                    raise PolicyViolationError(
                        f"{submitter} has {mine} jobs waiting for their other party already"
                    )
            proposals = self._proposed.setdefault(policy.job_id, {})
            for other_submitter, other in proposals.items():
                if other != policy and submitter not in other.parties:
                    # someone the waiting proposal does not name: refused alone, so that a
                    # third party cannot end another guest's registration (P1)
                    raise PolicyViolationError(
                        f"job {policy.job_id} is waiting for other parties' JOB_SPECs"
                    )
                if other != policy:
                    del self._proposed[policy.job_id]
                    raise PolicyViolationError(
                        f"JOB_SPEC from {submitter} disagrees with the one from "
                        f"{other_submitter}; job {policy.job_id} refused"
                    )
            proposals[submitter] = policy
            if parties - set(proposals):
                return False
            del self._proposed[policy.job_id]
            if self._store is not None:
                self._store.save_job(policy)
            self._jobs[policy.job_id] = _JobState(policy=policy)
        logger.info(
            "job %s registered: %s",
            policy.job_id,
            ", ".join(f"{r.tag}x{r.count}" for r in policy.rules),
        )
        return True

    def grant(self, policy: JobPolicy, *, used: Mapping[str, int] | None = None) -> None:
        """Register a single-requester policy directly (a scoring grant, P8), with the counts
        it already used; sessions registered under an earlier grant of the job are kept."""
        with self._lock:
            old = self._jobs.get(policy.job_id)
            if old is not None and old.policy.parties:
                raise PolicyViolationError(f"{policy.job_id} is a registered job, not a grant")
            counts = {t: int(n) for t, n in (used or {}).items()}
            if old is not None:  # requests answered but not yet in the usage file count too
                counts = {t: max(n, old.counts.get(t, 0)) for t, n in counts.items()}
            state = _JobState(policy=policy, counts=counts)
            if old is not None:
                state.sessions = old.sessions
            self._jobs[policy.job_id] = state
        logger.info("decryption grant %s registered", policy.job_id)

    # -- P2-P5, P8 -----------------------------------------------------------------------

    def admit(
        self,
        *,
        job_id: str,
        step: int,
        tag: str,
        requester: str,
        count: int,
        digest: bytes,
        run_id: str = "",
        items: Sequence[bytes] = (),
    ) -> Admission:
        """Apply P2-P5 and P8 to one request (``items``: its ciphertexts' digests)."""
        with self._lock:
            state = self._jobs.get(job_id)
            if state is None:
                raise PolicyViolationError(f"job {job_id} has no registered decryption policy")
            job = state.policy
            if state.closed:
                raise PolicyViolationError(f"job {job_id} is finished; nothing more is decrypted")
            rule = job.rule(tag)
            if rule is None:
                raise PolicyViolationError(f"tag {tag} is not decryptable in job {job_id}")
            if requester != rule.requester:
                raise PolicyViolationError(
                    f"{requester} may not request {tag} (only {rule.requester})"
                )
            if rule.unit:
                if count < 1 or count > rule.count or count % rule.unit:
                    raise PolicyViolationError(
                        f"{tag} step {step}: {count} values requested; the policy allows up to "
                        f"{rule.count} in whole rows of {rule.unit}"
                    )
            elif count != rule.count:
                raise PolicyViolationError(
                    f"{tag} step {step}: {count} values requested, policy allows {rule.count}"
                )
            if job.expires_at is not None and time.time() > job.expires_at:
                raise PolicyViolationError(f"the decryption grant of {job_id} has expired")
            if rule.window is not None and not rule.window.contains(step):
                raise PolicyViolationError(f"{tag} step {step} is outside the job's schedule")
            shift = rule.window.run_shift if rule.window is not None else 0
            if shift and step >> shift > state.runs:  # P6: a newer run starts by RESUME
                raise PolicyViolationError(
                    f"{tag} step {step} belongs to run {step >> shift}, which was not "
                    f"resumed (newest run {state.runs})"
                )
            served = state.served.get((tag, step))
            if served is not None:  # P4
                if served != digest:
                    raise PolicyViolationError(
                        f"{tag} step {step} of job {job_id} was already served"
                    )
                if (tag, step) in state.replies:
                    return Admission.CACHED
                if (tag, step) in state.redone or step < state.high.get(tag, -1) - CACHED_STEPS:
                    raise PolicyViolationError(
                        f"{tag} step {step} of job {job_id} was already answered"
                    )
                state.redone.add((tag, step))  # once per process: then it is cached
                return Admission.REPEAT
            if rule.window is not None and step <= state.high.get(tag, -1):  # P3
                raise PolicyViolationError(
                    f"{tag} step {step} of job {job_id} lies behind step "
                    f"{state.high[tag]} already served"
                )
            used = state.counts.get(tag, 0)
            if rule.budget is not None and used + count > rule.budget:  # P5
                raise PolicyViolationError(
                    f"{tag} of job {job_id} would exceed its budget of {rule.budget} values"
                )
            total = sum(state.counts.values())
            if job.quota is not None and total + count > job.quota:
                raise PolicyViolationError(
                    f"{job_id} would exceed its quota ({total} of {job.quota} values used)"
                )
            if job.binder:
                self._spend(state, run_id, items, unit=max(rule.unit, 1))  # P8
            if rule.window is not None:  # P9: on disk before the reply leaves
                self._record(
                    state, {"served": tag, "step": step, "digest": digest.hex(), "n": count}
                )
            else:
                state.counts[tag] = used + count
            return Admission.NEW

    def _spend(self, state: _JobState, run_id: str, items: Sequence[bytes], *, unit: int) -> None:
        """P8: whole rows the binder registered for this session, unused, of one of its
        answers, within that answer's cap."""
        session = state.sessions.get(run_id)
        if session is None or not items:
            raise PolicyViolationError(
                "no ciphertexts of this scoring session were registered by the host"
            )
        places = [session.bound.get(d) for d in items]
        if any(p is None for p in places):
            raise PolicyViolationError("a ciphertext was not produced by the host for this session")
        groups = {p[0] for p in places if p is not None}
        rows = {p[1] for p in places if p is not None}
        if len(groups) != 1:
            raise PolicyViolationError("a request mixes ciphertexts of different host answers")
        if len(set(items)) != len(items) or session.spent.intersection(items):
            raise PolicyViolationError("a ciphertext was already decrypted")
        if len(items) != len(rows) * unit or any(not session.rows[r] <= set(items) for r in rows):
            raise PolicyViolationError("a request must hold whole rows of the host's answer")
        group = session.groups[groups.pop()]
        if group.used_rows + len(rows) > group.cap_rows:
            raise PolicyViolationError(
                f"the host's answer allows {group.cap_rows} rows to be decrypted "
                f"({group.used_rows} already were)"
            )
        group.used_rows += len(rows)
        session.spent.update(items)
        if group.used_rows == group.cap_rows:  # nothing more of it can be decrypted
            for item in group.items:
                place = session.bound.pop(item, None)
                if place is not None:
                    session.rows.pop(place[1], None)
                session.spent.discard(item)
            group.items.clear()

    def bind(
        self,
        *,
        job_id: str,
        run_id: str,
        group: int,
        cap_rows: int,
        items: Sequence[bytes],
        submitter: str,
        first: bool = True,
    ) -> None:
        """P8: ``submitter`` (the grant's binder) registers whole rows of ciphertexts it
        produced for the scoring session ``run_id`` (row-major, the grant's row width each),
        of which at most ``cap_rows`` rows of ``group`` may be decrypted. ``first`` opens
        the group (its cap fixed then); later registrations add to it. A group that is
        unknown when it is not ``first`` (lost to a restart or to older sessions being
        dropped) is refused, so its cap can never start again."""
        with self._lock:
            state = self._jobs.get(job_id)
            if state is None or not state.policy.binder:
                raise PolicyViolationError(f"{job_id} takes no registered ciphertexts")
            if submitter != state.policy.binder:
                raise PolicyViolationError(f"{submitter} may not register ciphertexts here")
            unit = max(state.policy.rules[0].unit, 1)
            if cap_rows < 1:
                raise PolicyViolationError("a registration must allow at least one row")
            if not items or len(items) % unit:
                raise PolicyViolationError(f"a registration holds whole rows of {unit} values")
            if len(items) > MAX_BOUND_PER_JOB:
                raise PolicyViolationError("too many ciphertexts registered at once")
            session = state.sessions.get(run_id)
            known = None if session is None else session.groups.get(group)
            if first and known is not None:
                raise PolicyViolationError("a registration opens an answer that exists already")
            if not first and known is None:
                raise PolicyViolationError(
                    "a registration adds to an answer the arbiter does not hold (restarted?)"
                )
            if known is not None and known.cap_rows != cap_rows:
                raise PolicyViolationError("a registration changes its group's cap")
            if session is None:
                session = state.sessions[run_id] = _Session()
            state.sessions.move_to_end(run_id)
            while len(state.sessions) > 1 and (
                len(state.sessions) > MAX_SESSIONS_PER_JOB
                or sum(len(s.bound) for s in state.sessions.values()) + len(items)
                > MAX_BOUND_PER_JOB
            ):
                state.sessions.popitem(last=False)  # the least recently used session
            if len(session.bound) + len(items) > MAX_BOUND_PER_JOB:
                raise PolicyViolationError("too many ciphertexts registered for one session")
            if len(set(items)) != len(items) or any(item in session.bound for item in items):
                raise PolicyViolationError("a ciphertext is registered twice")
            if known is None:
                known = session.groups[group] = _Group(cap_rows=cap_rows)
            for start in range(0, len(items), unit):
                row = session.next_row
                session.next_row += 1
                chunk = items[start : start + unit]
                session.rows[row] = frozenset(chunk)
                for item in chunk:
                    session.bound[item] = (group, row)
                    known.items.append(item)

    def end_session(self, job_id: str, run_id: str) -> None:
        """Drop a scoring session's registrations (its guest closed it)."""
        with self._lock:
            state = self._jobs.get(job_id)
            if state is not None:
                state.sessions.pop(run_id, None)

    # -- P4 cache ------------------------------------------------------------------------

    def cache_reply(self, *, job_id: str, step: int, tag: str, reply: Any) -> None:
        """Keep the reply sent for a served request (P4), the newest per tag only."""
        with self._lock:
            state = self._jobs.get(job_id)
            if state is None or not state.policy.cache_replies:
                return
            state.replies[(tag, step)] = reply
            mine = [key for key in state.replies if key[0] == tag]
            for key in mine[:-CACHED_STEPS]:
                del state.replies[key]

    def cached_reply(self, *, job_id: str, step: int, tag: str) -> Any | None:
        """The reply sent earlier for this request, if still cached."""
        with self._lock:
            state = self._jobs.get(job_id)
            return None if state is None else state.replies.get((tag, step))

    # -- P6, P7 --------------------------------------------------------------------------

    def resume(
        self,
        job_id: str,
        step: int,
        *,
        tag_steps: Mapping[str, int] | None = None,
        run: int | None = None,
    ) -> None:
        """P6: re-open steps ``>= step`` (per tag ``>= tag_steps[tag]``); for a job numbering
        its runs (FTL), ``run`` opens that newer run instead."""
        thresholds = {str(t): int(s) for t, s in (tag_steps or {}).items()}
        with self._lock:
            state = self._jobs.get(job_id)
            if state is None:
                raise PolicyViolationError(f"job {job_id} is not registered")
            if state.closed:
                raise PolicyViolationError(f"job {job_id} is finished")
            if state.resumes >= state.policy.max_resumes:
                raise PolicyViolationError(
                    f"job {job_id} was resumed {state.resumes} times, its limit"
                )
            if run is not None:
                if run <= state.runs:
                    raise PolicyViolationError(f"run {run} of job {job_id} is not a new run")
                self._record(state, {"run": run})
                logger.info("job %s: run %d opened", job_id, run)
                return
            for rule in state.policy.rules:
                point = thresholds.get(rule.tag, step)
                high = state.high.get(rule.tag, -1)
                if rule.window is None or rule.window.run_shift:
                    continue
                if point < 0 or point < high + 1 - rule.rewind:
                    raise PolicyViolationError(
                        f"resume point {point} of {rule.tag} lies more than {rule.rewind} "
                        f"steps behind step {high} already served"
                    )
            self._record(state, {"resume": step, "tag_steps": thresholds})
        logger.info("job %s resumed at step %d: steps re-opened", job_id, step)

    def close(self, job_id: str) -> ModelRecord | None:
        """P7, once every party sent JOB_DONE (the service collects them): close the job and
        return the model now registered for scoring (``None`` if the job's model is not
        scored through grants)."""
        with self._lock:
            state = self._jobs.get(job_id)
            if state is None:
                raise PolicyViolationError(f"job {job_id} is not registered")
            if not state.closed:
                self._record(state, {"closed": True})
            policy = state.policy
            if not policy.scoring_unit:
                return None
            record = self._models.get(job_id)
            if record is None:
                guest, host = policy.parties
                record = ModelRecord(
                    model_id=job_id,
                    guest=guest,
                    host=host,
                    key_id=policy.key_id.hex(),
                    kappa=policy.scoring_unit,
                    closed_at=time.time(),
                )
                models = {**self._models, job_id: record}
                if self._store is not None:  # on disk first (a full folder: not registered)
                    self._store.save_models(models)
                self._models = models
            return record

    def model(self, model_id: str) -> ModelRecord | None:
        """The registered model ``model_id`` (P7), if any."""
        with self._lock:
            return self._models.get(model_id)

    def job(self, job_id: str) -> JobPolicy | None:
        """The registered policy of ``job_id``, if any."""
        with self._lock:
            state = self._jobs.get(job_id)
            return None if state is None else state.policy

    def open_jobs(self) -> list[tuple[str, str]]:
        """``(job id, guest)`` of every registered job of two parties not yet closed."""
        with self._lock:
            return [
                (job_id, state.policy.parties[0])
                for job_id, state in sorted(self._jobs.items())
                if len(state.policy.parties) == 2 and not state.closed
            ]

    def closed(self, job_id: str) -> bool:
        """Whether ``job_id`` is registered and closed (P7)."""
        with self._lock:
            state = self._jobs.get(job_id)
            return state is not None and state.closed

    def counts(self, job_id: str) -> dict[str, int]:
        """Values decrypted per tag so far (the audit log's figures)."""
        with self._lock:
            state = self._jobs.get(job_id)
            return {} if state is None else dict(state.counts)
