"""One job's link to its peers: the only place above the transport that builds envelopes.

Every protocol message belongs to one job and one run (docs/protocol.md §2.9): a
:class:`JobLink` holds those ids, the channel and the receive timeout, and fills in the
routing of every envelope it sends (sender = this party, job id, run id and, when given,
the key id of a ciphertext body). Answers go back on the route of the request they answer
(:meth:`JobLink.answering`): same job, run and step, to the request's sender. A refusal is an
answer whose control block is ``{"refused": reason}``; the reason is written for the peer
(docs/protocol.md §1.7) and never carries this party's paths, columns or counts; the one who
asked turns it into its typed error with :func:`raise_if_refused`.

Roles and keys: none; a link carries whatever body it is given. What a peer learns is what
the calling protocol sends; the link adds nothing but the routing fields of §2.9.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from protocols.envelope import Body, CipherBlock, ControlBlock, Envelope, control_of
from protocols.errors import (
    JobRefusedError,
    MalformedEnvelopeError,
    NoSpaceError,
    PolicyViolationError,
)
from protocols.roles import Party
from protocols.tags import tag_value
from protocols.transport.base import Channel, MessageFilter

REFUSED = "refused"
DATA_REFUSED = "data"  # flag of a refusal because the refusing party's own data failed a check
"""The control-block key of a refusal; its value is the peer-safe reason."""
MAX_REASON_CHARS = 300
"""A refusal's reason is cut to this length (it is logged by the peer)."""


def _body(body: Body | dict[str, Any] | None) -> Body | None:
    return ControlBlock.from_obj(body) if isinstance(body, dict) else body


