"""A split-NN training job as the guest's operator writes it (TOML).

Example (every key but the data aliases is optional)::

    [job]
    id = "credit-2026-12"        # default: a fresh id
    guest_data = "credit"        # the guest's own data alias ([data] of its party config)
    host_data = "credit"         # the host's alias; the host refuses aliases it lacks
    id_column = "id"
    id_type = "generic"          # PSI canonicalisation: generic, email, phone, national_id
    label_column = "y"
    psi_job = ""                 # an earlier PSI's job id; empty: run PSI first
    test_fraction = 0.2          # stratified hold-out, untouched until the end
    validation_fraction = 0.1    # of the training rows, for early stopping
    split_seed = 0
    seed = 42                    # reruns the job bit for bit (docs/protocol.md §4.4.2); never
                                 # sent; default: a fresh seed, recorded in the result
    mode = "p1"                  # p1 (packed, default) or p0 (reference)
    batch = 256
    batch_eval = 1024
    epochs = 12
    patience = 3
    plaintext = false            # experiments only: also needs --plaintext on the command line
    impute = "error"             # or "mean" / "median" / "zero" (the guest's features)
    classes = ["no", "yes"]      # label values in class order (binary: negative first);
                                 # default: the labels are 0 and 1

    [guest]                      # the guest's features (docs/bring-your-own-data.md)
    exclude_columns = ["branch"] # or feature_columns = [...]: exactly these
    categorical = {city = "frequency", segment = "onehot"}   # or ["city"]: one-hot
    date_columns = ["opened"]    # age in days, day of week, month
    max_categories = 20          # one-hot cap; rarer values share an "other" column

    [host]                       # only if the host's [accept] guest_features = true; the
                                 # same keys, applied at the host (default: its own
                                 # [features.<alias>])

    [decision]                   # binary models: fitted on the validation rows at the end
    calibration = "platt"        # or "isotonic", "none"
    threshold = "fpr"            # or "f_beta"
    target_fpr = 0.05            # fpr: the highest recall with at most this FPR
    beta = 1.0                   # f_beta: the threshold that maximises F-beta

    [model]                      # TrainConfig: d, k, widths, optimizer, learning rates ...
    d = 8
    k = 8

    [protect]                    # label protection of the host-bound gradient (§4.7)
    mode = "marvell"             # default; or rr_labels (ε-label-DP), gaussian, max_norm
    power_scale = 16             # marvell's s
    persistence = 1.0            # each row's noise fixed for the job (§4.7.1)
    max_visits = 3               # zero host-bound gradient from epoch 3 on; 0: no cap
    epsilon = 2.0                # rr_labels only; rr_prior = true: RR-with-prior
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError, InsecureConfigError
from psi.canon import IdType
from vfl.common.decision import DecisionConfig
from vfl.common.jobfile import JobKind, job_id_of, psi_job_of, read_job_toml
from vfl.data.features import FeatureSpec, ImputePolicy
from vfl.models.split import Task
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.splitnn.job import SplitJob
from vfl.splitnn.spec import SplitMode
from vfl.splitnn.training import TrainConfig

_JOB_KEYS = {
    "type",  # "split_nn" (the default; "horizontal" jobs are vfl.fedavg.jobfile's)
    "id",
    "guest_data",
    "host_data",
    "id_column",
    "id_type",
    "label_column",
    "psi_job",
    "test_fraction",
    "validation_fraction",
    "split_seed",
    "seed",
    "classes",
    "mode",
    "batch",
    "batch_eval",
    "epochs",
    "patience",
    "plaintext",
    "impute",
}


@dataclass(frozen=True)
class TrainJobFile:
    """A parsed job file: the protocol job plus where each party's data comes from."""

    job: SplitJob
    guest_data: str
    host_data: str
    id_column: str = "id"
    id_type: str = "generic"
    label_column: str = "y"
    psi_job: str = ""
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    split_seed: int = 0
    impute: ImputePolicy = ImputePolicy.ERROR
    seed: int | None = None  # the guest's job seed (never sent)
    classes: tuple[str, ...] | None = None
    guest_features: FeatureSpec = FeatureSpec()  # its impute is ``impute``
    host_features: FeatureSpec | None = None  # sent to the host, which may refuse it
    decision: DecisionConfig = DecisionConfig()

    def guest_spec(self) -> FeatureSpec:
        """The guest's features with the job's imputation policy."""
        return replace(self.guest_features, impute=self.impute)

    def to_json(self) -> dict[str, Any]:
        """The canonical job file of this job (its kind named, every default written): what
        the guest's service is sent, keeps and hashes (docs/protocol.md §4.4.1)."""
        return {
            "job": {
                "type": JobKind.SPLIT_NN.value,
                "id": self.job.job_id,
                "guest_data": self.guest_data,
                "host_data": self.host_data,
                "id_column": self.id_column,
                "id_type": self.id_type,
                "label_column": self.label_column,
                "psi_job": self.psi_job,
                "test_fraction": self.test_fraction,
                "validation_fraction": self.validation_fraction,
                "split_seed": self.split_seed,
                "seed": self.seed,
                "mode": self.job.mode.value,
                "batch": self.job.batch,
                "batch_eval": self.job.batch_eval,
                "epochs": self.job.epochs,
                "patience": self.job.patience,
                "plaintext": not self.job.encrypted,
                "impute": self.impute.value,
                "classes": None if self.classes is None else list(self.classes),
            },
            "guest": {k: v for k, v in self.guest_features.to_json().items() if k != "impute"},
            **({} if self.host_features is None else {"host": self.host_features.to_json()}),
            "decision": self.decision.to_json(),
            "model": {
                f.name: _plain(getattr(self.job.train, f.name))
                for f in fields(TrainConfig)
                if f.name != "protect"
            },
            "protect": {
                f.name: (
                    getattr(self.job.train.protect, f.name).value
                    if f.name == "mode"
                    else getattr(self.job.train.protect, f.name)
                )
                for f in fields(ProtectConfig)
            },
        }


