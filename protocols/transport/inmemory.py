"""In-memory channel: parties as threads of one process (tests, simulations).

Envelopes go through the same codec, digest and receive steps as over gRPC
(:mod:`protocols.transport.base`), so one contract suite covers both; only the
bytes do not leave the process.
"""

from __future__ import annotations

import threading
from pathlib import Path

from protocols.envelope import Envelope, digest, encode
from protocols.errors import PeerUnavailableError
from protocols.roles import Party
from protocols.tags import TagRegistry
from protocols.transport.base import Channel, DeliveryStatus, Mailbox
from protocols.transport.replay import ReplayGuard

DEFAULT_MAX_QUEUED_BYTES = 4 << 30


class InMemoryNetwork:
    """A set of in-memory channels that can reach each other by party id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mailboxes: dict[str, Mailbox] = {}

    def channel(
        self,
        party: Party,
        *,
        tags: TagRegistry,
        journal_dir: Path | None = None,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        channel_class: type[InMemoryChannel] | None = None,
    ) -> InMemoryChannel:
        """Create the channel of ``party`` on this network (replacing an earlier one).

        ``channel_class`` lets a test interpose on sends (e.g. to simulate a crash).
        """
        mailbox = Mailbox(
            me=party,
            tags=tags,
            replay=ReplayGuard(journal_dir=journal_dir),
            max_queued_bytes=max_queued_bytes,
        )
        with self._lock:
            self._mailboxes[party.party_id] = mailbox
        return (channel_class or InMemoryChannel)(me=party, mailbox=mailbox, network=self)

    def mailbox(self, party_id: str) -> Mailbox:
        """The mailbox of ``party_id``; :class:`PeerUnavailableError` if none."""
        with self._lock:
            try:
                return self._mailboxes[party_id]
            except KeyError:
                raise PeerUnavailableError(f"no party {party_id!r} on this network") from None


class InMemoryChannel(Channel):
    """A channel whose peers live in the same process."""

    def __init__(self, *, me: Party, mailbox: Mailbox, network: InMemoryNetwork) -> None:
        super().__init__(me=me, mailbox=mailbox)
        self._network = network

    def _transmit(self, envelope: Envelope) -> DeliveryStatus:
        header, payload = encode(envelope)
        target = self._network.mailbox(envelope.receiver.party_id)
        return target.deliver(header, payload, digest(header, payload), authenticated=self.me)