@dataclass(frozen=True)
class JobLink:
    """Send, receive, answer and refuse messages of one job and run.

    Parameters
    ----------
    channel
        This party's channel.
    job_id
        The job every envelope belongs to.
    run_id
        The run (restart) of the job; empty for messages outside runs.
    timeout
        Seconds a receive waits by default.
    key_id
        The key id every message carries unless it names its own (a protocol whose every
        message is bound to the job's Paillier key, §2.9); empty by default.
    """

    channel: Channel
    job_id: str
    run_id: str = ""
    timeout: float = 60.0
    key_id: bytes = b""

    @property
    def me(self) -> Party:
        """This party."""
        return self.channel.me

    def for_run(self, run_id: str) -> JobLink:
        """The same link for another run of the job."""
        return replace(self, run_id=run_id)

    @classmethod
    def answering(cls, channel: Channel, request: Envelope, *, timeout: float = 60.0) -> JobLink:
        """A link on the route of ``request``: its job and run."""
        return cls(channel=channel, job_id=request.job_id, run_id=request.run_id, timeout=timeout)

    def envelope(
        self,
        to: Party,
        tag: StrEnum | str,
        step: int = 0,
        body: Body | dict[str, Any] | None = None,
        *,
        key_id: bytes | None = None,
    ) -> Envelope:
        """The envelope :meth:`send` would send (for callers that hand envelopes to a
        sender thread)."""
        return Envelope(
            job_id=self.job_id,
            run_id=self.run_id,
            sender=self.channel.me,
            receiver=to,
            tag=tag,
            step=step,
            key_id=key_id or self.key_id,
            body=_body(body),
        )

    def send(
        self,
        to: Party,
        tag: StrEnum | str,
        step: int = 0,
        body: Body | dict[str, Any] | None = None,
        *,
        key_id: bytes | None = None,
    ) -> Envelope:
        """Send one message of this job and run; a ``dict`` body travels as a control block.

        Returns the envelope as sent (with its sequence number).
        """
        return self.channel.send(self.envelope(to, tag, step, body, key_id=key_id))

    def recv(
        self, sender: Party, tag: StrEnum | str, step: int = 0, *, timeout: float | None = None
    ) -> Envelope:
        """The message ``tag`` of ``step`` from ``sender`` in this job and run."""
        return self.channel.recv(
            job_id=self.job_id,
            sender=sender,
            tag=tag,
            step=step,
            run_id=self.run_id,
            timeout=self.timeout if timeout is None else timeout,
        )

    def recv_any(
        self, sender: Party, tags: Iterable[StrEnum | str], *, timeout: float | None = None
    ) -> Envelope:
        """The next message from ``sender`` in this job and run carrying any of ``tags``,
        whatever its step (for loops that follow a peer's lead)."""
        return self.channel.recv_any(
            MessageFilter(
                job_id=self.job_id,
                run_id=self.run_id,
                sender=sender.party_id,
                tags=frozenset(tag_value(t) for t in tags),
            ),
            timeout=self.timeout if timeout is None else timeout,
        )

    def control(
        self, sender: Party, tag: StrEnum | str, step: int = 0, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """The JSON of a message that must carry a control block."""
        return control_of(self.recv(sender, tag, step, timeout=timeout))

    def cipher(
        self, sender: Party, tag: StrEnum | str, step: int = 0, *, timeout: float | None = None
    ) -> CipherBlock:
        """The ciphertext block of a message that must carry one."""
        envelope = self.recv(sender, tag, step, timeout=timeout)
        if not isinstance(envelope.body, CipherBlock):
            raise MalformedEnvelopeError(f"{envelope.describe()} must carry ciphertexts")
        return envelope.body

    def ask(
        self,
        to: Party,
        tag: StrEnum | str,
        answer: StrEnum | str,
        step: int = 0,
        body: Body | dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send ``tag`` and return the JSON of ``to``'s ``answer`` of the same step."""
        self.send(to, tag, step, {} if body is None else body)
        return self.control(to, answer, step, timeout=timeout)

    def reply(
        self,
        request: Envelope,
        tag: StrEnum | str,
        body: Body | dict[str, Any] | None = None,
        *,
        step: int | None = None,
        key_id: bytes | None = None,
    ) -> Envelope:
        """Answer ``request`` on its route: to its sender, same job, run and (by default)
        step."""
        link = self if request.run_id == self.run_id else self.for_run(request.run_id)
        return link.send(
            request.sender,
            tag,
            request.step if step is None else step,
            body,
            key_id=key_id,
        )

    def refuse(
        self,
        request: Envelope,
        tag: StrEnum | str,
        reason: str,
        *,
        step: int | None = None,
        **fields: Any,
    ) -> Envelope:
        """Answer ``request`` with ``{"refused": reason, **fields}`` (a peer-safe reason,
        docs/protocol.md §1.7)."""
        return self.reply(request, tag, {REFUSED: reason[:MAX_REASON_CHARS], **fields}, step=step)


def refusal(obj: dict[str, Any]) -> str | None:
    """The reason of a refusal answer, or ``None`` if ``obj`` is no refusal."""
    value = obj.get(REFUSED)
    return None if value is None else str(value)[:MAX_REASON_CHARS]


def raise_if_refused(
    obj: dict[str, Any], *, sender: Party, what: str, refuses_job: bool = False
) -> dict[str, Any]:
    """``obj`` if it is no refusal; else the refusal as its typed error.

    A refusal flagged ``no_space`` (never read from the text, so no peer-chosen reason passes
    for it, docs/protocol.md §4.4.1) raises :class:`NoSpaceError`; one flagged ``data`` (the
    sender's own data failed a check) says so, without pointing at any policy; with
    ``refuses_job`` (an
    answer under the sender's acceptance policy: ``JOB_ACCEPT``, ``JOB_READY``) a refusal
    raises :class:`JobRefusedError`, which is not retried; any other raises
    :class:`PolicyViolationError`. ``what`` names what was refused ("job x").
    """
    reason = refusal(obj)
    if reason is None:
        return obj
    if obj.get("no_space") is True:
        raise NoSpaceError(f"{sender} cannot go on: {reason}")
    if refuses_job and obj.get(DATA_REFUSED) is True:  # nothing the job or a policy changes
        raise JobRefusedError(
            f"{sender.party_id} refused {what}: its own data failed a check ({reason}); its "
            f"operator has the report (`vfl data check` at {sender.party_id}) and must fix the "
            "data before the job is submitted again"
        )
    if refuses_job:
        raise JobRefusedError(
            f"{sender.party_id} refused {what}: {reason} (change the job, or ask "
            f"{sender.party_id}'s operator to allow it in its [accept] config)"
        )
    raise PolicyViolationError(f"{sender} refused {what}: {reason}")
