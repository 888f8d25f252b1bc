"""Who this party talks to and how: ``[tls]``, ``[[peers]]`` and ``[transport]``.

The parsed sections as frozen dataclasses (:class:`TlsPaths`, :class:`PeerConfig`, the
transport's own :class:`~protocols.transport.options.TransportOptions`), and
:func:`peer_ids`, which checks the party ids a policy section names against ``[[peers]]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from protocols.roles import Party, PartyAddress, Role, check_party_id
from protocols.transport.options import TransportOptions
from protocols.transport.tls import TlsIdentity, load_identity
from vfl.config.values import host_port, only_keys, required_str, resolve_path, section, str_list

_TLS_KEYS = {"ca", "certificate", "key"}
_PEER_KEYS = {"id", "role", "address", "certificate"}
_TRANSPORT_KEYS = set(TransportOptions.__dataclass_fields__)


@dataclass(frozen=True)
class TlsPaths:
    """Where this party's CA, certificate and key are."""

    ca: Path
    certificate: Path
    key: Path

    def load(self) -> TlsIdentity:
        """Load and check the identity these paths name."""
        return load_identity(certificate=self.certificate, key=self.key, ca=self.ca)


@dataclass(frozen=True)
class PeerConfig:
    """A peer: identity, address and optionally its pinned certificate file."""

    party: Party
    address: str
    certificate: Path | None = None

    def address_entry(self) -> PartyAddress:
        """The peer as the transport wants it (reads the pinned certificate)."""
        pem = None
        if self.certificate is not None:
            try:
                pem = self.certificate.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"peers[{self.party.party_id}].certificate: cannot read {self.certificate}: "
                    f"{exc.strerror}"
                ) from exc
        return PartyAddress(party=self.party, address=self.address, certificate_pem=pem)


def parse_tls(raw: Mapping[str, Any], *, where: str, base: Path) -> TlsPaths:
    """``[tls]``: the paths of this party's CA, certificate and key (required)."""
    tls_t = section(raw, "tls", where)
    only_keys(tls_t, _TLS_KEYS, f"{where}: [tls]")
    return TlsPaths(
        ca=resolve_path(base, required_str(tls_t, "ca", f"{where}: tls.ca")),
        certificate=resolve_path(
            base, required_str(tls_t, "certificate", f"{where}: tls.certificate")
        ),
        key=resolve_path(base, required_str(tls_t, "key", f"{where}: tls.key")),
    )


def parse_peers(
    raw: Mapping[str, Any], *, where: str, base: Path, party: Party
) -> list[PeerConfig]:
    """``[[peers]]``: every peer once, none of them ``party`` itself."""
    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError(f"{where}: peers must be an array of tables ([[peers]])")
    peers: list[PeerConfig] = []
    for i, peer_t in enumerate(peers_raw):
        pw = f"{where}: peers[{i}]"
        if not isinstance(peer_t, dict):
            raise ConfigError(f"{pw} must be a table")
        only_keys(peer_t, _PEER_KEYS, pw)
        peer_party = Party(
            check_party_id(required_str(peer_t, "id", f"{pw}.id"), where=f"{pw}.id"),
            Role.parse(required_str(peer_t, "role", f"{pw}.role"), where=f"{pw}.role"),
        )
        if peer_party.party_id == party.party_id:
            raise ConfigError(f"{pw}.id: {party.party_id!r} is this party itself")
        if any(p.party.party_id == peer_party.party_id for p in peers):
            raise ConfigError(f"{pw}.id: peer {peer_party.party_id!r} is listed twice")
        cert = peer_t.get("certificate")
        if cert is not None and not isinstance(cert, str):
            raise ConfigError(f"{pw}.certificate must be a path string")
        peers.append(
            PeerConfig(
                party=peer_party,
                address=host_port(
                    required_str(peer_t, "address", f"{pw}.address"), f"{pw}.address"
                ),
                certificate=None if cert is None else resolve_path(base, cert),
            )
        )
    return peers


def parse_transport(raw: Mapping[str, Any], *, where: str) -> TransportOptions:
    """``[transport]`` (optional): numbers overriding the transport's defaults."""
    transport_t = raw.get("transport", {})
    if not isinstance(transport_t, dict):
        raise ConfigError(f"{where}: [transport] must be a table")
    only_keys(transport_t, _TRANSPORT_KEYS, f"{where}: [transport]")
    for key, value in transport_t.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: transport.{key} must be a number, got {value!r}")
    try:
        return TransportOptions(**transport_t)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def peer_ids(
    table: Mapping[str, Any],
    key: str,
    where: str,
    peers: list[PeerConfig],
    role: Role | None,
) -> tuple[str, ...] | None:
    """The party ids listed at ``table[key]`` (None when absent), each a ``[[peers]]`` entry
    (with ``role``, unless None)."""
    ids = str_list(table, key, where)
    wanted = [p.party.party_id for p in peers if role is None or p.party.role is role]
    for party_id in ids or ():
        if party_id not in wanted:
            kind = f"[[peers]] entry with role {role.value}" if role else "[[peers]] entry"
            raise ConfigError(
                f"{where}: {party_id!r} is not a {kind} (known: {', '.join(wanted) or 'none'})"
            )
    return ids
