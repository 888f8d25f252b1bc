"""Scoring in the party services (docs/protocol.md §5): a thin driver over
:class:`vfl.service.scoring.ScoringService`.

Roles: the arbiter keeps scoring grants (with its decryption service), the host answers
scoring sessions for models it saved, the guest's operator scores with admin ``score``
(online, or batch after a guest-only PSI the service runs itself). Scoring is a request and
its answer, not a job with attempts: nothing here is retried or resubmitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from protocols.errors import ConfigError
from protocols.roles import Role
from vfl.config import JobType
from vfl.scoring.protocol import ScoreTag
from vfl.service.driver import AdminHandler, Driver, ServiceContext
from vfl.service.requests import AdminCommand, ScoreRequest
from vfl.service.scoring import ScoringService


class ScoringDriver(Driver):
    """Scoring: grants at the arbiter, sessions at the host, admin ``score`` at the guest."""

    kind: ClassVar[JobType] = JobType.SCORING
    tags = (ScoreTag,)

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.service: ScoringService | None = None

    def serve(self) -> None:
        """Start the role's part (the arbiter's grants need its decryption service)."""
        ctx = self.ctx
        self.service = ScoringService(
            config=ctx.config,
            channel=ctx.channel,
            executor=ctx.executor,
            run_psi=ctx.run_psi,
            arbiter_service=ctx.arbiter,
            pool_executor=ctx.background() if ctx.config.party.role is Role.HOST else None,
        )

    def commands(self) -> Mapping[AdminCommand, AdminHandler]:
        """Admin ``score``."""
        return {AdminCommand.SCORE: self._admin_score}

    def _admin_score(self, data: dict[str, Any]) -> dict[str, Any]:
        request = ScoreRequest.from_json(data)
        if self.service is None:  # pragma: no cover - the runner serves every driver first
            raise ConfigError("scoring is not served yet")
        return self.service.score(request)

    def close(self) -> None:
        """Stop pools and sessions."""
        if self.service is not None:
            self.service.close()
