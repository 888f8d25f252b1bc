"""PSI in the party services (docs/protocol.md §3): a thin driver over
:mod:`vfl.service.alignment`.

Roles: the host answers a guest's ``HELLO`` under its ``[accept]`` and ``[psi]`` policies
(:func:`~vfl.service.alignment.answer_psi`); the guest's operator runs a PSI with admin
``psi`` (:func:`~vfl.service.alignment.run_psi`). A PSI is one exchange, not a job with
attempts: nothing here is retried or resubmitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from protocols.envelope import Envelope
from protocols.transport.base import MessageFilter
from psi.protocol import PsiTag
from vfl.config import JobType
from vfl.service.alignment import answer_psi
from vfl.service.driver import AdminHandler, Driver
from vfl.service.requests import AdminCommand, PsiRequest


class PsiDriver(Driver):
    """PSI: the host's answers, the guest's admin ``psi``."""

    kind: ClassVar[JobType] = JobType.PSI
    tags = (PsiTag,)

    def serve(self) -> None:
        """Answer ``HELLO`` (any role: a party that holds no data for it refuses it under its
        ``[accept]`` policy, with the rule)."""
        self.ctx.channel.add_handler(MessageFilter.for_tags(PsiTag.HELLO), self._on_hello)

    def commands(self) -> Mapping[AdminCommand, AdminHandler]:
        """Admin ``psi``."""
        return {AdminCommand.PSI: self._admin_psi}

    def _admin_psi(self, data: dict[str, Any]) -> dict[str, Any]:
        return self.ctx.run_psi(PsiRequest.from_json(data))

    def _on_hello(self, envelope: Envelope) -> None:
        answer_psi(
            config=self.ctx.config,
            channel=self.ctx.channel,
            envelope=envelope,
            executor=self.ctx.executor,
        )
