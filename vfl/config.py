"""Party configuration: TOML -> frozen dataclasses, validated once, passed explicitly.

Example (relative paths are resolved against the config file's folder)::

    [party]
    id = "bank"                  # = the SAN of this party's certificate
    role = "guest"
    listen = "127.0.0.1:50051"   # port 0 picks a free port, written to <state_dir>/service.port
    state_dir = "state/bank"
    health = 8081                # optional plain-HTTP /healthz and /readyz for probes: a port
                                 # (loopback only) or "host:port"; off when absent

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

    [executor]                   # optional: where heavy parallel work runs, inside this silo
    backend = "local"            # "local" process pool (default) or "ray": the silo's cluster
    workers = 8                  # processes / Ray actors; default: this machine's / the
                                 # cluster's CPU count
    ray_address = "10.1.0.5:6379"  # ray: the cluster head (ray start --head --port 6379);
                                 # default "auto": the cluster this machine joined
    allow_plaintext_cluster = false  # ray: accept a cluster without Ray TLS (warns)

    [arbiter]                    # arbiter only, optional
    key_bits = 2048              # Paillier key made at first start, kept in state_dir
    allow_test_key = false       # true admits < 2048-bit keys: tests only, never for data
    max_resumes = 100            # RESUMEs one job may have (each re-opens at most 2 steps)

    [accept]                     # optional: what this party takes part in (host, arbiter)
    guests = ["bank"]            # who may submit jobs; default: every [[peers]] guest
    job_types = ["split_nn", "psi", "scoring", "horizontal", "transfer"]   # default: all
    data = ["credit"]            # aliases a guest may name; default: every [data] alias
    max_d = 64                   # host embedding width d (default 64)
    max_k = 64                   # interactive width k (default 64)
    max_host_params = 1000000    # parameters of the model a guest asks this party to train
                                 # (the host bottom model; a horizontal job's whole model)
    min_key_bits = 2048          # arbiter key size; default 2048, or no minimum when
                                 # [arbiter] allow_test_key = true (so test keys pass)
    protect_modes = ["gaussian", "max_norm", "marvell"]  # default: every mode but "none"
    allow_plaintext = false      # plaintext experiments (nothing encrypted)

    [psi]                        # optional (host): what a guest's PSI may use of our data
    modes = ["both", "guest_only", "cardinality"]   # PSI modes served; default: all
    min_pad_to = 100000          # a request must pad both lists to at least this many
                                 # elements (default 0: no minimum)
    id_column = "id"             # the id column of every alias (default "id") ...
    duplicates = "error"         # ... and its duplicates policy (default "error")
    [psi.data.credit]            # per data alias, overriding the defaults above
    id_column = "email"
    id_type = "email"            # the canonicalisation a guest must ask for (default: any)
    duplicates = "latest"        # "error", "first" or "latest" (needs timestamp_column)
    timestamp_column = "updated"

    [scoring]                    # arbiter only, optional: who may score with which model
    requesters = ["bank"]        # default: every [[peers]] guest
    quota_rows = 100000          # rows each model may score per quota window
    quota_days = 30              # the quota window (usage starts again from 0 after it)
    valid_days = 365             # a grant ends this long after it is made ...
    [scoring.models."credit-2026-12"]
    quota_rows = 50000           # ... unless a model overrides it
    expires = "2027-06-30"       # the grant ends at 00:00 UTC of this day
    requesters = ["bank"]

    [testing]                    # optional, reproducible experiments only: never with data
    seed = 7                     # fixes this party's own random draws (its W_0 component,
                                 # its model's initialisation, the guest's batch order)
    allow_hold = true            # the guest's `train` may ask to pause after a step
                                 # ("hold_at_step") until admin `release` (tests of restarts)
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from protocols.errors import ConfigError
from protocols.executor import Backend, ExecutorSettings
from protocols.roles import Party, PartyAddress, Role, check_party_id
from protocols.transport.options import TransportOptions
from protocols.transport.tls import TlsIdentity, load_identity
from psi.canon import DuplicatePolicy, IdType
from psi.protocol import PsiMode
from vfl.privacy.label_protection import ProtectMode

_SECTIONS = {
    "party",
    "tls",
    "peers",
    "data",
    "transport",
    "executor",
    "arbiter",
    "accept",
    "psi",
    "scoring",
    "testing",
}
_ACCEPT_KEYS = {
    "guests",
    "job_types",
    "data",
    "max_d",
    "max_k",
    "max_host_params",
    "min_key_bits",
    "protect_modes",
    "allow_plaintext",
}
_PSI_KEYS = {"modes", "min_pad_to", "id_column", "duplicates", "data"}
_PSI_DATA_KEYS = {"id_column", "id_type", "duplicates", "timestamp_column"}
_SCORING_KEYS = {"requesters", "quota_rows", "quota_days", "valid_days", "models"}
_SCORING_MODEL_KEYS = {"quota_rows", "expires", "requesters"}
_TESTING_KEYS = {"seed", "allow_hold"}
_EXECUTOR_KEYS = {"backend", "workers", "ray_address", "allow_plaintext_cluster"}
_E = TypeVar("_E", bound=StrEnum)
_ARBITER_KEYS = {"key_bits", "allow_test_key", "max_resumes"}
_PARTY_KEYS = {"id", "role", "listen", "state_dir", "health"}
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


class JobType(StrEnum):
    """Kinds of job a party may be asked to take part in (``[accept] job_types``)."""

    SPLIT_NN = "split_nn"
    PSI = "psi"
    SCORING = "scoring"
    HORIZONTAL = "horizontal"
    TRANSFER = "transfer"


_SAFE_PROTECT_MODES = frozenset(m for m in ProtectMode if m is not ProtectMode.NONE)


@dataclass(frozen=True)
class AcceptPolicy:
    """What this party accepts from a guest (``[accept]``); the defaults are the safe choice.

    Parameters
    ----------
    guests
        Party ids that may submit jobs. :func:`parse_config` fills in every ``[[peers]]``
        entry with role guest when the key is absent; the empty default admits nobody.
    job_types
        Kinds of job this party takes part in (default: all).
    data
        The data aliases a guest may name (hosts). :func:`parse_config` fills in every
        ``[data]`` alias when the key is absent; the empty default admits none.
    max_d, max_k
        Largest host embedding width ``d`` and interactive width ``k``.
    max_host_params
        Most parameters of the host bottom model a guest may ask the host to train.
    min_key_bits
        Smallest arbiter key accepted. :func:`parse_config` defaults it to 2048, or to 0 (no
        minimum beyond the key's own floor) when ``[arbiter] allow_test_key = true``.
    protect_modes
        Label-protection modes of the guest the host accepts (default: all but ``none``).
    allow_plaintext
        Whether plaintext experiments (nothing encrypted) are accepted.
    """

    guests: frozenset[str] = frozenset()
    job_types: frozenset[JobType] = frozenset(JobType)
    data: frozenset[str] = frozenset()
    max_d: int = 64
    max_k: int = 64
    max_host_params: int = 1_000_000
    min_key_bits: int = 2048
    protect_modes: frozenset[ProtectMode] = _SAFE_PROTECT_MODES
    allow_plaintext: bool = False


@dataclass(frozen=True)
class PsiDataPolicy:
    """How this party (as host) lines up one data alias in a guest's PSI (``[psi]``).

    Parameters
    ----------
    id_column
        The column that holds the identifiers; a guest's request naming another is refused.
    id_type
        The canonicalisation a guest must ask for (``None``: the guest's choice).
    duplicates
        What to do with several rows of one canonical id (docs/protocol.md §3.2).
    timestamp_column
        The column ``duplicates = "latest"`` orders by (required for it, else ``None``).
    """

    id_column: str = "id"
    id_type: IdType | None = None
    duplicates: DuplicatePolicy = DuplicatePolicy.ERROR
    timestamp_column: str | None = None


@dataclass(frozen=True)
class PsiPolicy:
    """What a guest's PSI may use of this party's data (``[psi]``; docs/protocol.md §3.4.1).

    The guest names a data alias (one of ``[accept] data``), a mode and a padding; this
    party decides everything else. The defaults are the safe choice: id column ``"id"``,
    duplicates ``"error"``, every mode, no minimum padding.

    Parameters
    ----------
    modes
        The PSI modes served.
    min_pad_to
        Requests must pad both lists to at least this many elements (0: no minimum); a
        request without padding or with less is refused.
    default
        The policy of an alias without its own ``[psi.data.<alias>]`` table.
    data
        Per-alias policies.
    """

    modes: frozenset[PsiMode] = frozenset(PsiMode)
    min_pad_to: int = 0
    default: PsiDataPolicy = PsiDataPolicy()
    data: Mapping[str, PsiDataPolicy] = field(default_factory=dict)

    def for_alias(self, alias: str) -> PsiDataPolicy:
        """The policy of data alias ``alias``."""
        return self.data.get(alias, self.default)


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
    transport: TransportOptions = field(default_factory=TransportOptions)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    key_bits: int = 2048
    allow_test_key: bool = False
    max_resumes: int = 100  # [arbiter] max_resumes
    accept: AcceptPolicy = field(default_factory=AcceptPolicy)
    psi: PsiPolicy = field(default_factory=PsiPolicy)
    scoring: ScoringPolicyConfig = field(default_factory=ScoringPolicyConfig)
    seed: int | None = None  # [testing] seed: reproducible experiments only
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
    _only(raw, _SECTIONS, f"{where}: top level")
    party_t = _table(raw, "party", where)
    _only(party_t, _PARTY_KEYS, f"{where}: [party]")
    party = Party(
        check_party_id(_str(party_t, "id", f"{where}: party.id"), where=f"{where}: party.id"),
        Role.parse(_str(party_t, "role", f"{where}: party.role"), where=f"{where}: party.role"),
    )
    listen = _address(_str(party_t, "listen", f"{where}: party.listen"), f"{where}: party.listen")
    state_dir = _path(base, _str(party_t, "state_dir", f"{where}: party.state_dir"))
    health = _health(party_t.get("health"), f"{where}: party.health")

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

    executor = _executor(raw, where)
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
    max_resumes = _positive(arbiter_t, "max_resumes", f"{where}: arbiter.max_resumes") or 100

    guest_peers = tuple(p.party.party_id for p in peers if p.party.role is Role.GUEST)
    accept = _accept(raw, where, guest_peers, peers, data, allow_test_key)
    psi = _psi(raw, where, data)
    scoring = _scoring(raw, where, guest_peers, peers)
    testing_t = raw.get("testing", {})
    if not isinstance(testing_t, dict):
        raise ConfigError(f"{where}: [testing] must be a table")
    _only(testing_t, _TESTING_KEYS, f"{where}: [testing]")
    seed = testing_t.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"{where}: testing.seed must be a non-negative integer, got {seed!r}")
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


def _executor(raw: Mapping[str, Any], where: str) -> ExecutorSettings:
    table = raw.get("executor", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [executor] must be a table")
    _only(table, _EXECUTOR_KEYS, f"{where}: [executor]")
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


def _accept(
    raw: Mapping[str, Any],
    where: str,
    guest_peers: tuple[str, ...],
    peers: list[PeerConfig],
    data: Mapping[str, Path],
    allow_test_key: bool,
) -> AcceptPolicy:
    table = raw.get("accept", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [accept] must be a table")
    _only(table, _ACCEPT_KEYS, f"{where}: [accept]")
    guests = _peer_ids(table, "guests", f"{where}: accept.guests", peers, Role.GUEST)
    aliases = _strings(table, "data", f"{where}: accept.data")
    for alias in aliases or ():
        if alias not in data:
            known = ", ".join(sorted(data)) or "none"
            raise ConfigError(
                f"{where}: accept.data: {alias!r} is not an alias in [data] (aliases: {known})"
            )
    types = _enums(table, "job_types", f"{where}: accept.job_types", JobType)
    modes = _enums(table, "protect_modes", f"{where}: accept.protect_modes", ProtectMode)
    min_key_bits = _positive(table, "min_key_bits", f"{where}: accept.min_key_bits")
    if min_key_bits is not None and min_key_bits < 2048 and not allow_test_key:
        raise ConfigError(
            f"{where}: accept.min_key_bits = {min_key_bits} is below the 2048-bit floor; "
            "raise it (smaller keys need [arbiter] allow_test_key = true, tests only)"
        )
    allow_plaintext = table.get("allow_plaintext", False)
    if not isinstance(allow_plaintext, bool):
        raise ConfigError(f"{where}: accept.allow_plaintext must be true or false")
    default = AcceptPolicy()
    return AcceptPolicy(
        guests=frozenset(guest_peers if guests is None else guests),
        job_types=default.job_types if types is None else frozenset(types),
        data=frozenset(data if aliases is None else aliases),
        max_d=_positive(table, "max_d", f"{where}: accept.max_d") or default.max_d,
        max_k=_positive(table, "max_k", f"{where}: accept.max_k") or default.max_k,
        max_host_params=(
            _positive(table, "max_host_params", f"{where}: accept.max_host_params")
            or default.max_host_params
        ),
        min_key_bits=(
            min_key_bits if min_key_bits is not None else (0 if allow_test_key else 2048)
        ),
        protect_modes=default.protect_modes if modes is None else frozenset(modes),
        allow_plaintext=allow_plaintext,
    )


def _psi(raw: Mapping[str, Any], where: str, data: Mapping[str, Path]) -> PsiPolicy:
    table = raw.get("psi", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [psi] must be a table")
    _only(table, _PSI_KEYS, f"{where}: [psi]")
    modes = _enums(table, "modes", f"{where}: psi.modes", PsiMode)
    min_pad = table.get("min_pad_to", 0)
    if not isinstance(min_pad, int) or isinstance(min_pad, bool) or min_pad < 0:
        raise ConfigError(f"{where}: psi.min_pad_to must be a whole number >= 0, got {min_pad!r}")
    default = _psi_data(table, f"{where}: psi", PsiDataPolicy(), per_alias=False)
    per_alias_t = table.get("data", {})
    if not isinstance(per_alias_t, dict):
        raise ConfigError(f"{where}: psi.data must be tables [psi.data.<alias>]")
    per_alias: dict[str, PsiDataPolicy] = {}
    for alias, alias_t in per_alias_t.items():
        aw = f"{where}: psi.data.{alias}"
        if alias not in data:
            known = ", ".join(sorted(data)) or "none"
            raise ConfigError(f"{aw}: {alias!r} is not an alias in [data] (aliases: {known})")
        if not isinstance(alias_t, dict):
            raise ConfigError(f"{aw} must be a table")
        _only(alias_t, _PSI_DATA_KEYS, aw)
        per_alias[alias] = _psi_data(alias_t, aw, default, per_alias=True)
    return PsiPolicy(
        modes=PsiPolicy().modes if modes is None else frozenset(modes),
        min_pad_to=min_pad,
        default=default,
        data=per_alias,
    )


def _psi_data(
    table: Mapping[str, Any], where: str, base: PsiDataPolicy, *, per_alias: bool
) -> PsiDataPolicy:
    """One alias's PSI policy: the keys ``table`` sets, the rest from ``base``."""
    column = _str(table, "id_column", f"{where}.id_column") if "id_column" in table else None
    duplicates = base.duplicates
    if "duplicates" in table:
        name = table["duplicates"]
        try:
            duplicates = DuplicatePolicy(name)
        except ValueError:
            raise ConfigError(
                f"{where}.duplicates: {name!r} is not one of "
                f"{', '.join(d.value for d in DuplicatePolicy)}"
            ) from None
    id_type = base.id_type
    stamp = None
    if per_alias:
        if "id_type" in table:
            name = table["id_type"]
            try:
                id_type = IdType(name)
            except ValueError:
                raise ConfigError(
                    f"{where}.id_type: {name!r} is not one of {', '.join(t.value for t in IdType)}"
                ) from None
        if "timestamp_column" in table:
            stamp = _str(table, "timestamp_column", f"{where}.timestamp_column")
    if (duplicates is DuplicatePolicy.LATEST) != (stamp is not None):
        raise ConfigError(
            f'{where}: duplicates = "latest" needs a timestamp_column, and a timestamp_column '
            'is used only with duplicates = "latest" (set both in [psi.data.<alias>])'
        )
    return PsiDataPolicy(
        id_column=column or base.id_column,
        id_type=id_type,
        duplicates=duplicates,
        timestamp_column=stamp,
    )


def _scoring(
    raw: Mapping[str, Any], where: str, guest_peers: tuple[str, ...], peers: list[PeerConfig]
) -> ScoringPolicyConfig:
    table = raw.get("scoring", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [scoring] must be a table")
    _only(table, _SCORING_KEYS, f"{where}: [scoring]")
    requesters = _peer_ids(table, "requesters", f"{where}: scoring.requesters", peers, None)
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
        _only(model_t, _SCORING_MODEL_KEYS, mw)
        models[model_id] = ScoringModelPolicy(
            quota_rows=_positive(model_t, "quota_rows", f"{mw}.quota_rows"),
            expires_at=_expiry(model_t.get("expires"), f"{mw}.expires"),
            requesters=_peer_ids(model_t, "requesters", f"{mw}.requesters", peers, None),
        )
    return ScoringPolicyConfig(
        requesters=guest_peers if requesters is None else requesters,
        quota_rows=_positive(table, "quota_rows", f"{where}: scoring.quota_rows")
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


def _strings(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def _peer_ids(
    table: Mapping[str, Any],
    key: str,
    where: str,
    peers: list[PeerConfig],
    role: Role | None,
) -> tuple[str, ...] | None:
    ids = _strings(table, key, where)
    wanted = [p.party.party_id for p in peers if role is None or p.party.role is role]
    for party_id in ids or ():
        if party_id not in wanted:
            kind = f"[[peers]] entry with role {role.value}" if role else "[[peers]] entry"
            raise ConfigError(
                f"{where}: {party_id!r} is not a {kind} (known: {', '.join(wanted) or 'none'})"
            )
    return ids


def _enums(table: Mapping[str, Any], key: str, where: str, kind: type[_E]) -> tuple[_E, ...] | None:
    names = _strings(table, key, where)
    if names is None:
        return None
    out = []
    for name in names:
        try:
            out.append(kind(name))
        except ValueError:
            raise ConfigError(
                f"{where}: {name!r} is not one of {', '.join(m.value for m in kind)}"
            ) from None
    return tuple(out)


def _positive(table: Mapping[str, Any], key: str, where: str) -> int | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


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


def _health(value: object, where: str) -> str | None:
    """``[party] health``: a port (loopback) or ``host:port``; absent means off."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 65535:
            raise ConfigError(f"{where}: port {value} is out of range")
        return f"127.0.0.1:{value}"
    if isinstance(value, str):
        return _address(value, where)
    raise ConfigError(f"{where}: give a port (8081) or 'host:port', not {value!r}")


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()
