"""The party config: :class:`PartyConfig`, read from TOML by :func:`load_config`.

Assembles the sections in the order they are checked: ``[party]`` (id, role, listen address,
state folder, probe endpoint), ``[tls]``, ``[[peers]]`` and ``[transport]``
(:mod:`vfl.config.network`), ``[data]``, ``[features]``, ``[executor]``, ``[arbiter]``,
``[accept]`` and ``[psi]`` (:mod:`vfl.config.policy`), ``[scoring]``
(:mod:`vfl.config.scoring`), ``[random]`` and ``[testing]``. The file's format is in the
docstring of :mod:`vfl.config`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from protocols.executor import Backend, ExecutorSettings
from protocols.roles import Party, Role, check_party_id
from protocols.transport.options import TransportOptions
from vfl.config.network import PeerConfig, TlsPaths, parse_peers, parse_tls, parse_transport
from vfl.config.policy import AcceptPolicy, PsiPolicy, parse_accept, parse_psi
from vfl.config.scoring import ScoringPolicyConfig, parse_scoring
from vfl.config.values import (
    host_port,
    only_keys,
    positive_int,
    required_str,
    resolve_path,
    section,
)
from vfl.data.features import FeatureSpec

_SECTIONS = {
    "party",
    "tls",
    "peers",
    "data",
    "features",
    "transport",
    "executor",
    "arbiter",
    "accept",
    "psi",
    "scoring",
    "random",
    "testing",
}
_PARTY_KEYS = {"id", "role", "listen", "state_dir", "health"}
_EXECUTOR_KEYS = {"backend", "workers", "ray_address", "allow_plaintext_cluster"}
_ARBITER_KEYS = {"key_bits", "allow_test_key", "max_resumes"}
_TESTING_KEYS = {"allow_hold"}
_RANDOM_KEYS = {"seed"}


@dataclass(frozen=True)
class PartyConfig:
    """One party's service configuration."""

    source: Path
    party: Party
    listen: str
    state_dir: Path
    tls: TlsPaths
    health: str | None = None  # [party] health: the probe endpoint's host:port, or off
    peers: tuple[PeerConfig, ...] = ()
    data: Mapping[str, Path] = field(default_factory=dict)
    features: Mapping[str, FeatureSpec] = field(default_factory=dict)  # [features.<alias>]
    transport: TransportOptions = field(default_factory=TransportOptions)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    key_bits: int = 2048
    allow_test_key: bool = False
    max_resumes: int = 100  # [arbiter] max_resumes
    accept: AcceptPolicy = field(default_factory=AcceptPolicy)
    psi: PsiPolicy = field(default_factory=PsiPolicy)
    scoring: ScoringPolicyConfig = field(default_factory=ScoringPolicyConfig)
    seed: int | None = None  # [random] seed: this party's draws, keyed (vfl.common.seeds)
    allow_hold: bool = False  # [testing] allow_hold: jobs may pause at a step (tests only)

    def peer_with_role(self, role: Role) -> Party:
        """The one configured peer with ``role`` (a job needs exactly one host and arbiter)."""
        found = [p.party for p in self.peers if p.party.role is role]
        if len(found) != 1:
            raise ConfigError(
                f"{self.source}: needs exactly one [[peers]] entry with role {role.value}"
            )
        return found[0]

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
    only_keys(raw, _SECTIONS, f"{where}: top level")
    party_t = section(raw, "party", where)
    only_keys(party_t, _PARTY_KEYS, f"{where}: [party]")
    party = Party(
        check_party_id(
            required_str(party_t, "id", f"{where}: party.id"), where=f"{where}: party.id"
        ),
        Role.parse(
            required_str(party_t, "role", f"{where}: party.role"), where=f"{where}: party.role"
        ),
    )
    listen = host_port(
        required_str(party_t, "listen", f"{where}: party.listen"), f"{where}: party.listen"
    )
    state_dir = resolve_path(base, required_str(party_t, "state_dir", f"{where}: party.state_dir"))
    health = _health(party_t.get("health"), f"{where}: party.health")

    tls = parse_tls(raw, where=where, base=base)
    peers = parse_peers(raw, where=where, base=base, party=party)

    data_t = raw.get("data", {})
    if not isinstance(data_t, dict):
        raise ConfigError(f'{where}: [data] must be a table of alias = "path"')
    data = {}
    for alias, value in data_t.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}: data.{alias} must be a path string")
        data[alias] = resolve_path(base, value)

    transport = parse_transport(raw, where=where)
    executor = _executor(raw, where)
    arbiter_t = raw.get("arbiter", {})
    if not isinstance(arbiter_t, dict):
        raise ConfigError(f"{where}: [arbiter] must be a table")
    only_keys(arbiter_t, _ARBITER_KEYS, f"{where}: [arbiter]")
    key_bits = arbiter_t.get("key_bits", 2048)
    allow_test_key = arbiter_t.get("allow_test_key", False)
    if not isinstance(key_bits, int) or isinstance(key_bits, bool):
        raise ConfigError(f"{where}: arbiter.key_bits must be an integer (2048 or 3072)")
    if not isinstance(allow_test_key, bool):
        raise ConfigError(f"{where}: arbiter.allow_test_key must be true or false")
    max_resumes = positive_int(arbiter_t, "max_resumes", f"{where}: arbiter.max_resumes") or 100

    guest_peers = tuple(p.party.party_id for p in peers if p.party.role is Role.GUEST)
    accept = parse_accept(
        raw,
        where=where,
        guest_peers=guest_peers,
        peers=peers,
        data=data,
        allow_test_key=allow_test_key,
    )
    psi = parse_psi(raw, where=where, data=data)
    features = _features(raw, where, data)
    scoring = parse_scoring(raw, where=where, guest_peers=guest_peers, peers=peers)
    testing_t = raw.get("testing", {})
    if not isinstance(testing_t, dict):
        raise ConfigError(f"{where}: [testing] must be a table")
    only_keys(testing_t, _TESTING_KEYS, f"{where}: [testing]")
    random_t = raw.get("random", {})
    if not isinstance(random_t, dict):
        raise ConfigError(f"{where}: [random] must be a table")
    only_keys(random_t, _RANDOM_KEYS, f"{where}: [random]")
    seed = random_t.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"{where}: random.seed must be a non-negative integer, got {seed!r}")
    allow_hold = testing_t.get("allow_hold", False)
    if not isinstance(allow_hold, bool):
        raise ConfigError(f"{where}: testing.allow_hold must be true or false")

    return PartyConfig(
        source=source,
        party=party,
        listen=listen,
        health=health,
        state_dir=state_dir,
        tls=tls,
        peers=tuple(peers),
        data=data,
        features=features,
        transport=transport,
        executor=executor,
        key_bits=key_bits,
        allow_test_key=allow_test_key,
        max_resumes=max_resumes,
        accept=accept,
        psi=psi,
        scoring=scoring,
        seed=seed,
        allow_hold=allow_hold,
    )


