"""A federated-transfer-learning job as the guest's operator writes it (TOML).

Example (only ``type`` and the data aliases are required)::

    [job]
    type = "transfer"
    id = "ftl-2026-12"           # default: a fresh id
    guest_data = "customers"     # the guest's labelled rows
    host_data = "customers"      # the host's rows (no labels)
    id_column = "id"
    id_type = "email"            # PSI canonicalisation
    label_column = "y"           # binary
    psi_job = ""                 # an earlier PSI's job id; empty: run PSI first
    epochs = 20
    patience = 3                 # early stopping on the guest's held-out overlap pairs
    validation_fraction = 0.2
    score = true                 # score the host's customers outside the overlap (§6.6)
    score_owner = "host"         # who receives the scores: host (default) or guest

    [model]
    d = 8
    batch = 64                   # overlap pairs per step (>= 2)
    alpha = 1.0
    gamma = 0.0                  # > 0 needs ftl_reveal_overlap_repr (§6.4)
    guest_widths = [32]          # hidden widths before d; [] a linear representation
    host_widths = [32]
    guest_lr = 0.01
    host_lr = 0.003
    weight_decay = 0.0

    [protect]                    # the host-bound gradient (§6.3)
    mode = "gaussian"            # noise along Φ; "none" needs allow_label_leak
    noise = 1.0
    allow_label_leak = false
    ftl_reveal_overlap_repr = false
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocols.errors import ConfigError, InsecureConfigError
from psi.canon import IdType
from vfl.common.jobfile import JobKind, job_id_of, job_section, psi_job_of
from vfl.transfer.ftl import FtlConfig, FtlProtect
from vfl.transfer.session import FtlJob, ScoreOwner

TRANSFER = "transfer"
_JOB_KEYS = {
    "type",
    "id",
    "guest_data",
    "host_data",
    "id_column",
    "id_type",
    "label_column",
    "psi_job",
    "epochs",
    "patience",
    "validation_fraction",
    "score",
    "score_owner",
}
_MODEL_KEYS = {
    "d",
    "batch",
    "alpha",
    "gamma",
    "guest_widths",
    "host_widths",
    "guest_lr",
    "host_lr",
    "weight_decay",
}
_PROTECT_KEYS = {"mode", "noise", "allow_label_leak", "ftl_reveal_overlap_repr"}


@dataclass(frozen=True)
class FtlJobFile:
    """A parsed transfer job: the protocol job plus where each party's data comes from."""

    job: FtlJob
    guest_data: str
    host_data: str
    id_column: str = "id"
    id_type: str = "generic"
    label_column: str = "y"
    psi_job: str = ""
    score: bool = True

    def to_json(self) -> dict[str, Any]:
        """The canonical job file of this job (its kind named, every default written)."""
        job, config = self.job, self.job.config
        return {
            "job": {
                "type": JobKind.TRANSFER.value,
                "id": job.job_id,
                "guest_data": self.guest_data,
                "host_data": self.host_data,
                "id_column": self.id_column,
                "id_type": self.id_type,
                "label_column": self.label_column,
                "psi_job": self.psi_job,
                "epochs": job.epochs,
                "patience": job.patience,
                "validation_fraction": job.validation_fraction,
                "score": self.score,
                "score_owner": job.score_owner.value,
            },
            "model": {
                "d": config.d,
                "batch": config.batch,
                "alpha": config.alpha,
                "gamma": config.gamma,
                "guest_widths": list(job.guest_widths),
                "host_widths": list(job.host_widths),
                "guest_lr": job.guest_lr,
                "host_lr": job.host_lr,
                "weight_decay": job.weight_decay,
            },
            "protect": {
                "mode": config.protect.value,
                "noise": config.noise,
                "allow_label_leak": config.allow_label_leak,
                "ftl_reveal_overlap_repr": config.reveal_overlap_repr,
            },
        }


def parse_ftl_job(raw: dict[str, Any], *, source: str) -> FtlJobFile:
    """Validate a transfer job (the TOML file or an admin request), naming the problem;
    the F2 refusals (γ > 0 without the reveal flag, ``none`` without allow_label_leak,
    ``batch < 2``) are :class:`InsecureConfigError` / :class:`ConfigError` here."""
    unknown = set(raw) - {"job", "model", "protect"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {sorted(unknown)}; use job, model, protect"
        )
    job = job_section(raw, "job", source, _JOB_KEYS)
    model = job_section(raw, "model", source, _MODEL_KEYS)
    protect = job_section(raw, "protect", source, _PROTECT_KEYS)
    for key in ("guest_data", "host_data"):
        if not isinstance(job.get(key), str) or not job[key]:
            raise ConfigError(f"{source}: [job] {key} must name a data alias")
    job_id = job_id_of(job, prefix="ftl", source=source)
    psi_job = psi_job_of(job, source=source)
    try:
        config = FtlConfig(
            d=int(model.get("d", 8)),
            alpha=float(model.get("alpha", 1.0)),
            gamma=float(model.get("gamma", 0.0)),
            batch=int(model.get("batch", 64)),
            protect=FtlProtect(protect.get("mode", "gaussian")),
            noise=float(protect.get("noise", 1.0)),
            allow_label_leak=bool(protect.get("allow_label_leak", False)),
            reveal_overlap_repr=bool(protect.get("ftl_reveal_overlap_repr", False)),
        )
        ftl_job = FtlJob(
            job_id=job_id,
            config=config,
            guest_widths=tuple(int(w) for w in model.get("guest_widths", (32,))),
            host_widths=tuple(int(w) for w in model.get("host_widths", (32,))),
            epochs=int(job.get("epochs", 20)),
            patience=int(job.get("patience", 3)),
            guest_lr=float(model.get("guest_lr", 0.01)),
            host_lr=float(model.get("host_lr", 0.003)),
            weight_decay=float(model.get("weight_decay", 0.0)),
            validation_fraction=float(job.get("validation_fraction", 0.2)),
            score_owner=ScoreOwner(job.get("score_owner", "host")),
        )
        return FtlJobFile(
            job=ftl_job,
            guest_data=job["guest_data"],
            host_data=job["host_data"],
            id_column=str(job.get("id_column", "id")),
            id_type=IdType(job.get("id_type", "generic")).value,
            label_column=str(job.get("label_column", "y")),
            psi_job=psi_job,
            score=bool(job.get("score", True)),
        )
    except InsecureConfigError as exc:
        raise InsecureConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
