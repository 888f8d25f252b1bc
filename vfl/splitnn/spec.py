"""The split-NN job spec: shapes, mode, the arbiter's policy and the §4.9 operation counts.

Roles: the guest G and the host H each send the same ``JOB_SPEC`` to the arbiter A (§4.4.1),
which registers the decryption policy derived here only when both agree
(:meth:`protocols.arbiter.service.DecryptionPolicy.propose`). A learns shapes and counts,
nothing else.

Counts per training step (``B`` rows, host embedding width ``d``, interactive width ``k``;
P1 packs ``S`` slots, ``κ_k = ⌈k/S⌉``, ``κ_d = ⌈d/S⌉``), from §2.6 and §4.9:

==================  =====================  ==================================
tag / item          P0                     P1
==================  =====================  ==================================
Z_FWD (to G)        B·k                    B·κ_k
G_BWD (to H)        B·d                    B·κ_d
V_WUPD (to G)       d·k                    d·κ_k
Z_EVAL (to G)       B_eval·k               B_eval·κ_k
scalar mults        3·B·d·k                2·B·d·κ_k + B·k·κ_d
fresh encryptions   B·k + d·k              B·κ_k + k·κ_d
obfuscations        B·k + d·k + B·d        B·κ_k + d·κ_k + B·κ_d
==================  =====================  ==================================
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from protocols.crypto.packing import capacity, slot_bits_for
from protocols.crypto.policy import JobPolicy, PolicyRule, StepWindow
from protocols.errors import ConfigError


class SplitMode(StrEnum):
    """P0: unpacked shares in Z_n (reference); P1: packed, statistically masked (default)."""

    P0 = "p0"
    P1 = "p1"


DEFAULT_MAX_RESUMES = 100  # RESUMEs a job may have at the arbiter (its [arbiter] max_resumes)
TRAIN_REWIND = 2  # steps a RESUME may re-open behind a training tag's newest served step:
# the parties are never more than one step apart (§4.4.1)


class DecTag(StrEnum):
    """Tags the arbiter decrypts for a split-NN job (§2.6)."""

    Z_FWD = "splitnn.Z_FWD"
    G_BWD = "splitnn.G_BWD"
    V_WUPD = "splitnn.V_WUPD"
    Z_EVAL = "splitnn.Z_EVAL"
    INF_Z = "splitnn.INF_Z"  # scoring (§5), under a grant of the arbiter's own policy


@dataclass(frozen=True)
class StepCounts:
    """Operation and message counts of one training step (§4.9)."""

    scalar_mults: int
    fresh_encryptions: int
    obfuscations: int
    decryptions: int
    ciphertexts_host_to_guest: int
    ciphertexts_guest_to_host: int
    ciphertexts_to_arbiter: int
    inverses: int

    @property
    def obfuscators(self) -> int:
        """``ρ`` values a step consumes (fresh encryptions + obfuscations)."""
        return self.fresh_encryptions + self.obfuscations


@dataclass(frozen=True)
class JobSpec:
    """What G and H agree on and send to A."""

    job_id: str
    key_id: str
    key_bits: int
    mode: SplitMode
    batch: int
    d: int
    k: int
    batch_eval: int
    guest: str
    host: str
    epochs: int = 1
    steps_per_epoch: int = 1
    eval_steps: int = 1
    eval_rewind: int = 1
    slot_bits: int = 0
    slots: int = 1
    encrypted: bool = True

    def __post_init__(self) -> None:
        if min(self.batch, self.d, self.k, self.batch_eval) < 1:
            raise ConfigError("batch, d, k and batch_eval must be positive")
        if min(self.epochs, self.steps_per_epoch, self.eval_steps, self.eval_rewind) < 1:
            raise ConfigError("the schedule (epochs, steps, evaluation steps) must be positive")
        if self.guest == self.host:
            raise ConfigError("a job's guest and host must be different parties")
        if self.mode is SplitMode.P1:
            s = self.slot_bits or slot_bits_for(
                d=self.d, k=self.k, batch=max(self.batch, self.batch_eval)
            )
            object.__setattr__(self, "slot_bits", s)
            object.__setattr__(self, "slots", capacity(self.key_bits, s))
        else:
            object.__setattr__(self, "slot_bits", 0)
            object.__setattr__(self, "slots", 1)

    @property
    def kappa_k(self) -> int:
        """Packed blocks per row of width k (k in P0)."""
        return math.ceil(self.k / self.slots)

    @property
    def kappa_d(self) -> int:
        """Packed blocks per row of width d (d in P0)."""
        return math.ceil(self.d / self.slots)

    def policy(self, *, max_resumes: int = DEFAULT_MAX_RESUMES) -> JobPolicy:
        """The arbiter's decryption policy for this job (§2.6): per tag its requester and
        count, its step window from the schedule (training tags: ``epochs ×
        steps_per_epoch``; ``Z_EVAL``: ``eval_steps``), how far a RESUME may rewind it
        (``TRAIN_REWIND`` steps; ``eval_rewind``, the longest validation or test round)
        and its budget ``count × (window + max_resumes × rewind)`` (P2-P6 of
        :mod:`protocols.crypto.policy`)."""
        b, d, b_eval = self.batch, self.d, self.batch_eval
        train = StepWindow(stop=self.epochs * self.steps_per_epoch)
        evals = StepWindow(stop=self.eval_steps)

        def rule(
            tag: DecTag, requester: str, count: int, window: StepWindow, rewind: int
        ) -> PolicyRule:
            budget = count * (window.steps + max_resumes * rewind)
            return PolicyRule(
                tag.value, requester, count, window=window, rewind=rewind, budget=budget
            )

        rules = (
            rule(DecTag.Z_FWD, self.guest, b * self.kappa_k, train, TRAIN_REWIND),
            rule(DecTag.G_BWD, self.host, b * self.kappa_d, train, TRAIN_REWIND),
            rule(DecTag.V_WUPD, self.guest, d * self.kappa_k, train, TRAIN_REWIND),
            rule(DecTag.Z_EVAL, self.guest, b_eval * self.kappa_k, evals, self.eval_rewind),
        )
        return JobPolicy(
            job_id=self.job_id,
            key_id=bytes.fromhex(self.key_id),
            rules=rules,
            parties=(self.guest, self.host),
            encrypted=self.encrypted,
            max_resumes=max_resumes,
            scoring_unit=self.kappa_k,
        )

    def step_counts(self) -> StepCounts:
        """§4.9 counts for one training step."""
        b, d, k = self.batch, self.d, self.k
        kk, kd = self.kappa_k, self.kappa_d
        if self.mode is SplitMode.P0:
            return StepCounts(
                scalar_mults=3 * b * d * k,
                fresh_encryptions=b * k + d * k,
                obfuscations=b * k + d * k + b * d,
                decryptions=b * k + d * k + b * d,
                ciphertexts_host_to_guest=b * k + 2 * d * k,
                ciphertexts_guest_to_host=b * k + b * d,
                ciphertexts_to_arbiter=b * k + d * k + b * d,
                inverses=d * k,
            )
        return StepCounts(
            scalar_mults=2 * b * d * kk + b * k * kd,
            fresh_encryptions=b * kk + k * kd,
            obfuscations=b * kk + d * kk + b * kd,
            decryptions=b * kk + d * kk + b * kd,
            ciphertexts_host_to_guest=b * kk + d * kk + k * kd,
            ciphertexts_guest_to_host=b * kk + b * kd,
            ciphertexts_to_arbiter=b * kk + d * kk + b * kd,
            inverses=d * kk,
        )

    def to_json(self) -> dict[str, Any]:
        """The JOB_SPEC body."""
        out = asdict(self)
        out["mode"] = self.mode.value
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> JobSpec:
        """Parse a received JOB_SPEC, naming the field at fault."""
        try:
            return cls(
                job_id=str(obj["job_id"]),
                key_id=str(obj["key_id"]),
                key_bits=int(obj["key_bits"]),
                mode=SplitMode(obj["mode"]),
                batch=int(obj["batch"]),
                d=int(obj["d"]),
                k=int(obj["k"]),
                batch_eval=int(obj["batch_eval"]),
                guest=str(obj["guest"]),
                host=str(obj["host"]),
                epochs=int(obj["epochs"]),
                steps_per_epoch=int(obj["steps_per_epoch"]),
                eval_steps=int(obj["eval_steps"]),
                eval_rewind=int(obj["eval_rewind"]),
                slot_bits=int(obj.get("slot_bits", 0)),
                encrypted=bool(obj.get("encrypted", True)),
            )
        except KeyError as exc:
            raise ConfigError(f"JOB_SPEC lacks field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"JOB_SPEC is malformed: {exc}", public="JOB_SPEC is malformed"
            ) from None

    def digest_text(self) -> str:
        """Canonical JSON (what both parties must agree on byte for byte)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
