"""Party configuration: TOML -> frozen dataclasses, validated once, passed explicitly.

Example (relative paths are resolved against the config file's folder)::

    [party]
    id = "bank"                  # = the SAN of this party's certificate
    role = "guest"
    listen = "127.0.0.1:50051"   # port 0 picks a free port, written to <state_dir>/service.port
    state_dir = "state/bank"

    [tls]
    ca = "certs/ca.pem"
    certificate = "certs/bank.pem"
    key = "certs/bank.key"

    [[peers]]
    id = "retailer"
    role = "host"
    address = "127.0.0.1:50052"
    certificate = "certs/retailer.pem"   # pinned: only this certificate is accepted

    [data]                       # aliases jobs use to name this party's files
    credit = "/data/credit_guest.csv"

    [transport]                  # optional; see protocols.transport.TransportOptions
    retry_seconds = 30

    [arbiter]                    # arbiter only, optional
    key_bits = 2048              # Paillier key made at first start, kept in state_dir
    allow_test_key = false       # true admits < 2048-bit keys: tests only, never for data
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from protocols.roles import Party, PartyAddress, Role, check_party_id
from protocols.transport.options import TransportOptions
from protocols.transport.tls import TlsIdentity, load_identity

_SECTIONS = {"party", "tls", "peers", "data", "transport", "arbiter"}
_ARBITER_KEYS = {"key_bits", "allow_test_key"}
_PARTY_KEYS = {"id", "role", "listen", "state_dir"}
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


@dataclass(frozen=True)
class PartyConfig:
    """One party's service configuration."""

    source: Path
    party: Party
    listen: str
    state_dir: Path
    tls: TlsPaths
    peers: tuple[PeerConfig, ...] = ()
    data: Mapping[str, Path] = field(default_factory=dict)
    transport: TransportOptions = field(default_factory=TransportOptions)
    key_bits: int = 2048
    allow_test_key: bool = False

    def peer(self, party_id: str) -> PeerConfig:
        """The configured peer ``party_id``."""
        for peer in self.peers:
            if peer.party.party_id == party_id:
                return peer
        known = ", ".join(p.party.party_id for p in self.peers) or "none"
        raise ConfigError(f"{party_id!r} is not a peer in {self.source} (peers: {known})")


def load_config(path: Path) -> PartyConfig:
    """Read and validate a party config; errors name the file, the key and the problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(raw, source=path)


def parse_config(raw: Mapping[str, Any], *, source: Path) -> PartyConfig:
    """Validate an already-parsed TOML mapping (see :func:`load_config`)."""
    base = source.parent
    where = str(source)
    _only(raw, _SECTIONS, f"{where}: top level")
    party_t = _table(raw, "party", where)
    _only(party_t, _PARTY_KEYS, f"{where}: [party]")
    party = Party(
        check_party_id(_str(party_t, "id", f"{where}: party.id"), where=f"{where}: party.id"),
        Role.parse(_str(party_t, "role", f"{where}: party.role"), where=f"{where}: party.role"),
    )
    listen = _address(_str(party_t, "listen", f"{where}: party.listen"), f"{where}: party.listen")
    state_dir = _path(base, _str(party_t, "state_dir", f"{where}: party.state_dir"))

    tls_t = _table(raw, "tls", where)
    _only(tls_t, _TLS_KEYS, f"{where}: [tls]")
    tls = TlsPaths(
        ca=_path(base, _str(tls_t, "ca", f"{where}: tls.ca")),
        certificate=_path(base, _str(tls_t, "certificate", f"{where}: tls.certificate")),
        key=_path(base, _str(tls_t, "key", f"{where}: tls.key")),
    )

    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError(f"{where}: peers must be an array of tables ([[peers]])")
    peers: list[PeerConfig] = []
    for i, peer_t in enumerate(peers_raw):
        pw = f"{where}: peers[{i}]"
        if not isinstance(peer_t, dict):
            raise ConfigError(f"{pw} must be a table")
        _only(peer_t, _PEER_KEYS, pw)
        peer_party = Party(
            check_party_id(_str(peer_t, "id", f"{pw}.id"), where=f"{pw}.id"),
            Role.parse(_str(peer_t, "role", f"{pw}.role"), where=f"{pw}.role"),
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
                address=_address(_str(peer_t, "address", f"{pw}.address"), f"{pw}.address"),
                certificate=None if cert is None else _path(base, cert),
            )
        )

    data_t = raw.get("data", {})
    if not isinstance(data_t, dict):
        raise ConfigError(f'{where}: [data] must be a table of alias = "path"')
    data = {}
    for alias, value in data_t.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}: data.{alias} must be a path string")
        data[alias] = _path(base, value)

    transport_t = raw.get("transport", {})
    if not isinstance(transport_t, dict):
        raise ConfigError(f"{where}: [transport] must be a table")
    _only(transport_t, _TRANSPORT_KEYS, f"{where}: [transport]")
    for key, value in transport_t.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: transport.{key} must be a number, got {value!r}")
    try:
        transport = TransportOptions(**transport_t)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None

    arbiter_t = raw.get("arbiter", {})
    if not isinstance(arbiter_t, dict):
        raise ConfigError(f"{where}: [arbiter] must be a table")
    _only(arbiter_t, _ARBITER_KEYS, f"{where}: [arbiter]")
    key_bits = arbiter_t.get("key_bits", 2048)
    allow_test_key = arbiter_t.get("allow_test_key", False)
    if not isinstance(key_bits, int) or isinstance(key_bits, bool):
        raise ConfigError(f"{where}: arbiter.key_bits must be an integer (2048 or 3072)")
    if not isinstance(allow_test_key, bool):
        raise ConfigError(f"{where}: arbiter.allow_test_key must be true or false")

    return PartyConfig(
        source=source,
        party=party,
        listen=listen,
        state_dir=state_dir,
        tls=tls,
        peers=tuple(peers),
        data=data,
        transport=transport,
        key_bits=key_bits,
        allow_test_key=allow_test_key,
    )


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r}; expected one of {', '.join(sorted(allowed))}"
            )


def _table(raw: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: missing section [{name}]")
    return value


def _str(table: Mapping[str, Any], key: str, where: str) -> str:
    if key not in table:
        raise ConfigError(f"{where}: missing (required)")
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a non-empty string, got {value!r}")
    return value.strip()


def _address(value: str, where: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {value!r} is not host:port (e.g. '127.0.0.1:50051')")
    return value


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()
