"""A split-NN training job between the guest, the host and the arbiter (docs/protocol.md §4.4.1).

Roles and keys: the arbiter A holds the Paillier key pair and hands out the public key; the
guest G (labels, its features) drives the job; the host H (its features) follows. What each
party learns is §4.6 plus, at H, the row indices of every batch and evaluation batch, which
rows are used to fit preprocessing, and one bit per epoch (validation improved or not, so
both can keep the best model). Nothing else crosses the wire in plaintext.

Job sequence (every message carries the run id of this (re)start, §4.4.1):

J1. G and H → A ``KEY_REQ``; A → ``KEY`` (the public key).
J2. G → H ``JOB_START{job, run id, G's checkpoints, schedule}`` and ``FIT_ROWS`` (the
    training rows, so H fits its preprocessing on them only); H checks the schedule against
    its own row counts (:meth:`Schedule.check_at_host`) and the job against its acceptance
    policy (its ``accept`` hook: guest, data alias, shapes, protection mode, then its
    column count and the arbiter's key size) and answers ``JOB_ACCEPT{H's checkpoints}``
    or ``JOB_ACCEPT{refused: reason}`` with the rule only (docs/protocol.md §1.7; G raises
    :class:`JobRefusedError`, not retried).
J3. G and H → A ``JOB_SPEC``; A → ``JOB_READY`` once both sent the same (policy, §2.6), or
    ``JOB_READY{refused: reason}`` if the job is outside A's own acceptance policy.
J4. Resume point ``t`` = the newest step both still hold. If there is one, both send
    ``RESUME{t, Z_EVAL counter}`` to A (which re-opens those steps once both asked) and load
    checkpoint ``t``; otherwise the joint initialisation I1-I3 and checkpoint 0.
J5. Step ``t``: S1-S6 of :mod:`vfl.splitnn.interactive`. G writes checkpoint ``t+1`` before
    ``STEP_ACK{t}`` and then keeps ``t`` and ``t+1``; H writes ``t+1`` after ``STEP_ACK{t}``
    and then deletes ``t``. So the parties are never more than one step apart.
J6. After each epoch, validation (``EVAL_BATCH``/``EVAL_F1``/``Z_EVAL``) and the metrics at G;
    if the validation AUC improved, G → H ``BEST{epoch}`` and both snapshot their checkpoint.
    Training stops early after ``patience`` epochs without improvement.
J7. G → H ``USE_BEST``; both restore the best snapshot; G evaluates the held-out test rows
    (never used before), writes ``result.json``, and sends ``JOB_END``.
J8. G and H → A ``JOB_DONE``; A closes the job and registers its model for scoring once
    both sent it (P7 of :mod:`protocols.crypto.policy`).

Outside a run (the services, :mod:`vfl.service.jobs`):

R1. H → G ``RUN_STOPPED{run id, reason}`` when H's service starts again after it stopped
    during a run (reason ``restarted``; not sent once G has started a run with the new H)
    or when H's part of a run failed (``failed``, with the error and whether a new run may
    help). G stops its current run (for ``failed`` only if it is the one named) and starts
    a new one (J1-J4 again with a new run id: both resume from their checkpoints) instead
    of waiting for its receive timeout. Its step is a fresh run number of H (never a replay).
R2. A session's :meth:`_Common.stop` ends its run: every receive of that run raises
    :class:`RunAbortedError` (a newer run of the same job replaces it, or the service stops).
R3. G → H and A ``JOB_FAILED{run id, reason}`` when G's job failed for good (not when it is
    only interrupted or retried): H stops its run of the job and, like A, records the job
    as failed with G's peer-safe reason, so no party shows it running. Its step is a fresh
    run number of G.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocols.crypto.arbiter import ArbiterService, SetupTag
from protocols.crypto.cipher import Cipher, PaillierCipher, PlaintextCipher
from protocols.crypto.fixedpoint import FixedPointConfig
from protocols.crypto.obfuscators import ObfuscatorPool, PlaintextPool
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.policy import DecryptionPolicy, JobPolicy
from protocols.envelope import ControlBlock, Envelope, IndexBlock
from protocols.errors import (
    ConfigError,
    JobRefusedError,
    NoSpaceError,
    PolicyViolationError,
    ProtocolError,
    RunAbortedError,
    TransportError,
    VflError,
    peer_reason,
)
from protocols.executor import Executor
from protocols.files import atomic_write, private_dir
from protocols.ids import check_identifier, state_path
from protocols.roles import Party
from protocols.transport.base import Channel, MessageFilter
from vfl.data.tables import BatchOrder, ImputePolicy, PartyTable, Preprocessor, Splits
from vfl.privacy.label_dp import LabelDpAccount, account, randomize_labels
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.scoring.model import config_to_json, save_model
from vfl.splitnn import checkpoint as ckpt
from vfl.splitnn.interactive import GuestLayer, HostLayer, SplitTag
from vfl.splitnn.metrics import selection_metric, task_metrics
from vfl.splitnn.spec import DecTag, JobSpec, SplitMode
from vfl.splitnn.training import (
    GuestTrainer,
    HostObserver,
    HostTrainer,
    TrainConfig,
    joint_init_component,
)

logger = logging.getLogger(__name__)


class JobTag(StrEnum):
    """Job-level messages between G and H (J2, J6, J7)."""

    JOB_START = "splitjob.JOB_START"
    FIT_ROWS = "splitjob.FIT_ROWS"
    JOB_ACCEPT = "splitjob.JOB_ACCEPT"
    BEST = "splitjob.BEST"
    USE_BEST = "splitjob.USE_BEST"
    JOB_END = "splitjob.JOB_END"
    RUN_STOPPED = "splitjob.RUN_STOPPED"  # R1: H tells G that a run of it ended early
    JOB_FAILED = "splitjob.JOB_FAILED"  # R3: G tells H and A that the job failed for good


DONE_WAIT_S = 120.0  # how long a party waits for the arbiter's answer to JOB_DONE (J8)

_HOST_TRAIN_FIELDS = (
    "d",
    "k",
    "host_widths",
    "activation",
    "dropout",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "eta_w",
    "a_max",
    "host_embedding_noise",
)


@dataclass(frozen=True)
class SplitJob:
    """What the guest submits: shapes, mode, schedule and the model configuration."""

    job_id: str
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: SplitMode = SplitMode.P1
    batch: int = 256
    batch_eval: int = 1024
    epochs: int = 12
    patience: int = 3
    encrypted: bool = True

    def __post_init__(self) -> None:
        # it names folders in each party's state (docs/protocol.md §2.9)
        check_identifier(self.job_id, what="job id", error=ConfigError)
        if min(self.batch, self.batch_eval, self.epochs, self.patience) < 1:
            raise ConfigError("batch, batch_eval, epochs and patience must be positive")
        if not self.encrypted:
            logger.warning(
                "job %s runs in PLAINTEXT mode: nothing is encrypted (experiments only)",
                self.job_id,
            )

    def spec(self, key: PublicKey, *, guest: str, host: str, schedule: Schedule) -> JobSpec:
        """The JOB_SPEC both parties send to the arbiter."""
        return JobSpec(
            epochs=self.epochs,
            steps_per_epoch=schedule.steps_per_epoch,
            eval_steps=schedule.eval_steps,
            eval_rewind=schedule.eval_rewind,
            job_id=self.job_id,
            key_id=key.key_id.hex(),
            key_bits=key.bits,
            mode=self.mode,
            batch=self.batch,
            d=self.train.d,
            k=self.train.k,
            batch_eval=self.batch_eval,
            guest=guest,
            host=host,
            encrypted=self.encrypted,
        )

    def host_part(self) -> dict[str, Any]:
        """What the host needs to know (no label-protection or guest-model settings)."""
        train = {name: getattr(self.train, name) for name in _HOST_TRAIN_FIELDS}
        train["host_widths"] = list(self.train.host_widths)
        return {
            "job_id": self.job_id,
            "mode": self.mode.value,
            "batch": self.batch,
            "batch_eval": self.batch_eval,
            "epochs": self.epochs,
            "encrypted": self.encrypted,
            "protect": self.train.protect.mode.value,  # checked by the host's accept policy
            "train": train,
        }

    @classmethod
    def from_host_part(cls, obj: dict[str, Any]) -> SplitJob:
        """The host's view of a job, naming the field at fault if it is malformed."""
        try:
            train = dict(obj["train"])
            unknown = set(train) - set(_HOST_TRAIN_FIELDS)
            if unknown:
                raise ConfigError(f"JOB_START has unknown model fields {sorted(unknown)}")
            train["host_widths"] = tuple(int(w) for w in train["host_widths"])
            # only the guest's protection mode reaches the host (for its accept policy)
            mode = ProtectMode(obj["protect"])
            protect = ProtectConfig(mode=mode, allow_label_leak=mode is ProtectMode.NONE)
            return cls(
                job_id=check_identifier(obj["job_id"], what="JOB_START job id"),
                train=TrainConfig(**train, protect=protect),
                mode=SplitMode(obj["mode"]),
                batch=int(obj["batch"]),
                batch_eval=int(obj["batch_eval"]),
                epochs=int(obj["epochs"]),
                encrypted=bool(obj["encrypted"]),
            )
        except KeyError as exc:
            raise ConfigError(f"JOB_START lacks field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"JOB_START is malformed: {exc}") from None


@dataclass(frozen=True)
class Schedule:
    """The steps a job asks the arbiter for (its JOB_SPEC's window, P2 of
    :mod:`protocols.crypto.policy`): training steps per epoch, ``Z_EVAL`` steps over the
    whole job (every validation round and the test round), and the longest round."""

    steps_per_epoch: int
    eval_steps: int
    eval_rewind: int

    @classmethod
    def of(cls, *, splits: Splits, batch: int, batch_eval: int, epochs: int) -> Schedule:
        """The guest's schedule from its row splits."""
        rounds = [math.ceil(len(splits.validation) / batch_eval)] * epochs
        test = math.ceil(len(splits.test) / batch_eval)
        return cls(
            steps_per_epoch=len(splits.train) // batch,
            eval_steps=max(sum(rounds) + test, 1),
            eval_rewind=max(*rounds, test, 1),
        )

    def check_at_host(self, *, job: SplitJob, rows: int, fit_rows: int) -> None:
        """H's check of the guest's evaluation steps against its own row counts: at most
        every row not used for training, evaluated after each epoch and once more."""
        limit = max(math.ceil(max(rows - fit_rows, 0) / job.batch_eval), 1)
        if self.eval_rewind > limit or self.eval_steps > (job.epochs + 1) * limit:
            raise ProtocolError("JOB_START asks for more evaluation steps than rows held out")


@dataclass(frozen=True)
class JobOffer:
    """What H is asked to do at J2, as far as it knows yet (for its acceptance policy).

    ``features`` (H's column count for the named data) and ``key_bits``/``key_id`` (the
    arbiter's key) are ``None``/empty until H has loaded its table and fetched the key.
    """

    guest: str
    job: SplitJob
    request: Mapping[str, Any]
    features: int | None = None
    key_bits: int | None = None
    key_id: str = ""


@dataclass(frozen=True)
class Progress:
    """One progress report of the guest (rates over the steps of this run)."""

    job_id: str
    epoch: int
    epochs: int
    step: int
    total_steps: int
    rows_per_s: float
    eta_s: float
    loss: float
    validation: dict[str, float] | None = None


@dataclass(frozen=True)
class SplitResult:
    """What the guest keeps of a finished job."""

    job_id: str
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]]
    test: dict[str, float]
    test_scores: list[Any]
    timings: dict[str, float]
    privacy: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON form (``result.json``)."""
        return asdict(self)


@dataclass
class _Common:
    """Plumbing shared by both sessions."""

    channel: Channel
    peer: Party
    arbiter: Party
    executor: Executor
    state_dir: Path
    timeout: float
    allow_test_key: bool
    pool_executor: Executor | None = None
    impute: ImputePolicy = ImputePolicy.ERROR

    def __post_init__(self) -> None:
        self.run_id = ""
        self.job_id = ""
        self.key_id = ""  # hex id of the arbiter's key once fetched (J1), for audit logs
        self._stop_lock = threading.Lock()
        self.stopped = False

    def stop(self) -> None:
        """R2: end this session's run; its receives raise :class:`RunAbortedError`.

        Safe from any thread, also before the run has started (it then stops at once).
        """
        with self._stop_lock:
            self.stopped = True
            job_id, run_id = self.job_id, self.run_id
        if job_id and run_id:
            dropped = self.channel.abort_run(job_id, run_id)
            logger.info(
                "job %s run %s stopped (%d unread messages dropped)", job_id, run_id, dropped
            )

    def _begin(self, job_id: str, run_id: str) -> None:
        """Set the run's ids; a :meth:`stop` that came first takes effect now."""
        with self._stop_lock:
            self.job_id, self.run_id = job_id, run_id
            stopped = self.stopped
        if stopped:
            self.channel.abort_run(job_id, run_id)
            raise RunAbortedError(f"job {job_id} run {run_id} was stopped before it started")

    def send(self, job_id: str, receiver: Party, tag: StrEnum, step: int, body: Any) -> None:
        self.channel.send(
            Envelope(
                job_id=job_id,
                sender=self.channel.me,
                receiver=receiver,
                tag=tag,
                step=step,
                run_id=self.run_id,
                body=body,
            )
        )

    def recv(
        self, job_id: str, sender: Party, tag: StrEnum, step: int = 0, *, timeout: float = 0.0
    ) -> Envelope:
        return self.channel.recv(
            job_id=job_id,
            sender=sender,
            tag=tag,
            step=step,
            run_id=self.run_id,
            timeout=timeout or self.timeout,
        )

    def control(
        self, job_id: str, sender: Party, tag: StrEnum, step: int = 0, *, timeout: float = 0.0
    ) -> dict[str, Any]:
        env = self.recv(job_id, sender, tag, step, timeout=timeout)
        if not isinstance(env.body, ControlBlock):
            raise ProtocolError(f"{tag} from {sender} carries no control block")
        obj = env.body.obj()
        if "refused" in obj:
            if obj.get("no_space") is True:  # flagged, never read from the text (§4.4.1)
                raise NoSpaceError(f"{sender} cannot go on: {str(obj['refused'])[:300]}")
            if tag in (JobTag.JOB_ACCEPT, SetupTag.JOB_READY):  # [accept] policy
                raise JobRefusedError(
                    f"{sender.party_id} refused job {job_id}: {obj['refused']} (change the job, "
                    f"or ask {sender.party_id}'s operator to allow it in its [accept] config)"
                )
            raise PolicyViolationError(f"{sender} refused job {job_id}: {obj['refused']}")
        return obj

    def public_key(self, job_id: str) -> PublicKey:
        """J1."""
        self.send(job_id, self.arbiter, SetupTag.KEY_REQ, 0, ControlBlock.from_obj({}))
        obj = self.control(job_id, self.arbiter, SetupTag.KEY)
        key = PublicKey.from_json(obj["public_key"], allow_test_key=self.allow_test_key)
        self.key_id = key.key_id.hex()
        return key

    def register(self, spec: JobSpec) -> None:
        """J3."""
        self.send(
            spec.job_id, self.arbiter, SetupTag.JOB_SPEC, 0, ControlBlock.from_obj(spec.to_json())
        )
        self.control(spec.job_id, self.arbiter, SetupTag.JOB_READY)

    def resume_at_arbiter(self, job_id: str, step: int, eval_step: int) -> None:
        """J4: both parties ask A to re-open the steps they will run again."""
        body = {"step": step, "tag_steps": {DecTag.Z_EVAL.value: eval_step}}
        self.send(job_id, self.arbiter, SetupTag.RESUME, step, ControlBlock.from_obj(body))
        self.control(job_id, self.arbiter, SetupTag.RESUMED, step)

    def finish_at_arbiter(self, job_id: str) -> None:
        """J8: both parties tell A the job is over; A closes it (no further decryption) and
        registers its model for scoring (P7 of :mod:`protocols.crypto.policy`). A model A
        did not register cannot be scored, which the log says; the job's result stands."""
        self.send(job_id, self.arbiter, SetupTag.JOB_DONE, 0, ControlBlock.from_obj({}))
        try:
            wait = min(self.timeout, DONE_WAIT_S)
            self.control(job_id, self.arbiter, SetupTag.JOB_DONE, timeout=wait)
        except (TimeoutError, TransportError, ProtocolError) as exc:
            logger.warning(
                "job %s: the arbiter did not register its model for scoring (%s)", job_id, exc
            )

    def _preprocess(self, job_dir: Path, table: PartyTable, fit_rows: np.ndarray) -> np.ndarray:
        """Fit scaling/imputation on the training rows only; keep it with the job's model."""
        pre = Preprocessor.fit(table, fit_rows, impute=self.impute)
        self.preprocessor = pre
        private_dir(job_dir)
        atomic_write(job_dir / "preprocessing.json", json.dumps(pre.to_json()).encode(), mode=0o600)
        return pre.transform(table)

    def export(
        self,
        *,
        job: SplitJob,
        spec: JobSpec,
        module: torch.nn.Module,
        big_ints: dict[str, np.ndarray],
        data: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Save this party's part of the trained model for scoring (model id = job id)."""
        role = "guest" if isinstance(self, GuestSession) else "host"
        manifest = {
            "job_id": job.job_id,
            "role": role,
            "party": self.channel.me.party_id,
            "peer": self.peer.party_id,
            "arbiter": self.arbiter.party_id,
            "columns": list(self.preprocessor.columns),
            "preprocessing": self.preprocessor.to_json(),
            "train": config_to_json(job.train),
            "spec": spec.to_json(),
            "fixed_point": asdict(FixedPointConfig()),
            "key_id": spec.key_id,
            "key_bits": spec.key_bits,
            "encrypted": job.encrypted,
            "metrics": metrics or {},
            "data": data,
        }
        folder = save_model(
            state_dir=self.state_dir,
            model_id=job.job_id,
            manifest=manifest,
            module=module,
            big_ints=big_ints,
        )
        logger.info("job %s: %s part of the model saved in %s", job.job_id, role, folder)

    def pool(self, key: PublicKey, *, encrypted: bool) -> ObfuscatorPool:
        if encrypted:
            return ObfuscatorPool(key, executor=self.pool_executor or self.executor)
        return PlaintextPool(key, executor=self.executor)

    def cipher(self, key: PublicKey, *, encrypted: bool) -> Cipher:
        if encrypted:
            return PaillierCipher(key)
        return PlaintextCipher(key, i_understand_nothing_is_encrypted=True)

    def next_run(self, job_dir: Path) -> int:
        """Count this party's (re)starts of the job, persisted before anything is sent.

        Sequence numbers of run ``r`` start at ``r·2^40``, past anything an interrupted run
        may have sent (the receivers' replay guards remember those).
        """
        return claim_run(self.channel, job_dir, (self.peer, self.arbiter))


def claim_run(channel: Channel, job_dir: Path, receivers: Iterable[Party]) -> int:
    """Persist the next run number of the job in ``job_dir`` and move the channel's sequence
    numbers to ``runs·2^40`` for ``receivers`` (see :meth:`_Common.next_run`); the services
    also claim one for each ``RUN_STOPPED`` notice, which may follow a restart."""
    private_dir(job_dir)  # jobs/ holds shares too
    path = job_dir / "runs"
    runs = int(path.read_text()) + 1 if path.is_file() else 1
    atomic_write(path, f"{runs}\n".encode(), mode=0o600)
    for party in receivers:
        channel.restore_stream_state(job_dir.name, {party.party_id: runs << 40})
    return runs


def resume_point(guest_steps: list[int], host_steps: list[int]) -> int | None:
    """The newest step both parties hold a checkpoint of (§4.4.1), if any."""
    common = set(guest_steps) & set(host_steps)
    return max(common) if common else None


class GuestSession(_Common):
    """G's side of a job: J1-J7 driven from here.

    Parameters
    ----------
    channel, host, arbiter
        G's channel and its peers.
    job
        The job to run.
    table
        G's rows in the PSI order, with labels.
    splits
        Train / validation / test rows (positions in ``table``), test rows untouched until J7.
    executor
        Worker processes for the Paillier work on the critical path.
    pool_executor
        Worker processes that fill the obfuscator pool in the background (default:
        ``executor``); the services give them a higher nice value so they only use idle CPU.
    state_dir
        Where this party keeps the job's checkpoints and result (``<state_dir>/jobs/<job>``).
    w0_seed, order_seed
        Reproducibility for experiments (None: the OS CSPRNG, the production default).
    progress
        Called after every step and validation (default: a log line every 10 s).
    after_step
        Called with the number of steps done after each step's checkpoint and ``STEP_ACK``
        (the services' test hold, ``[testing] allow_hold``; may raise to end the run).
    """

    def __init__(
        self,
        *,
        channel: Channel,
        host: Party,
        arbiter: Party,
        job: SplitJob,
        table: PartyTable,
        splits: Splits,
        executor: Executor,
        state_dir: Path,
        impute: ImputePolicy = ImputePolicy.ERROR,
        w0_seed: int | None = None,
        order_seed: bytes | None = None,
        pool_target: int = 2000,
        timeout: float = 600.0,
        allow_test_key: bool = False,
        progress: Callable[[Progress], None] | None = None,
        host_request: dict[str, Any] | None = None,
        pool_executor: Executor | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            channel=channel,
            peer=host,
            arbiter=arbiter,
            executor=executor,
            state_dir=state_dir,
            timeout=timeout,
            allow_test_key=allow_test_key,
            pool_executor=pool_executor,
            impute=impute,
        )
        if table.labels is None:
            raise ConfigError("the guest's table has no label column")
        self.labels: np.ndarray = table.labels
        self.train_labels = self.labels  # ỹ under rr_labels, set in run()
        self.job, self.table, self.splits = job, table, splits
        self.w0_seed, self.pool_target = w0_seed, pool_target
        self.host_request = dict(host_request or {})
        self.order_seed = order_seed or secrets.token_bytes(32)
        self.progress = progress or _log_progress()
        self.after_step = after_step
        self.job_dir = state_path(state_dir, "jobs", job.job_id)
        self.ckpt_dir = self.job_dir / "checkpoints"
        self.resumed_from: int | None = None
        self._epoch_orders: dict[int, list[np.ndarray]] = {}
        self.steps_per_epoch = len(splits.train) // job.batch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{len(splits.train)} training rows are fewer than one batch of {job.batch}"
            )

    # -- bookkeeping that survives restarts ------------------------------------------

    def _load_progress(self) -> dict[str, Any]:
        path = self.job_dir / "progress.json"
        if path.is_file():
            out: dict[str, Any] = json.loads(path.read_text())
            return out
        return {
            "history": [],
            "eval_step": 0,
            "best_epoch": -1,
            "order_seed": self.order_seed.hex(),
            "rr_seed": format(secrets.randbits(128), "x"),  # rr_labels: §4.7.2 step 1
        }

    def _save_progress(self, state: dict[str, Any]) -> None:
        atomic_write(self.job_dir / "progress.json", json.dumps(state).encode(), mode=0o600)

    # -- J1-J7 -----------------------------------------------------------------------

    def run(self) -> SplitResult:
        """Run (or resume) the job to the end; returns the test metrics and scores."""
        torch.set_num_threads(1)
        started = time.monotonic()
        job = self.job
        self._begin(job.job_id, f"run{self.next_run(self.job_dir)}")
        key = self.public_key(job.job_id)  # J1
        state = self._load_progress()
        self.order_seed = bytes.fromhex(state["order_seed"])
        mine = ckpt.available_steps(self.ckpt_dir)
        schedule = Schedule.of(
            splits=self.splits, batch=job.batch, batch_eval=job.batch_eval, epochs=job.epochs
        )
        start = dict(
            job.host_part(),
            request=self.host_request,
            checkpoints=mine,
            eval_step=state["eval_step"],
            schedule=asdict(schedule),
        )
        self.send(job.job_id, self.peer, JobTag.JOB_START, 0, ControlBlock.from_obj(start))  # J2
        self.send(
            job.job_id, self.peer, JobTag.FIT_ROWS, 0, IndexBlock.from_indices(self.splits.train)
        )
        theirs = [
            int(s) for s in self.control(job.job_id, self.peer, JobTag.JOB_ACCEPT)["checkpoints"]
        ]
        spec = job.spec(
            key, guest=self.channel.me.party_id, host=self.peer.party_id, schedule=schedule
        )
        self.register(spec)  # J3

        x = self._preprocess(self.job_dir, self.table, self.splits.train)
        cipher = self.cipher(key, encrypted=job.encrypted)
        pool = self.pool(key, encrypted=job.encrypted)
        layer = GuestLayer(
            channel=self.channel,
            peer=self.peer,
            arbiter=self.arbiter,
            spec=spec,
            cipher=cipher,
            pool=pool,
            executor=self.executor,
            fp=FixedPointConfig(),
            timeout=self.timeout,
        )
        layer.run_id = self.run_id
        self.train_labels = self._randomized_labels(x, state)
        trainer = GuestTrainer(
            layer=layer,
            x=x,
            y=self.train_labels,
            config=job.train,
            steps_per_epoch=self.steps_per_epoch,
        )
        t = resume_point(mine, theirs)  # J4
        self.resumed_from = t
        if mine and t is None:
            raise ProtocolError(
                f"job {job.job_id}: the host holds none of the guest's checkpoints {mine}; "
                "the shared weights are lost, start a new job"
            )
        try:
            if t is None:
                trainer.init(joint_init_component(job.train.d, job.train.k, seed=self.w0_seed))
                step = 0
                # the batch-order and rr_labels seeds first: a restart before checkpoint 0 then
                # draws neither again (§4.7.2 step 1)
                self._save_progress(state)
                self._checkpoint(trainer, 0)
            else:
                self.resume_at_arbiter(job.job_id, t, int(state["eval_step"]))
                trainer.restore(ckpt.load(self.ckpt_dir, t))
                step = t
                logger.info("job %s resumed at step %d (run %s)", job.job_id, t, self.run_id)
            setup_s = time.monotonic() - started
            pool.keep_filled(self.pool_target)  # generated while waiting, from here on
            result = self._train(layer, trainer, state, step, setup_s)
        finally:
            pool.close()
        return result

    def privacy(self) -> LabelDpAccount:
        """The accountant's statement for this job (ε only for ``rr_labels``, §4.7.2)."""
        protect = self.job.train.protect
        formal = protect.mode is ProtectMode.RR_LABELS
        return account(mode=protect.mode.value, epsilon=protect.epsilon if formal else None)

    def _randomized_labels(self, x: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        """The labels training and validation use: ``ỹ`` under ``rr_labels`` (§4.7.2), else y."""
        protect = self.job.train.protect
        if protect.mode is not ProtectMode.RR_LABELS:
            return self.labels
        rows = np.concatenate([self.splits.train, self.splits.validation])
        return randomize_labels(
            self.labels,
            rows=rows,
            x=x,
            epsilon=protect.epsilon,
            prior=protect.rr_prior,
            seed=int(state["rr_seed"], 16),
        )

    def _checkpoint(self, trainer: GuestTrainer, step: int) -> None:
        trees, big, meta = trainer.state()
        ckpt.save(self.ckpt_dir, step, trees=trees, big_ints=big, meta=meta)
        ckpt.prune(self.ckpt_dir, keep=(step - 1, step))

    def _orders(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._epoch_orders:
            order = BatchOrder(self.order_seed, batch_size=self.job.batch)
            self._epoch_orders = {epoch: order.epoch(self.splits.train, epoch)}
        return self._epoch_orders[epoch]

    def _train(
        self,
        layer: GuestLayer,
        trainer: GuestTrainer,
        state: dict[str, Any],
        step: int,
        setup_s: float,
    ) -> SplitResult:
        job, spe = self.job, self.steps_per_epoch
        total = job.epochs * spe
        t0, first = time.monotonic(), step
        train_s = eval_s = 0.0
        while True:
            epochs_done = step // spe
            if step % spe == 0 and len(state["history"]) < epochs_done:  # J6
                t_eval = time.monotonic()
                self._validate(layer, trainer, state, epochs_done - 1, step)
                eval_s += time.monotonic() - t_eval
            if step >= total or self._should_stop(state):
                break
            t_step = time.monotonic()
            epoch, i = divmod(step, spe)
            orders = self._orders(epoch)
            trainer.step(step, orders[i])  # J5
            self._checkpoint(trainer, step + 1)
            layer.ack(step)
            step += 1
            train_s += time.monotonic() - t_step
            elapsed = time.monotonic() - t0
            rate = (step - first) * job.batch / max(elapsed, 1e-9)
            self.progress(
                Progress(
                    job_id=job.job_id,
                    epoch=epoch,
                    epochs=job.epochs,
                    step=step,
                    total_steps=total,
                    rows_per_s=rate,
                    eta_s=(total - step) * job.batch / max(rate, 1e-9),
                    loss=trainer.losses[-1],
                )
            )
            if self.after_step is not None:
                self.after_step(step)
        return self._finish(layer, trainer, state, setup_s, train_s, eval_s)

    def _should_stop(self, state: dict[str, Any]) -> bool:
        history = state["history"]
        return bool(history) and len(history) - 1 - state["best_epoch"] >= self.job.patience

    def _scores(
        self, layer: GuestLayer, trainer: GuestTrainer, rows: np.ndarray, state: dict[str, Any]
    ) -> np.ndarray:
        """Scores for ``rows`` through EVAL batches of exactly ``batch_eval`` rows."""
        b = self.job.batch_eval
        out = []
        for start in range(0, len(rows), b):
            chunk = rows[start : start + b]
            padded = np.resize(chunk, b)  # the policy count is fixed: pad by repeating rows
            z_h = layer.evaluate(state["eval_step"], padded)
            state["eval_step"] += 1
            out.append(trainer.scores(z_h, padded)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros(0)

    def _validate(
        self, layer: GuestLayer, trainer: GuestTrainer, state: dict[str, Any], epoch: int, step: int
    ) -> None:
        rows = self.splits.validation
        metrics: dict[str, float] = {}
        if len(rows):  # without validation rows: no early stopping, the last epoch is kept
            scores = self._scores(layer, trainer, rows, state)
            metrics = task_metrics(self.job.train.task, self.train_labels[rows], scores)
        spe = self.steps_per_epoch
        metrics["train_loss"] = float(np.mean(trainer.losses[-spe:])) if trainer.losses else 0.0
        metrics["epoch"] = epoch
        state["history"].append(metrics)
        best = state["best_epoch"]
        key, higher = selection_metric(self.job.train.task)
        previous = state["history"][best].get(key) if best >= 0 else None
        if (
            previous is None
            or key not in metrics
            or (metrics[key] > previous if higher else metrics[key] < previous)
        ):
            state["best_epoch"] = epoch
            ckpt.snapshot_best(self.ckpt_dir, step)
            self.send(
                self.job.job_id,
                self.peer,
                JobTag.BEST,
                epoch,
                ControlBlock.from_obj({"step": step}),
            )
        self._save_progress(state)
        logger.info(
            "job %s epoch %d: validation %s",
            self.job.job_id,
            epoch,
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch"),
        )
        self.progress(
            Progress(
                job_id=self.job.job_id,
                epoch=epoch,
                epochs=self.job.epochs,
                step=step,
                total_steps=self.job.epochs * spe,
                rows_per_s=0.0,
                eta_s=0.0,
                loss=metrics["train_loss"],
                validation=metrics,
            )
        )

    def _finish(
        self,
        layer: GuestLayer,
        trainer: GuestTrainer,
        state: dict[str, Any],
        setup_s: float,
        train_s: float,
        eval_s: float,
    ) -> SplitResult:
        """J7."""
        job = self.job
        self.send(job.job_id, self.peer, JobTag.USE_BEST, 0, ControlBlock.from_obj({}))
        if state["best_epoch"] >= 0:
            trainer.restore(ckpt.load(self.ckpt_dir, ckpt.BEST))
        t_test = time.monotonic()
        rows = self.splits.test
        scores = self._scores(layer, trainer, rows, state)
        test = task_metrics(job.train.task, self.labels[rows], scores) if len(rows) else {}
        self._save_progress(state)
        self.send(job.job_id, self.peer, JobTag.JOB_END, 0, ControlBlock.from_obj({}))
        result = SplitResult(
            job_id=job.job_id,
            epochs_run=len(state["history"]),
            best_epoch=int(state["best_epoch"]),
            history=state["history"],
            test=test,
            test_scores=scores.tolist(),
            privacy=self.privacy().to_json(),
            timings={
                "setup_s": setup_s,
                "train_s": train_s,
                "eval_s": eval_s,
                "test_s": time.monotonic() - t_test,
            },
        )
        atomic_write(
            self.job_dir / "result.json", json.dumps(result.to_json()).encode(), mode=0o600
        )
        self.export(
            job=job,
            spec=layer.spec,
            module=trainer.models,
            big_ints={"wg": layer.wg},
            data={
                "host_alias": self.host_request.get("data", ""),
                "id_column": self.host_request.get("id_column", "id"),
            },
            metrics=test,
        )
        self.finish_at_arbiter(job.job_id)  # J8
        self.final_trainer = trainer
        return result


class HostSession(_Common):
    """H's side of a job: follows the guest's J2-J7.

    ``table_for(request)`` returns H's rows in the PSI order for the job (from its own data
    alias and PSI result named in the guest's request; a :class:`VflError` refuses the job);
    ``seed`` seeds H's own initialisation (None: OS CSPRNG). ``request_for(request)`` is H's
    own reading of the guest's request (its ``[psi]`` policy fixes the id column; a
    :class:`VflError` refuses the job). ``accept(offer)`` is H's
    acceptance policy: called at J2 before anything is written, again with H's column count
    once its table is loaded and again with the arbiter's key once fetched; a
    :class:`VflError` it raises refuses the job (``JOB_ACCEPT{refused}`` with its
    :func:`peer_reason`, never its full message) and :meth:`run` raises
    :class:`JobRefusedError`.
    """

    def __init__(
        self,
        *,
        channel: Channel,
        guest: Party,
        arbiter: Party,
        table_for: Callable[[dict[str, Any]], PartyTable],
        executor: Executor,
        state_dir: Path,
        impute: ImputePolicy = ImputePolicy.ERROR,
        seed: int | None = None,
        pool_target: int = 2000,
        timeout: float = 600.0,
        allow_test_key: bool = False,
        pool_executor: Executor | None = None,
        accept: Callable[[JobOffer], None] | None = None,
        observer: HostObserver | None = None,
        request_for: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            channel=channel,
            peer=guest,
            arbiter=arbiter,
            executor=executor,
            state_dir=state_dir,
            timeout=timeout,
            allow_test_key=allow_test_key,
            pool_executor=pool_executor,
            impute=impute,
        )
        self.table_for, self.seed = table_for, seed
        self.pool_target = pool_target
        self.accept = accept or (lambda offer: None)
        self.observer = observer
        self.request_for = request_for or (lambda request: request)

    def _refuse(self, job_id: str, exc: VflError) -> JobRefusedError:
        """J2: tell G why the job is refused (the rule, :func:`peer_reason`; the details only
        in H's log); the error for :meth:`run` to raise."""
        reason = str(exc)[:500]
        public = peer_reason(exc)
        self.send(
            job_id, self.peer, JobTag.JOB_ACCEPT, 0, ControlBlock.from_obj({"refused": public})
        )
        logger.warning("refused job %s of %s: %s", job_id, self.peer.party_id, reason)
        return JobRefusedError(
            f"refused job {job_id} of {self.peer.party_id}: {reason}", public=public
        )

    def run(self, start: Envelope) -> HostTrainer:
        """Serve the job that ``start`` (a ``JOB_START``) opens, until ``JOB_END``."""
        torch.set_num_threads(1)
        if not isinstance(start.body, ControlBlock):
            raise ProtocolError("JOB_START carries no control block")
        body = start.body.obj()
        self._begin(start.job_id, start.run_id)
        job_dir = state_path(self.state_dir, "jobs", start.job_id)  # checked at decode too
        ckpt_dir = job_dir / "checkpoints"
        self.next_run(job_dir)
        self.request = dict(body.get("request", {}))
        try:
            self.request = self.request_for(self.request)  # H's own reading of it
            job = SplitJob.from_host_part(body)
            if job.job_id != start.job_id:
                raise ProtocolError(
                    "JOB_START names another job than its envelope",
                    public="JOB_START names another job than its envelope",
                )
            offer = JobOffer(guest=self.peer.party_id, job=job, request=self.request)
            self.accept(offer)  # J2, before anything is written
        except VflError as exc:
            raise self._refuse(start.job_id, exc) from None
        guest_steps = [int(s) for s in body.get("checkpoints", [])]
        if not guest_steps:  # a new job under an old id: nothing to resume
            ckpt.prune(ckpt_dir, keep=())
            shutil.rmtree(ckpt_dir / ckpt.BEST, ignore_errors=True)
        mine = ckpt.available_steps(ckpt_dir)
        env = self.recv(job.job_id, self.peer, JobTag.FIT_ROWS)
        if not isinstance(env.body, IndexBlock):
            raise ProtocolError("FIT_ROWS carries no row indices")
        try:
            table = self.table_for(self.request)
            offer = dataclasses.replace(offer, features=len(table.columns))
            self.accept(offer)
            fit_rows = env.body.indices()
            try:
                schedule = Schedule(**{k: int(v) for k, v in dict(body["schedule"]).items()})
            except (KeyError, TypeError, ValueError):
                raise ProtocolError("JOB_START holds no valid schedule") from None
            if schedule.steps_per_epoch != len(fit_rows) // job.batch:
                raise ProtocolError("JOB_START's steps per epoch do not match its FIT_ROWS")
            schedule.check_at_host(job=job, rows=len(table), fit_rows=len(fit_rows))
            x = self._preprocess(job_dir, table, fit_rows)
            key = self.public_key(job.job_id)  # J1
            self.accept(dataclasses.replace(offer, key_bits=key.bits, key_id=self.key_id))
        except TransportError:
            raise  # not the job's fault: the guest tries again with a new run
        except VflError as exc:
            raise self._refuse(job.job_id, exc) from None
        spec = job.spec(
            key, guest=self.peer.party_id, host=self.channel.me.party_id, schedule=schedule
        )
        self.send(
            job.job_id,
            self.peer,
            JobTag.JOB_ACCEPT,
            0,
            ControlBlock.from_obj({"checkpoints": mine}),
        )
        self.register(spec)  # J3
        pool = self.pool(key, encrypted=job.encrypted)
        layer = HostLayer(
            channel=self.channel,
            peer=self.peer,
            arbiter=self.arbiter,
            spec=spec,
            cipher=self.cipher(key, encrypted=job.encrypted),
            pool=pool,
            executor=self.executor,
            fp=FixedPointConfig(),
            timeout=self.timeout,
        )
        layer.run_id = self.run_id
        trainer = HostTrainer(
            layer=layer, x=x, config=job.train, seed=self.seed, observer=self.observer
        )
        t = resume_point(guest_steps, mine)  # J4
        try:
            if t is None:
                w0_seed = None if self.seed is None else self.seed + 1000
                trainer.init(joint_init_component(job.train.d, job.train.k, seed=w0_seed))
                step = 0
                self._checkpoint(ckpt_dir, trainer, 0)
            else:
                eval_step = int(body.get("eval_step", 0))
                self.resume_at_arbiter(job.job_id, t, eval_step)
                trainer.restore(ckpt.load(ckpt_dir, t))
                step = t
            pool.keep_filled(self.pool_target)
            self._serve(job, layer, trainer, ckpt_dir, step)
        finally:
            pool.close()
        return trainer

    def _checkpoint(self, folder: Path, trainer: HostTrainer, step: int) -> None:
        trees, big, meta = trainer.state()
        ckpt.save(folder, step, trees=trees, big_ints=big, meta=meta)
        ckpt.prune(folder, keep=(step,))

    def _serve(
        self, job: SplitJob, layer: HostLayer, trainer: HostTrainer, folder: Path, step: int
    ) -> None:
        wanted = MessageFilter(
            job_id=job.job_id,
            sender=self.peer.party_id,
            tags=frozenset(
                t.value
                for t in (
                    JobTag.BEST,
                    JobTag.USE_BEST,
                    JobTag.JOB_END,
                    SplitTag.BATCH,
                    SplitTag.EVAL_BATCH,
                )
            ),
            run_id=self.run_id,  # messages of other runs are never taken (R2)
        )
        while True:
            env = self.channel.recv_any(wanted, timeout=self.timeout)
            if env.tag == SplitTag.BATCH.value:
                if env.step != step:
                    raise ProtocolError(f"BATCH for step {env.step}, expected step {step}")
                trainer.step(step, layer.rows_of(env, job.batch))  # J5
                layer.wait_ack(step)
                step += 1
                self._checkpoint(folder, trainer, step)
            elif env.tag == SplitTag.EVAL_BATCH.value:
                trainer.evaluate(env.step, layer.rows_of(env, job.batch_eval))
            elif env.tag == JobTag.BEST.value:
                ckpt.snapshot_best(folder, step)
            elif env.tag == JobTag.USE_BEST.value:
                if (folder / ckpt.BEST).is_dir():
                    trainer.restore(ckpt.load(folder, ckpt.BEST))
            else:
                self.export(
                    job=job,
                    spec=layer.spec,
                    module=trainer.bottom,
                    big_ints=layer.state(),
                    data={
                        "alias": str(self.request.get("data", "")),
                        "id_column": str(self.request.get("id_column", "id")),
                    },
                )
                self.finish_at_arbiter(job.job_id)  # J8
                logger.info("job %s finished at the host after %d steps", job.job_id, step)
                return


def serve_decryptions(
    *,
    channel: Channel,
    public_key: PublicKey,
    private_key: PrivateKey,
    executor: Executor,
    key_file: Path | None = None,
    admit: Callable[[dict[str, Any], Party], None] | None = None,
    policy_of: Callable[[dict[str, Any]], JobPolicy] | None = None,
    tags: Iterable[type[StrEnum]] = (DecTag,),
    policy: DecryptionPolicy | None = None,
) -> ArbiterService:
    """The arbiter's part of jobs: key, JOB_SPEC, RESUME and masked decryptions of ``tags``.

    ``admit(spec_body, sender)`` is the arbiter's acceptance policy for JOB_SPECs (see
    :meth:`ArbiterService.serve_setup`); ``policy_of`` derives a job's decryption policy
    from its JOB_SPEC (default: a split-NN spec); ``key_file``: the workers load the key
    from this file instead of receiving it (see :class:`ArbiterService`); ``policy``: the
    policy to enforce (default: a new one kept in memory only).
    """
    service = ArbiterService(
        channel=channel,
        cipher=PaillierCipher(public_key),
        private_key=private_key,
        policy=policy or DecryptionPolicy(),
        executor=executor,
        key_file=key_file,
    )
    for enum_cls in tags:
        service.serve(enum_cls)
    service.serve_setup(policy_of or (lambda obj: JobSpec.from_json(obj).policy()), admit=admit)
    return service


def wait_job_start(channel: Channel, *, timeout: float) -> Envelope:
    """The next ``JOB_START`` any guest sends (for hosts run outside a service)."""
    return channel.recv_any(MessageFilter.for_tags(JobTag.JOB_START), timeout=timeout)


def _log_progress(every_s: float = 10.0) -> Callable[[Progress], None]:
    last = [0.0]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if p.validation is None and now - last[0] < every_s and p.step < p.total_steps:
            return
        last[0] = now
        if p.validation is None:
            logger.info(
                "job %s epoch %d/%d step %d/%d: %.0f rows/s, ETA %.0f s, loss %.4f",
                p.job_id,
                p.epoch + 1,
                p.epochs,
                p.step,
                p.total_steps,
                p.rows_per_s,
                p.eta_s,
                p.loss,
            )

    return report
