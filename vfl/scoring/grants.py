"""The arbiter's scoring grants (step G1 of :mod:`vfl.scoring.protocol`, docs/protocol.md
§2.6 P8, §5.4).

Roles: the arbiter A grants scoring of a model it closed (P7) to that model's guest, under
its own operator's ``[scoring]`` policy; the grant binds every ``INF_Z`` decryption to the
model's host's registered ciphertexts. A learns the model id, the requester and counts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocols.arbiter.service import ArbiterService
from protocols.crypto.policy import JobPolicy, PolicyRule
from protocols.envelope import ControlBlock, Envelope
from protocols.errors import (
    ConfigError,
    PolicyViolationError,
    ProtocolError,
    VflError,
    peer_reason,
)
from protocols.files import atomic_write
from protocols.ids import check_identifier
from protocols.transport.base import Channel, MessageFilter
from vfl.config import ScoringGrant
from vfl.scoring.protocol import CHUNK_ROWS, ScoreTag, grant_id
from vfl.splitnn.spec import DecTag

logger = logging.getLogger(__name__)


class GrantKeeper:
    """The arbiter's scoring grants (G1): its own policy, usage kept across restarts.

    ``grant_for(model_id, first)`` applies the arbiter's configuration to a model first
    granted at unix time ``first`` (expiry counts from then). Only models in the arbiter's
    registry (trained and closed here, P7) are granted, to their guest, with their ``κ``;
    requests are bound to the ciphertexts the model's host registers (P8). Usage per grant
    and quota window is written atomically to ``<state_dir>/scoring_usage.json`` after
    every answered request and every new grant; it counts decrypted values: ``κ`` per row
    (the quota in rows is multiplied by ``κ`` when a grant is made). The grants themselves
    are kept there too and registered again when the arbiter starts (under its current
    configuration), so a restart does not break a guest's open session.
    """

    def __init__(
        self,
        *,
        service: ArbiterService,
        channel: Channel,
        grant_for: Callable[[str, float], ScoringGrant],
        state_dir: Path,
    ) -> None:
        self.service, self.channel, self.grant_for = service, channel, grant_for
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "scoring_usage.json"
        self._lock = threading.Lock()
        self.usage, self.first, self.window, self.grants = self._load()
        self._restore()
        service.on_served(self._served)
        channel.add_handler(MessageFilter.for_tags(ScoreTag.GRANT_REQ), self._on_request)

    def _load(
        self,
    ) -> tuple[dict[str, int], dict[str, float], dict[str, float], dict[str, dict[str, Any]]]:
        if not self.path.is_file():
            return {}, {}, {}, {}
        try:
            obj = json.loads(self.path.read_text())
            used = {str(k): int(v) for k, v in obj["used"].items()}
            first = {str(k): float(v) for k, v in obj["first"].items()}
            window = {str(k): float(v) for k, v in obj.get("window", first).items()}
            grants = {str(k): dict(v) for k, v in obj.get("grants", {}).items()}
            return used, first, window, grants
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ConfigError(
                f"{self.path} is unreadable ({type(exc).__name__}); restore it from backup "
                "(it holds the scoring quotas used so far)"
            ) from None

    def _save(self) -> None:
        body = {"used": self.usage, "first": self.first, "window": self.window}
        atomic_write(self.path, json.dumps({**body, "grants": self.grants}).encode(), mode=0o600)

    def _restore(self) -> None:
        """Register again the grants made before a restart (under today's configuration),
        so that a guest's open scoring session goes on; one that no longer passes is
        dropped and logged."""
        for job_id, req in list(self.grants.items()):
            try:
                policy, _ = self._grant(job_id=job_id, **req)
            except (VflError, KeyError, TypeError, ValueError) as exc:
                logger.warning("scoring grant %s not restored: %s", job_id, exc)
                continue
            with self._lock:
                used = self.usage.get(job_id, 0)
            self.service.policy.grant(policy, used={DecTag.INF_Z.value: used})

    def _served(self, job_id: str, tag: str, count: int) -> None:
        if tag != DecTag.INF_Z.value:
            return
        with self._lock:
            self.usage[job_id] = self.usage.get(job_id, 0) + count
            self._save()

    def _grant(
        self, *, job_id: str, model_id: str, requester: str, kappa: int, max_rows: int
    ) -> tuple[JobPolicy, dict[str, Any]]:
        """G1's checks; the grant's policy and the reply."""
        if job_id != grant_id(model_id):
            raise ProtocolError(
                "GRANT_REQ names another model than its envelope",
                public="GRANT_REQ names another model than its envelope",
            )
        if not 1 <= max_rows <= CHUNK_ROWS + 1:
            raise ProtocolError(
                "GRANT_REQ asks for an implausible request size",
                public="GRANT_REQ asks for an implausible request size",
            )
        model = self.service.policy.model(model_id)
        if model is None:
            raise PolicyViolationError(
                f"model {model_id} was not trained with this arbiter (or its training is "
                "not finished)"
            )
        if kappa != model.kappa:
            raise PolicyViolationError(f"model {model_id} scores rows of {model.kappa} values")
        if model.key_id != self.service.key_id.hex():
            raise PolicyViolationError(f"model {model_id} is under another key")
        now = time.time()
        with self._lock:
            allowed = self.grant_for(model_id, self.first.get(job_id, now)).requesters
        if requester != model.guest or requester not in allowed:
            raise PolicyViolationError(f"{requester} may not score model {model_id}")
        with self._lock:
            if job_id not in self.first:
                self.first[job_id] = now
                self.window[job_id] = now
                self._save()
            grant = self.grant_for(model_id, self.first[job_id])
            if now - self.window[job_id] >= grant.quota_days * 86400.0:
                self.window[job_id] = now  # a new quota window
                self.usage[job_id] = 0
                self._save()
            used = self.usage.get(job_id, 0)
        if now > grant.expires_at:
            raise PolicyViolationError(f"the scoring grant of model {model_id} has expired")
        policy = JobPolicy(
            job_id=job_id,
            key_id=self.service.key_id,
            rules=(PolicyRule(DecTag.INF_Z.value, requester, max_rows * kappa, unit=kappa),),
            quota=grant.quota_rows * kappa,
            expires_at=grant.expires_at,
            cache_replies=False,
            binder=model.host,
        )
        reply = {
            "quota_rows": grant.quota_rows,
            "used_rows": used // kappa,
            "expires_at": grant.expires_at,
        }
        return policy, {"used": used, **reply}

    def _policy(self, envelope: Envelope) -> tuple[JobPolicy, dict[str, Any]]:
        """G1: a guest's GRANT_REQ; the grant is kept for restarts."""
        if not isinstance(envelope.body, ControlBlock):
            raise ProtocolError("GRANT_REQ carries no control block")
        body = envelope.body.obj()
        model_id = check_identifier(body.get("model_id"), what="GRANT_REQ model id")
        if envelope.job_id != grant_id(model_id):
            raise ProtocolError(
                "GRANT_REQ names another model than its envelope",
                public="GRANT_REQ names another model than its envelope",
            )
        if bytes.fromhex(str(body["key_id"])) != self.service.key_id:
            raise PolicyViolationError(f"model {model_id} is under another key")
        request: dict[str, Any] = {
            "model_id": model_id,
            "requester": envelope.sender.party_id,
            "kappa": int(body["kappa"]),
            "max_rows": int(body["max_rows"]),
        }
        out = self._grant(job_id=envelope.job_id, **request)
        with self._lock:
            if self.grants.get(envelope.job_id) != request:
                self.grants[envelope.job_id] = request
                self._save()
        return out

    def _on_request(self, envelope: Envelope) -> None:
        """G1 at the arbiter."""
        try:
            policy, reply = self._policy(envelope)
            self.service.policy.grant(policy, used={DecTag.INF_Z.value: reply.pop("used")})
        except (VflError, KeyError, TypeError, ValueError) as exc:
            self.service.refuse(envelope, str(exc)[:300])  # in full: A's log and audit only
            if isinstance(exc, VflError):
                reply = {"refused": peer_reason(exc)}
            else:
                reply = {"refused": f"malformed request ({type(exc).__name__})"}
        self.service.reply(envelope, ScoreTag.GRANT, reply)
