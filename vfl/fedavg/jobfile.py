"""A horizontal FedAvg job as the coordinating guest's operator writes it (TOML).

Example (only ``type`` and ``[clients]`` are required)::

    [job]
    type = "horizontal"
    id = "credit-fedavg"         # default: a fresh id
    label_column = "y"           # binary 0/1; every other column but id_column is a feature
    id_column = "id"
    rounds = 20
    local_epochs = 1
    batch = 64
    clients_per_round = 0        # 0: every client each round; else sampled by the aggregator
    group_mask = true            # the aggregator learns nothing, not even the sums
    validation_fraction = 0.1    # each client's own validation rows, evaluated every round
    test_fraction = 0.0          # each client's own test rows, evaluated after the last round
    split_seed = 0
    impute = "error"             # or "mean": missing values become the global mean
    round_timeout_s = 600        # a client silent for this long aborts the round
    on_dropout = "retry"         # or "stop": what an aborted round does to the job

    [clients]                    # party id = its data alias; the submitting guest included
    bank = "credit"
    retailer = "credit"
    shop = "credit"

    [model]                      # MLP features -> widths; a fresh optimizer every round
    widths = [64, 32, 1]         # ends in 1; [1] is logistic regression
    activation = "relu"
    dropout = 0.0
    optimizer = "adam"           # or "sgd"
    learning_rate = 0.001
    momentum = 0.0
    weight_decay = 0.0
    init_seed = 0                # default: drawn at submission

    [dp]                         # optional: DP-SGD on every client (docs/protocol.md §7.2)
    noise_multiplier = 1.0
    max_grad_norm = 1.0
    delta = 1e-5
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from vfl.common.jobfile import JobKind, job_id_of, job_section, read_job_toml
from vfl.data.features import ImputePolicy
from vfl.fedavg.protocol import DropoutPolicy, FedJob, Optimizer
from vfl.privacy.dp import DPConfig

_JOB_KEYS = {
    "type",
    "id",
    "label_column",
    "id_column",
    "rounds",
    "local_epochs",
    "batch",
    "clients_per_round",
    "group_mask",
    "validation_fraction",
    "test_fraction",
    "split_seed",
    "impute",
    "round_timeout_s",
    "on_dropout",
}
_MODEL_KEYS = {
    "widths",
    "activation",
    "dropout",
    "optimizer",
    "learning_rate",
    "momentum",
    "weight_decay",
    "init_seed",
}
_DP_KEYS = {"noise_multiplier", "max_grad_norm", "delta"}


def with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """The job file with the values drawn at submission filled in (id, initial-model seed),
    so that a resubmitted request is the same job."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    out.setdefault("job", {}).setdefault("id", f"fedavg-{uuid.uuid4().hex[:12]}")
    out.setdefault("model", {}).setdefault("init_seed", secrets.randbits(31))
    return out