def _plain(value: Any) -> Any:
    """A model value as JSON: a tuple as a list, an enum as its value."""
    if isinstance(value, tuple):
        return list(value)
    return value.value if isinstance(value, Enum) else value


def _as_floats(values: dict[str, Any], config: type) -> None:
    """Write a float field given as an integer (``1``) as the float (``1.0``), so one job has
    one canonical JSON whichever way its file spells the number."""
    for f in fields(config):
        value = values.get(f.name)
        if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            values[f.name] = float(value)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ConfigError(f"seed must be an integer in [0, 2^63), got {value!r}")
    return value


def _classes(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) < 2
        or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(
            'classes must list at least two label values, e.g. classes = ["no", "yes"]'
        )
    names = tuple(str(v) for v in value)
    if len(set(names)) != len(names):
        raise ConfigError(f"classes {list(names)} name a value twice")
    return names


def load_job_file(path: Path, *, allow_plaintext: bool = False) -> TrainJobFile:
    """Read and validate a job file, naming the file and key of any problem."""
    return parse_job(read_job_toml(path), source=str(path), allow_plaintext=allow_plaintext)


def parse_job(raw: dict[str, Any], *, source: str, allow_plaintext: bool = False) -> TrainJobFile:
    """Validate a job given as a dict (the TOML file, or an admin request)."""
    unknown = set(raw) - {"job", "model", "protect", "guest", "host", "decision"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {sorted(unknown)}; use job, model, protect, guest, "
            "host, decision"
        )
    guest_raw = dict(raw.get("guest", {}))
    if "impute" in guest_raw:
        raise ConfigError(f"{source}: set the guest's imputation in [job] impute, not [guest]")
    guest_features = FeatureSpec.parse(guest_raw, where=f"{source}: [guest]")
    host_features = (
        FeatureSpec.parse(dict(raw["host"]), where=f"{source}: [host]") if "host" in raw else None
    )
    decision = DecisionConfig.parse(dict(raw.get("decision", {})), where=f"{source}: [decision]")
    job = dict(raw.get("job", {}))
    bad = set(job) - _JOB_KEYS
    if bad:
        raise ConfigError(f"{source}: [job] has unknown key(s) {sorted(bad)}")
    for key in ("guest_data", "host_data"):
        if not isinstance(job.get(key), str) or not job[key]:
            raise ConfigError(f"{source}: [job] {key} must name a data alias")
    model = dict(raw.get("model", {}))
    names = {f.name for f in fields(TrainConfig)} - {"protect"}
    bad = set(model) - names
    if bad:
        raise ConfigError(
            f"{source}: [model] has unknown key(s) {sorted(bad)}; known: {sorted(names)}"
        )
    for key in ("guest_widths", "host_widths", "top_widths"):
        if key in model:
            model[key] = tuple(int(w) for w in model[key])
    _as_floats(model, TrainConfig)
    protect_raw = dict(raw.get("protect", {}))
    pnames = {f.name for f in fields(ProtectConfig)}
    bad = set(protect_raw) - pnames
    if bad:
        raise ConfigError(f"{source}: [protect] has unknown key(s) {sorted(bad)}")
    _as_floats(protect_raw, ProtectConfig)
    job_id = job_id_of(job, prefix="split", source=source)
    psi_job = psi_job_of(job, source=source)
    plaintext = bool(job.get("plaintext", False))
    if plaintext and not allow_plaintext:
        raise InsecureConfigError(
            f"{source}: plaintext = true sends everything unencrypted; pass --plaintext "
            "(experiments only) or remove it"
        )
    try:
        if "mode" in protect_raw:
            protect_raw["mode"] = ProtectMode(protect_raw["mode"])
        train = TrainConfig(**model, protect=ProtectConfig(**protect_raw))
        split_job = SplitJob(
            job_id=job_id,
            train=train,
            mode=SplitMode(job.get("mode", "p1")),
            batch=int(job.get("batch", 256)),
            batch_eval=int(job.get("batch_eval", 1024)),
            epochs=int(job.get("epochs", 12)),
            patience=int(job.get("patience", 3)),
            encrypted=not plaintext,
        )
        out = TrainJobFile(
            job=split_job,
            guest_data=job["guest_data"],
            host_data=job["host_data"],
            id_column=str(job.get("id_column", "id")),
            id_type=IdType(job.get("id_type", "generic")).value,
            label_column=str(job.get("label_column", "y")),
            psi_job=psi_job,
            test_fraction=float(job.get("test_fraction", 0.2)),
            validation_fraction=float(job.get("validation_fraction", 0.1)),
            split_seed=int(job.get("split_seed", 0)),
            impute=ImputePolicy(job.get("impute", "error")),
            seed=_seed(job.get("seed")),
            classes=_classes(job.get("classes")),
            guest_features=guest_features,
            host_features=host_features,
            decision=decision,
        )
        classes = out.classes
        wanted = train.outputs if train.task is Task.MULTICLASS else 2
        if classes is not None and (train.task is Task.REGRESSION or len(classes) != wanted):
            raise ConfigError(
                f"classes lists {len(classes)} values; a {train.task.value} task with this "
                f"model needs {wanted}"
                if train.task is not Task.REGRESSION
                else "a regression task has no classes"
            )
        return out
    except InsecureConfigError as exc:
        raise InsecureConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError, ConfigError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