def _features(
    raw: Mapping[str, Any], where: str, data: Mapping[str, Path]
) -> dict[str, FeatureSpec]:
    """``[features.<alias>]``: this party's own choice of feature columns for a data alias
    (:class:`~vfl.data.features.FeatureSpec`; docs/bring-your-own-data.md)."""
    table = raw.get("features", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [features] must hold one table per data alias")
    out: dict[str, FeatureSpec] = {}
    for alias, spec in table.items():
        if alias not in data:
            known = ", ".join(sorted(data)) or "none"
            raise ConfigError(
                f"{where}: [features.{alias}]: {alias!r} is not an alias in [data] (aliases: "
                f"{known})"
            )
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: [features.{alias}] must be a table")
        out[alias] = FeatureSpec.parse(spec, where=f"{where}: [features.{alias}]")
    return out


def _executor(raw: Mapping[str, Any], where: str) -> ExecutorSettings:
    table = raw.get("executor", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [executor] must be a table")
    only_keys(table, _EXECUTOR_KEYS, f"{where}: [executor]")
    name = table.get("backend", "local")
    try:
        backend = Backend(name)
    except ValueError:
        raise ConfigError(
            f"{where}: executor.backend {name!r} is not one of "
            f"{', '.join(b.value for b in Backend)}"
        ) from None
    workers = table.get("workers")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool)):
        raise ConfigError(f"{where}: executor.workers must be a whole number, got {workers!r}")
    address = table.get("ray_address", "auto")
    if not isinstance(address, str) or not address:
        raise ConfigError(f'{where}: executor.ray_address must be "host:port" or "auto"')
    if "ray_address" in table and backend is not Backend.RAY:
        raise ConfigError(f'{where}: executor.ray_address needs backend = "ray"')
    plaintext = table.get("allow_plaintext_cluster", False)
    if not isinstance(plaintext, bool):
        raise ConfigError(f"{where}: executor.allow_plaintext_cluster must be true or false")
    try:
        return ExecutorSettings(
            backend=backend,
            workers=workers,
            ray_address=address,
            allow_plaintext_cluster=plaintext,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _health(value: object, where: str) -> str | None:
    """``[party] health``: a port (loopback) or ``host:port``; absent means off."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 65535:
            raise ConfigError(f"{where}: port {value} is out of range")
        return f"127.0.0.1:{value}"
    if isinstance(value, str):
        return host_port(value, where)
    raise ConfigError(f"{where}: give a port (8081) or 'host:port', not {value!r}")