def parse_fed_job(raw: dict[str, Any], *, source: str, coordinator: str) -> FedJob:
    """Validate a horizontal job (the TOML file or an admin request), naming the problem."""
    unknown = set(raw) - {"job", "clients", "model", "dp"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {sorted(unknown)}; use job, clients, model, dp"
        )
    job = job_section(raw, "job", source, _JOB_KEYS)
    model = job_section(raw, "model", source, _MODEL_KEYS)
    clients = raw.get("clients")
    if not isinstance(clients, dict) or not clients:
        raise ConfigError(
            f"{source}: [clients] must map each client's party id to its data alias, e.g. "
            f'{coordinator} = "credit"'
        )
    if coordinator not in clients:
        raise ConfigError(
            f"{source}: [clients] must include {coordinator}, the party submitting the job"
        )
    for party_id, alias in clients.items():
        if not isinstance(alias, str) or not alias:
            raise ConfigError(f"{source}: clients.{party_id} must name a data alias")
    job_id = job_id_of(job, prefix="fedavg", source=source)
    dp_raw = raw.get("dp")
    try:
        dp = None
        if dp_raw is not None:
            dp_t = job_section(raw, "dp", source, _DP_KEYS)
            dp = DPConfig(
                noise_multiplier=float(dp_t.get("noise_multiplier", 1.0)),
                max_grad_norm=float(dp_t.get("max_grad_norm", 1.0)),
                delta=float(dp_t.get("delta", 1e-5)),
            )
        return FedJob(
            job_id=job_id,
            coordinator=coordinator,
            clients=tuple(sorted((str(c), str(a)) for c, a in clients.items())),
            label_column=str(job.get("label_column", "y")),
            id_column=str(job.get("id_column", "id")),
            rounds=_int(job, "rounds", 20),
            local_epochs=_int(job, "local_epochs", 1),
            batch=_int(job, "batch", 64),
            optimizer=Optimizer(model.get("optimizer", "adam")),
            learning_rate=float(model.get("learning_rate", 1e-3)),
            momentum=float(model.get("momentum", 0.0)),
            weight_decay=float(model.get("weight_decay", 0.0)),
            widths=tuple(int(w) for w in model.get("widths", (64, 32, 1))),
            activation=str(model.get("activation", "relu")),
            dropout=float(model.get("dropout", 0.0)),
            clients_per_round=_int(job, "clients_per_round", 0),
            group_mask=bool(job.get("group_mask", True)),
            validation_fraction=float(job.get("validation_fraction", 0.1)),
            test_fraction=float(job.get("test_fraction", 0.0)),
            split_seed=_int(job, "split_seed", 0),
            impute=ImputePolicy(job.get("impute", "error")),
            dp=dp,
            round_timeout_s=float(job.get("round_timeout_s", 600.0)),
            on_dropout=DropoutPolicy(job.get("on_dropout", "retry")),
            init_seed=_int(model, "init_seed", 0),
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _int(table: dict[str, Any], key: str, default: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class FedJobFile:
    """A parsed horizontal job file (what the guest's service runs)."""

    job: FedJob

    @property
    def guest_data(self) -> str:
        """The coordinator's own data alias."""
        return self.job.data_alias(self.job.coordinator)

    def to_json(self) -> dict[str, Any]:
        """The canonical job file of this job (its kind named, every default written, the
        values drawn at submission included)."""
        job = self.job
        out: dict[str, Any] = {
            "job": {
                "type": JobKind.HORIZONTAL.value,
                "id": job.job_id,
                "label_column": job.label_column,
                "id_column": job.id_column,
                "rounds": job.rounds,
                "local_epochs": job.local_epochs,
                "batch": job.batch,
                "clients_per_round": job.clients_per_round,
                "group_mask": job.group_mask,
                "validation_fraction": job.validation_fraction,
                "test_fraction": job.test_fraction,
                "split_seed": job.split_seed,
                "impute": job.impute.value,
                "round_timeout_s": job.round_timeout_s,
                "on_dropout": job.on_dropout.value,
            },
            "clients": dict(job.clients),
            "model": {
                "widths": list(job.widths),
                "activation": job.activation,
                "dropout": job.dropout,
                "optimizer": job.optimizer.value,
                "learning_rate": job.learning_rate,
                "momentum": job.momentum,
                "weight_decay": job.weight_decay,
                "init_seed": job.init_seed,
            },
        }
        if job.dp is not None:
            out["dp"] = {
                "noise_multiplier": job.dp.noise_multiplier,
                "max_grad_norm": job.dp.max_grad_norm,
                "delta": job.dp.delta,
            }
        return out


def load_fed_job_file(path: Path, *, coordinator: str) -> FedJobFile:
    """Read and validate a horizontal job file, naming the file and key of any problem."""
    raw = read_job_toml(path)
    return FedJobFile(parse_fed_job(raw, source=str(path), coordinator=coordinator))
