"""gRPC channel: one server per party, senders push envelopes to receivers.

Each party runs a :class:`~protocols.transport.grpc_server.TransportServer` that
fills its mailbox, and holds one :class:`~protocols.transport.grpc_client.PeerClient`
per peer. Mutual TLS is always on; insecure transport needs ``insecure=True``
and logs a warning at start-up. When a peer's address changes (:meth:`GrpcChannel.add_peer`
again, e.g. its service restarted on another port), sends still retrying against the old
address go on to the new one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

from protocols.envelope import Envelope, encode
from protocols.errors import (
    ConfigError,
    InsecureConfigError,
    PeerUnavailableError,
    TransportError,
    WrongReceiverError,
)
from protocols.roles import Party, PartyAddress
from protocols.tags import TagRegistry
from protocols.transport.base import Channel, DeliveryStatus, Mailbox
from protocols.transport.grpc_client import PeerClient
from protocols.transport.grpc_server import AdminHandler, TransportServer
from protocols.transport.options import TransportOptions
from protocols.transport.replay import ReplayGuard
from protocols.transport.tls import TlsIdentity, fingerprint

logger = logging.getLogger(__name__)


class GrpcChannel(Channel):
    """A party's channel over gRPC with mutual TLS.

    Parameters
    ----------
    me
        This party.
    identity
        Its certificate, key and CA; ``None`` only together with ``insecure=True``.
    tags
        The tags this party accepts.
    listen
        ``host:port`` to listen on (port 0 picks a free one; see :attr:`port`).
    peers
        Who may send to us and whom we send to, with their pinned certificates.
    journal_dir
        Where replay marks are journaled (``None``: memory only).
    admin
        Handler for the party's own operator's admin calls.
    insecure
        Plaintext gRPC without authentication; for experiments only.
    """

    def __init__(
        self,
        *,
        me: Party,
        identity: TlsIdentity | None,
        tags: TagRegistry,
        listen: str = "127.0.0.1:0",
        peers: tuple[PartyAddress, ...] = (),
        journal_dir: Path | None = None,
        options: TransportOptions | None = None,
        admin: AdminHandler | None = None,
        insecure: bool = False,
    ) -> None:
        options = options or TransportOptions()
        if identity is None and not insecure:
            raise InsecureConfigError(
                "no TLS identity given; mutual TLS is required between parties "
                "(pass insecure=True / --insecure only for local experiments)"
            )
        if identity is not None and identity.party != me:
            raise ConfigError(f"the certificate names {identity.party}, not {me}")
        if insecure:
            identity = None
            logger.warning(
                "INSECURE TRANSPORT for %s: no TLS, no authentication, anyone on the network "
                "can read and forge messages; never use this between real silos",
                me,
            )
        mailbox = Mailbox(
            me=me,
            tags=tags,
            replay=ReplayGuard(journal_dir=journal_dir),
            max_queued_bytes=options.max_queued_bytes,
            handler_threads=options.handler_threads,
            stale_mail_seconds=options.stale_mail_seconds,
        )
        super().__init__(me=me, mailbox=mailbox)
        self._identity = identity
        self._options = options
        self._lock = threading.Lock()
        self._clients: dict[str, PeerClient] = {}
        self._server = TransportServer(
            mailbox=mailbox,
            identity=identity,
            peers={},
            pinned={},
            listen=listen,
            options=options,
            admin=admin,
            threads=options.threads_for(max(len(peers), 2)),
        )
        for peer in peers:
            self.add_peer(peer)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self._server.port

    @property
    def serving(self) -> bool:
        """Whether the server has started and is not stopping."""
        return self._server.serving

    def add_peer(self, peer: PartyAddress) -> None:
        """Allow ``peer`` to send to us and open a client to it."""
        if peer.certificate_pem is not None:
            fingerprint(peer.certificate_pem)  # fails early on an unreadable pin
        self._server.add_peer(peer.party, pinned_pem=peer.certificate_pem)
        client = PeerClient(
            peer=peer.party, address=peer.address, identity=self._identity, options=self._options
        )
        with self._lock:
            old = self._clients.pop(peer.party.party_id, None)
            self._clients[peer.party.party_id] = client
        if old is not None:
            old.close()

    def peers(self) -> Mapping[str, Party]:
        """The configured peers by id."""
        with self._lock:
            return {pid: c.peer for pid, c in self._clients.items()}

    def start(self) -> int:
        """Start the server; return its port."""
        self._server.start()
        logger.info("%s listening on port %d", self.me, self.port)
        return self.port

    def _transmit(self, envelope: Envelope) -> DeliveryStatus:
        header, payload = encode(envelope)
        client = self._client(envelope.receiver)
        while True:
            try:
                return client.deliver(header, payload)
            except TransportError:
                # a peer whose address changed mid-send (its service restarted elsewhere):
                # the send goes on to the new address instead of being lost
                with self._lock:
                    current = self._clients.get(envelope.receiver.party_id)
                if not client.closed or current is None or current is client:
                    raise
                logger.info(
                    "%s moved to %s during a send; sending there", client.peer, current.address
                )
                client = self._client(envelope.receiver)

    def _client(self, receiver: Party) -> PeerClient:
        with self._lock:
            client = self._clients.get(receiver.party_id)
        if client is None:
            raise PeerUnavailableError(
                f"{receiver.party_id!r} is not a configured peer of {self.me}; "
                "add it under [[peers]] in the party config"
            )
        if client.peer != receiver:
            raise WrongReceiverError(
                f"envelope for {receiver}, but {receiver.party_id} is configured as {client.peer}"
            )
        return client

    def close(self, grace: float = 5.0) -> None:
        """Stop accepting, finish in-flight calls for up to ``grace`` s, close clients."""
        self._server.stop(grace)
        super().close()
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()
