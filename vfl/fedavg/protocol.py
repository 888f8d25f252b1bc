"""The FedAvg job: its specification, its message tags and its message flow (docs/protocol.md §7).

Roles: clients ``P_1..P_m`` hold rows with the same columns (here the guest, which submits
the job and is its *coordinator*, and one or more hosts); the aggregator ``A`` is the
arbiter's service. Clients are ordered by party id (:func:`protocols.secagg.client_order`).

Keys: each client signs a fresh X25519 key per run with its certificate's key (ECDSA
P-256); every client holds the pinned certificates of the others and verifies each key
before deriving a pairwise seed from it, so A, which relays the keys, cannot substitute one.
A holds no key of this protocol.

What each party learns:

* A: the job specification, which clients take part, per-client validation metrics and
  validation row counts (about a tenth of each client's rows by default) and their weighted
  combination, and masked updates, each uniform on ``Z_2^64``. Without the
  group mask it also learns the sums: ``Σ n_i w_i``, ``Σ n_i`` and, from the statistics
  steps, the column means and scales of the union of the clients' training rows. With the
  group mask (the default) these sums are uniform to A too: it learns nothing about them.
* A client: the averaged model after each round, the global column statistics and the
  combined (not the other clients') validation metrics of each round. With two
  clients, the other client's update follows from the average and its own (§7.2); DP-SGD
  (``[dp]``) is the protection between the silos.

Message flow of one run (tags :class:`FedTag`; every message carries the run id):

F1. The coordinator sends ``START`` (the job) to each other client; each refuses a job whose
    id differs from the envelope's (docs/protocol.md §2.9), checks it against its
    ``[accept]`` policy and replies ``ACCEPT`` (or a refusal with its reason).
F2. Every client sends ``JOIN`` to A: the job, its digest, the digest of its column names,
    the rounds it holds checkpoints of, the digest of its initial model, and its signed
    ephemeral public key. A checks its own policy and that all clients sent the same job,
    columns and initial model, and picks the resume round: the newest round every client
    holds (clients save round ``r`` before reporting on it, and A starts round ``r+1`` only
    after every report of round ``r``, so they differ by at most one round). Only then does
    the run replace the job's older runs at A: a stray ``JOIN`` stops none
    (docs/protocol.md §4.4.1).
F3. A sends ``KEYS`` (every client's signed key and the resume round) to every client; each
    verifies every signature against the pinned certificate and derives its pairwise seeds.
    With the group mask and ``m > 2`` the first client draws ``K_group`` and sends it to
    each other client wrapped under a key derived from their pairwise seed (``GROUP``,
    relayed by A); with ``m = 2`` both derive it from their pairwise secret.
F4. Two secure aggregations of column statistics (aggregation numbers ``2^63`` and
    ``2^63 + 1``, never a round number): fractions of non-missing values, means and mean
    absolute values (``STATS``/``STATS_SUM`` step 0), then mean squared scaled deviations
    (step 1). Every client standardises with the resulting global means and deviations and
    imputes missing values with the global mean.
F5. Round ``r``: A sends ``ROUND`` (the participants, sampled per round if the job says so,
    and the combined metrics of round ``r−1``) to every client; each participant trains
    locally from the current model (DP-SGD if configured), encodes ``n_i·w_i`` and ``n_i``,
    checks the overflow guard, masks and sends ``UPDATE``. A sums the updates and sends
    ``AGG`` to every client, which decodes the average (removing the group mask first),
    saves round ``r`` and sends ``EVAL`` (validation metrics on its own rows; after the last
    round also test metrics). A combines them weighted by the clients' row counts.
F6. After the last round A sends ``DONE`` (the combined history); every client saves the
    final model and its result.
F7. If a participant's update does not arrive within the round timeout (or a send to a
    client fails), A sends ``ABORT`` to every client it can reach and never sends ``AGG`` for
    that round: nothing is unmasked, nobody learns a partial sum. The run ends; the
    coordinator starts a new run (fresh keys, resume from the saved rounds) or stops, as
    the job's ``on_dropout`` says.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocols.errors import ConfigError, TransportError
from protocols.ids import check_identifier
from vfl.data.features import ImputePolicy
from vfl.privacy.dp import DPConfig

STATS_ROUND = 2**63  # aggregation numbers of the statistics steps (F4): never a round number


class FedTag(StrEnum):
    """Message tags of a FedAvg run (steps F1-F7)."""

    START = "fedavg.START"
    ACCEPT = "fedavg.ACCEPT"
    JOIN = "fedavg.JOIN"
    KEYS = "fedavg.KEYS"
    GROUP = "fedavg.GROUP"
    STATS = "fedavg.STATS"
    STATS_SUM = "fedavg.STATS_SUM"
    ROUND = "fedavg.ROUND"
    UPDATE = "fedavg.UPDATE"
    AGG = "fedavg.AGG"
    EVAL = "fedavg.EVAL"
    DONE = "fedavg.DONE"
    ABORT = "fedavg.ABORT"


class Optimizer(StrEnum):
    """Local optimizer of every client (a fresh one each round)."""

    ADAM = "adam"
    SGD = "sgd"


class DropoutPolicy(StrEnum):
    """What the coordinator does when a round is aborted (F7)."""

    RETRY = "retry"
    STOP = "stop"


class RoundAbortedError(TransportError):
    """A round was aborted because a client did not deliver its update (F7)."""


@dataclass(frozen=True)
class FedJob:
    """A horizontal FedAvg job, as every client and the aggregator see it.

    Parameters
    ----------
    job_id
        The job's id.
    coordinator
        The submitting client (a guest).
    clients
        ``(party id, data alias)`` of every client, the coordinator included, sorted.
    label_column, id_column
        Column names; every other column is a feature, the same at every client.
    rounds, local_epochs, batch
        FedAvg rounds, local epochs per round, local mini-batch rows.
    optimizer, learning_rate, momentum, weight_decay
        The local optimizer, created fresh each round.
    widths, activation, dropout
        The model: an MLP ``features -> widths[0] -> ... -> widths[-1]`` (last width 1: one
        logit of a binary label). ``widths = (1,)`` is logistic regression.
    clients_per_round
        Participants per round, sampled by A; 0 means every client. At least 2 (a single
        participant's "sum" would be its own update).
    group_mask
        Add the group mask so that A learns nothing about the sums (F3, F5).
    validation_fraction, test_fraction, split_seed
        Each client's own stratified split of its rows.
    impute
        Missing values: ``error``, or filled with the global mean (any other policy).
    dp
        DP-SGD on every client, or ``None``.
    round_timeout_s
        How long A waits for a round's updates before aborting it (F7).
    on_dropout
        Whether an aborted round is followed by a new run or ends the job.
    init_seed
        Seed of the initial model, the same at every client (A checks their digests).
    """

    job_id: str
    coordinator: str
    clients: tuple[tuple[str, str], ...]
    label_column: str = "y"
    id_column: str = "id"
    rounds: int = 20
    local_epochs: int = 1
    batch: int = 64
    optimizer: Optimizer = Optimizer.ADAM
    learning_rate: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    widths: tuple[int, ...] = (64, 32, 1)
    activation: str = "relu"
    dropout: float = 0.0
    clients_per_round: int = 0
    group_mask: bool = True
    validation_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    impute: ImputePolicy = ImputePolicy.ERROR
    dp: DPConfig | None = None
    round_timeout_s: float = 600.0
    on_dropout: DropoutPolicy = DropoutPolicy.RETRY
    init_seed: int = 0

    def __post_init__(self) -> None:
        # it names a folder in every client's state (docs/protocol.md §2.9)
        check_identifier(self.job_id, what="job id", error=ConfigError)
        ids = [c for c, _ in self.clients]
        if len(set(ids)) != len(ids) or len(ids) < 2:
            raise ConfigError(f"job {self.job_id}: needs at least two distinct clients")
        if self.coordinator not in ids:
            raise ConfigError(f"job {self.job_id}: the coordinator must be one of the clients")
        for name, value in (
            ("rounds", self.rounds),
            ("local_epochs", self.local_epochs),
            ("batch", self.batch),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"job {self.job_id}: {name} must be a positive integer")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"job {self.job_id}: learning_rate must be positive")
        if not self.widths or min(self.widths) < 1 or self.widths[-1] != 1:
            raise ConfigError(
                f"job {self.job_id}: widths must be positive and end in 1 (one logit of a "
                f"binary label; widths = [1] is logistic regression), got {list(self.widths)}"
            )
        if self.clients_per_round and not 2 <= self.clients_per_round <= len(ids):
            raise ConfigError(
                f"job {self.job_id}: clients_per_round must be 0 (all) or between 2 and "
                f"{len(ids)}: secure aggregation needs at least two updates per sum"
            )
        if not (0 <= self.validation_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ConfigError(f"job {self.job_id}: fractions must lie in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ConfigError(f"job {self.job_id}: validation + test leave too few rows")
        if not self.round_timeout_s > 0:
            raise ConfigError(f"job {self.job_id}: round_timeout_s must be positive")

    @property
    def client_ids(self) -> tuple[str, ...]:
        """Client party ids in protocol order."""
        return tuple(sorted(c for c, _ in self.clients))

    def data_alias(self, party_id: str) -> str:
        """The data alias the job names for ``party_id``."""
        for client, alias in self.clients:
            if client == party_id:
                return alias
        raise ConfigError(f"job {self.job_id}: {party_id} is not one of its clients")

    def participants_per_round(self) -> int:
        """How many clients take part in each round."""
        return self.clients_per_round or len(self.clients)

    def to_json(self) -> dict[str, Any]:
        """The job as JSON (what ``START`` and ``JOIN`` carry)."""
        return {
            "job_id": self.job_id,
            "coordinator": self.coordinator,
            "clients": [list(c) for c in self.clients],
            "label_column": self.label_column,
            "id_column": self.id_column,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "batch": self.batch,
            "optimizer": self.optimizer.value,
            "learning_rate": self.learning_rate,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "widths": list(self.widths),
            "activation": self.activation,
            "dropout": self.dropout,
            "clients_per_round": self.clients_per_round,
            "group_mask": self.group_mask,
            "validation_fraction": self.validation_fraction,
            "test_fraction": self.test_fraction,
            "split_seed": self.split_seed,
            "impute": self.impute.value,
            "dp": None
            if self.dp is None
            else {
                "noise_multiplier": self.dp.noise_multiplier,
                "max_grad_norm": self.dp.max_grad_norm,
                "delta": self.dp.delta,
            },
            "round_timeout_s": self.round_timeout_s,
            "on_dropout": self.on_dropout.value,
            "init_seed": self.init_seed,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FedJob:
        """Parse what :meth:`to_json` wrote (``ConfigError`` naming the problem)."""
        try:
            dp = obj.get("dp")
            return cls(
                job_id=check_identifier(obj["job_id"], what="FedAvg job id"),
                coordinator=str(obj["coordinator"]),
                clients=tuple(sorted((str(c), str(a)) for c, a in obj["clients"])),
                label_column=str(obj["label_column"]),
                id_column=str(obj["id_column"]),
                rounds=int(obj["rounds"]),
                local_epochs=int(obj["local_epochs"]),
                batch=int(obj["batch"]),
                optimizer=Optimizer(obj["optimizer"]),
                learning_rate=float(obj["learning_rate"]),
                momentum=float(obj["momentum"]),
                weight_decay=float(obj["weight_decay"]),
                widths=tuple(int(w) for w in obj["widths"]),
                activation=str(obj["activation"]),
                dropout=float(obj["dropout"]),
                clients_per_round=int(obj["clients_per_round"]),
                group_mask=bool(obj["group_mask"]),
                validation_fraction=float(obj["validation_fraction"]),
                test_fraction=float(obj["test_fraction"]),
                split_seed=int(obj["split_seed"]),
                impute=ImputePolicy(obj["impute"]),
                dp=None
                if dp is None
                else DPConfig(
                    noise_multiplier=float(dp["noise_multiplier"]),
                    max_grad_norm=float(dp["max_grad_norm"]),
                    delta=float(dp["delta"]),
                ),
                round_timeout_s=float(obj["round_timeout_s"]),
                on_dropout=DropoutPolicy(obj["on_dropout"]),
                init_seed=int(obj["init_seed"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed FedAvg job: {type(exc).__name__}: {exc}") from None

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the job (F2: every client must send the same)."""
        return json_digest(self.to_json())


def json_digest(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FedResult:
    """What a client keeps at the end of a job (F6)."""

    job_id: str
    rounds: int
    history: tuple[dict[str, Any], ...]  # combined metrics per round, from A
    own: dict[str, Any]  # this client's last validation (and test) metrics
    epsilon: float | None  # DP: this client's ε after the last round
    model_dir: str

    def to_json(self) -> dict[str, Any]:
        """``result.json``."""
        return {
            "job_id": self.job_id,
            "rounds": self.rounds,
            "history": list(self.history),
            "own": self.own,
            "epsilon": self.epsilon,
            "model_dir": self.model_dir,
        }
