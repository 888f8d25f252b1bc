"""The arbiter's scoring policy, ``[scoring]``: who may score with which model, how much, how long.

:class:`ScoringPolicyConfig` (the section's defaults and per-model
:class:`ScoringModelPolicy` overrides) gives the :class:`ScoringGrant` that the arbiter's
:mod:`vfl.scoring.grants` applies to one model.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocols.errors import ConfigError
from vfl.config.network import PeerConfig, peer_ids
from vfl.config.values import only_keys, positive_int

_SCORING_KEYS = {"requesters", "quota_rows", "quota_days", "valid_days", "models"}
_SCORING_MODEL_KEYS = {"quota_rows", "expires", "requesters"}


@dataclass(frozen=True)
class ScoringGrant:
    """What the arbiter's operator allows for one model's scoring (see
    :meth:`ScoringPolicyConfig.grant`)."""

    model_id: str
    requesters: frozenset[str]
    quota_rows: int
    expires_at: float  # unix seconds
    quota_days: float = 30.0  # the window the quota counts over


@dataclass(frozen=True)
class ScoringModelPolicy:
    """``[scoring.models."<model_id>"]``: overrides of the defaults for one model."""

    quota_rows: int | None = None
    expires_at: float | None = None  # 00:00 UTC of the configured date, unix seconds
    requesters: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ScoringPolicyConfig:
    """The arbiter's scoring policy (``[scoring]``): who may score, how much, how long.

    Parameters
    ----------
    requesters
        Party ids that may request scores (:func:`parse_config` fills in the guest peers).
    quota_rows
        Rows each model may score per quota window.
    quota_days
        The quota window: usage counts from the window's start and starts again from 0
        after it.
    valid_days
        How long a grant lasts from when it is made.
    models
        Per-model overrides by model id.
    """

    requesters: tuple[str, ...] = ()
    quota_rows: int = 100_000
    quota_days: float = 30.0
    valid_days: float = 365.0
    models: Mapping[str, ScoringModelPolicy] = field(default_factory=dict)

    def grant(self, model_id: str, *, now: float) -> ScoringGrant:
        """The grant for ``model_id`` made at unix time ``now``: the model's overrides where
        it has them, the section's defaults otherwise."""
        override = self.models.get(model_id, ScoringModelPolicy())
        requesters = override.requesters if override.requesters is not None else self.requesters
        return ScoringGrant(
            model_id=model_id,
            requesters=frozenset(requesters),
            quota_rows=override.quota_rows if override.quota_rows is not None else self.quota_rows,
            quota_days=self.quota_days,
            expires_at=(
                override.expires_at
                if override.expires_at is not None
                else now + self.valid_days * 86400.0
            ),
        )


def parse_scoring(
    raw: Mapping[str, Any],
    *,
    where: str,
    guest_peers: tuple[str, ...],
    peers: list[PeerConfig],
) -> ScoringPolicyConfig:
    """``[scoring]`` (optional; the arbiter's): requesters default to the guest peers."""
    table = raw.get("scoring", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [scoring] must be a table")
    only_keys(table, _SCORING_KEYS, f"{where}: [scoring]")
    requesters = peer_ids(table, "requesters", f"{where}: scoring.requesters", peers, None)
    default = ScoringPolicyConfig()
    valid_days = _days(table, "valid_days", default.valid_days, f"{where}: scoring.valid_days")
    quota_days = _days(table, "quota_days", default.quota_days, f"{where}: scoring.quota_days")
    models_t = table.get("models", {})
    if not isinstance(models_t, dict):
        raise ConfigError(f'{where}: scoring.models must be tables [scoring.models."<model id>"]')
    models: dict[str, ScoringModelPolicy] = {}
    for model_id, model_t in models_t.items():
        mw = f'{where}: scoring.models."{model_id}"'
        if not isinstance(model_t, dict):
            raise ConfigError(f"{mw} must be a table")
        only_keys(model_t, _SCORING_MODEL_KEYS, mw)
        models[model_id] = ScoringModelPolicy(
            quota_rows=positive_int(model_t, "quota_rows", f"{mw}.quota_rows"),
            expires_at=_expiry(model_t.get("expires"), f"{mw}.expires"),
            requesters=peer_ids(model_t, "requesters", f"{mw}.requesters", peers, None),
        )
    return ScoringPolicyConfig(
        requesters=guest_peers if requesters is None else requesters,
        quota_rows=positive_int(table, "quota_rows", f"{where}: scoring.quota_rows")
        or default.quota_rows,
        quota_days=quota_days,
        valid_days=valid_days,
        models=models,
    )


def _days(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{where} must be a positive number of days, got {value!r}")
    return float(value)


def _expiry(value: Any, where: str) -> float | None:
    """A date ("YYYY-MM-DD", quoted or a TOML date) as 00:00 UTC of that day, unix seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.date.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a date like 2027-06-30") from None
    if isinstance(value, dt.datetime) or not isinstance(value, dt.date):
        raise ConfigError(f"{where} must be a date like 2027-06-30, got {value!r}")
    return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
