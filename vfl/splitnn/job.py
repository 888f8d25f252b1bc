"""The split-NN job and what G and H exchange about it: the offer, the schedule, progress
and the result (steps J1-J8 and R1-R3 are in :mod:`vfl.splitnn.session`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from protocols.crypto.paillier import PublicKey
from protocols.errors import (
    ConfigError,
    ProtocolError,
)
from protocols.ids import check_identifier
from vfl.data.tables import Splits
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.splitnn.spec import JobSpec, SplitMode
from vfl.splitnn.training import (
    TrainConfig,
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
    test_ids: list[str] = field(default_factory=list)  # the guest's ids of the test rows
    seed: int | None = None  # the job's seed (docs/protocol.md §4.4.2)
    decision: dict[str, Any] | None = None  # calibration and threshold (binary tasks)
    test_calibrated: dict[str, float] = field(default_factory=dict)  # metrics, calibrated

    def to_json(self) -> dict[str, Any]:
        """JSON form (``result.json``)."""
        return asdict(self)
