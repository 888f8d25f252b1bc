"""An FTL job between G (labelled source domain), H (unlabelled target domain) and A
(docs/protocol.md §6.3, §6.6), over any channel.

Roles and keys as in :mod:`vfl.transfer.ftl`: A holds ``sk_A`` and decrypts only masked
values under the job's policy (tags :class:`FtlDecTag`: ``FTL_GB`` for H, ``FTL_K``,
``FTL_LOSS`` and ``FTL_SCORE`` for G, or ``FTL_SCORE`` for H when H owns the scores).

Run (each step cites the T-steps of :mod:`vfl.transfer.ftl`):

R1. G fetches ``pk_A`` and sends ``START`` (the job) to H; H refuses a job whose id differs
    from the envelope's (docs/protocol.md §2.9), fetches ``pk_A`` and answers ``ACCEPT``
    with its column count; both register the same :class:`FtlSpec` with A (A1 and A2 of
    :class:`~protocols.arbiter.client.ArbiterClient`, which also opens runs, R6, and
    decrypts, R3-R4).
R2. Each party standardises its own columns with statistics of its own rows.
R3. Epoch ``e``: G computes ``Φ`` over all its labelled rows and sends ``[[Φ̂]]`` (T0,
    ``PHI``); for each batch G sends ``BATCH`` (positions of overlap pairs in PSI order),
    H answers ``T1``, G sends ``[[ĝ^B]]`` (``GB``) and asks A for ``K`` and the loss
    (T2-T5); H decrypts its gradient through A and updates ``Net^B`` (T3); with γ > 0 H
    also sends its overlap representations in plaintext (``UB``, §6.4). At the end of the
    epoch G updates ``Net^A`` once over all its rows (T6).
R4. Validation (G's held-out overlap pairs) and scoring (H's rows, §6.6): G sends
    ``SCORE_REQ`` (positions in H's table), H sends ``[[û_j]]`` (``SCORE_U``), G computes
    ``[[ŝ_j]] = Φ̂ᵀ[[û_j]]`` and has it decrypted by A for itself, or sends it to H
    (``SCORE_S``) when H owns the scores. Plaintext host representations never reach G.
R5. G sends ``DONE``.
R6. With a state folder, each party saves its state at the start of every epoch (the two
    newest kept, owner-only, in ``<state_dir>/jobs/<job id>/ftl``, a path built with
    :func:`protocols.ids.state_path`); ``START`` and ``ACCEPT`` list the epochs each holds and the
    run resumes at the newest both hold (H loads it at the first ``PHI``). Step numbers of
    a run start at its run counter times ``2^32`` (sent in ``START``), so a resumed run
    never asks A for a step it served before; a run after the first is opened at A by both
    parties (``RESUME{run}``, P6 of :mod:`protocols.crypto.policy`).
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.policy import JobPolicy, PolicyRule, StepWindow
from protocols.crypto.tensor import EncryptedTensor
from protocols.errors import ConfigError
from protocols.files import atomic_write, private_dir
from protocols.ids import check_identifier, state_path
from protocols.link import JobLink
from protocols.roles import Party
from vfl.transfer.ftl import (
    FtlConfig,
    FtlProtect,
)

logger = logging.getLogger(__name__)

SCORE_CHUNK = 512  # host rows per scoring request
SCORE_OFFSET = 2**31  # scoring steps of a run start here (R6)


def ftl_schedule(job: FtlJob, *, overlap: int, outside: int) -> tuple[int, int, int]:
    """The steps of a run (the JOB_SPEC's schedule): epochs, training steps per epoch, and the
    scoring steps of every validation and of H's rows outside the overlap. G and H each
    compute it from the job and the overlap and outside counts both know."""
    n_val = int(round(job.validation_fraction * overlap))
    chunks = math.ceil(n_val / SCORE_CHUNK) * job.epochs + math.ceil(outside / SCORE_CHUNK)
    return job.epochs, max((overlap - n_val) // job.config.batch, 1), max(chunks, 1)


def ftl_folder(state_dir: Path, job_id: str) -> Path:
    """R6: ``<state_dir>/jobs/<job_id>/ftl`` (:class:`~protocols.ids.UnsafePathError` unless
    the job id is an identifier and the folder stays in the state folder)."""
    return state_path(state_dir, "jobs", job_id, "ftl")


def claim_steps(folder: Path) -> int:
    """R6: this run's first step number, past every earlier run's (A serves each step once
    per tag): the run counter kept in the job's folder, times ``2^32``."""
    private_dir(folder)
    path = folder / "runs"
    runs = int(path.read_text()) + 1 if path.is_file() else 1
    atomic_write(path, f"{runs}\n".encode(), mode=0o600)
    return runs << 32


class FtlTag(StrEnum):
    """Messages between G and H (R1-R5)."""

    START = "ftl.START"
    ACCEPT = "ftl.ACCEPT"
    PHI = "ftl.PHI"
    BATCH = "ftl.BATCH"
    T1 = "ftl.T1"
    GB = "ftl.GB"
    UB = "ftl.UB"
    SCORE_REQ = "ftl.SCORE_REQ"
    SCORE_U = "ftl.SCORE_U"
    SCORE_S = "ftl.SCORE_S"
    DONE = "ftl.DONE"


class FtlDecTag(StrEnum):
    """What A decrypts for an FTL job (§2.6)."""

    GB = "ftl.FTL_GB"
    K = "ftl.FTL_K"
    LOSS = "ftl.FTL_LOSS"
    SCORE = "ftl.FTL_SCORE"
    VAL = "ftl.FTL_VAL"  # G's validation scores of held-out overlap pairs


class ScoreOwner(StrEnum):
    """Who receives the scores of H's customers (§6.6)."""

    GUEST = "guest"
    HOST = "host"


@dataclass(frozen=True)
class FtlSpec:
    """What G and H agree on and register with A (``kind = "ftl"``)."""

    job_id: str
    key_id: str
    key_bits: int
    batch: int
    d: int
    guest: str
    host: str
    score_owner: ScoreOwner = ScoreOwner.GUEST
    schedule: tuple[int, int, int] = (1, 1, 1)  # epochs, steps per epoch, scoring steps

    def policy(self, *, max_resumes: int = 100) -> JobPolicy:
        """A's decryption policy: per step ``B·d`` for H, ``d`` and 1 for G, up to
        ``SCORE_CHUNK`` scores per request for the score owner. Steps of run ``r`` are
        ``r·2^32 + offset`` (R6): training offsets ``< epochs × steps_per_epoch``, scoring
        offsets ``2^31 + i`` for ``i < score_steps``; at most ``max_resumes + 1`` runs,
        and per tag a budget of one whole schedule plus two epochs (training) or one
        scoring schedule (scores) per resume (P2-P5 of :mod:`protocols.crypto.policy`)."""
        owner = self.guest if self.score_owner is ScoreOwner.GUEST else self.host
        runs = max_resumes + 1
        epochs, steps_per_epoch, score_steps = self.schedule
        train = StepWindow(stop=epochs * steps_per_epoch, run_shift=32, max_runs=runs)
        score = StepWindow(
            start=SCORE_OFFSET, stop=SCORE_OFFSET + score_steps, run_shift=32, max_runs=runs
        )

        def rule(tag: FtlDecTag, requester: str, count: int, unit: int = 0) -> PolicyRule:
            window = score if unit else train
            rewind = window.steps if unit else 2 * steps_per_epoch
            return PolicyRule(
                tag.value,
                requester,
                count,
                unit=unit,
                window=window,
                rewind=rewind,
                budget=count * (window.steps + max_resumes * rewind),
            )

        return JobPolicy(
            job_id=self.job_id,
            key_id=bytes.fromhex(self.key_id),
            rules=(
                rule(FtlDecTag.GB, self.host, self.batch * self.d),
                rule(FtlDecTag.K, self.guest, self.d),
                rule(FtlDecTag.LOSS, self.guest, 1),
                rule(FtlDecTag.SCORE, owner, SCORE_CHUNK, unit=1),
                rule(FtlDecTag.VAL, self.guest, SCORE_CHUNK, unit=1),
            ),
            parties=(self.guest, self.host),
            max_resumes=max_resumes,
        )

    def to_json(self) -> dict[str, Any]:
        """The JOB_SPEC body."""
        out = asdict(self)
        out["score_owner"] = self.score_owner.value
        out["schedule"] = list(self.schedule)
        out["kind"] = "ftl"
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FtlSpec:
        """Parse a received JOB_SPEC, naming the field at fault."""
        try:
            return cls(
                job_id=str(obj["job_id"]),
                key_id=str(obj["key_id"]),
                key_bits=int(obj["key_bits"]),
                batch=int(obj["batch"]),
                d=int(obj["d"]),
                guest=str(obj["guest"]),
                host=str(obj["host"]),
                score_owner=ScoreOwner(obj.get("score_owner", "guest")),
                schedule=(
                    int(obj["schedule"][0]),
                    int(obj["schedule"][1]),
                    int(obj["schedule"][2]),
                ),
            )
        except KeyError as exc:
            raise ConfigError(f"FTL JOB_SPEC lacks field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"FTL JOB_SPEC is malformed: {exc}") from None


@dataclass(frozen=True)
class FtlJob:
    """An FTL job: the model (``config``), training and scoring parameters."""

    job_id: str = field(default_factory=lambda: f"ftl-{uuid.uuid4().hex[:12]}")
    config: FtlConfig = field(default_factory=FtlConfig)
    guest_widths: tuple[int, ...] = (32,)
    host_widths: tuple[int, ...] = (32,)
    epochs: int = 20
    patience: int = 3
    guest_lr: float = 0.01
    host_lr: float = 0.003
    weight_decay: float = 0.0
    validation_fraction: float = 0.2
    score_owner: ScoreOwner = ScoreOwner.GUEST

    def __post_init__(self) -> None:
        # it names a folder in each party's state (docs/protocol.md §2.9)
        check_identifier(self.job_id, what="job id", error=ConfigError)
        for name in ("guest_widths", "host_widths"):
            widths = getattr(self, name)
            if any(w < 1 for w in widths):
                raise ConfigError(
                    f"{name} = {list(widths)}: hidden widths must be >= 1; [] gives a linear "
                    "representation (one linear layer to d, tanh-bounded)"
                )

    def to_json(self) -> dict[str, Any]:
        """The job as JSON (``START``)."""
        out = asdict(self)
        out["config"]["protect"] = self.config.protect.value
        out["score_owner"] = self.score_owner.value
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FtlJob:
        """Parse :meth:`to_json` output (``ConfigError`` naming the problem)."""
        try:
            raw = dict(obj["config"])
            raw["protect"] = FtlProtect(raw["protect"])
            return cls(
                job_id=check_identifier(obj["job_id"], what="FTL job id"),
                config=FtlConfig(**raw),
                guest_widths=tuple(int(w) for w in obj["guest_widths"]),
                host_widths=tuple(int(w) for w in obj["host_widths"]),
                epochs=int(obj["epochs"]),
                patience=int(obj["patience"]),
                guest_lr=float(obj["guest_lr"]),
                host_lr=float(obj["host_lr"]),
                weight_decay=float(obj["weight_decay"]),
                validation_fraction=float(obj["validation_fraction"]),
                score_owner=ScoreOwner(obj["score_owner"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed FTL job: {type(exc).__name__}: {exc}") from None


def column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R2: a party's column means and deviations (1 for a constant column), NaN ignored."""
    std = np.nanstd(x, axis=0)
    return np.nanmean(x, axis=0), np.where(std > 1e-12, std, 1.0)


def standardise(x: np.ndarray, *, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """R2: each party's own columns, by statistics of its own rows (float32; NaN becomes 0).

    ``stats``: :func:`column_stats` of the rows the model was trained on, for new rows
    (default: those of ``x``)."""
    mean, std = column_stats(x) if stats is None else stats
    z = np.asarray((x - mean) / std, dtype=np.float64)
    return np.nan_to_num(z, nan=0.0).astype(np.float32)


def cipher_tensor(
    link: JobLink, sender: Party, tag: StrEnum, step: int, cipher: PaillierCipher
) -> EncryptedTensor:
    """The ciphertexts of ``sender``'s ``tag`` of ``step``, under the job's key."""
    block = link.cipher(sender, tag, step)
    return EncryptedTensor.from_block(block, cipher=cipher, key_id=cipher.key.key_id)


@dataclass(frozen=True)
class FtlResult:
    """G's view of a finished job."""

    job_id: str
    epochs: int
    best_epoch: int
    history: tuple[dict[str, float], ...]
    scores: np.ndarray | None  # scores of H's requested rows, if G owns them
    seconds: float
    validation: tuple[list[int], list[float]] = ([], [])
    # labels (0/1) and scores of the held-out overlap pairs at the best epoch
    phi: tuple[float, ...] = ()
    # G's Φ of the best epoch, its part of the model: H's row j scores Φ·u^B_j (§6.6)
