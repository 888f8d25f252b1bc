"""What this party takes part in: ``[accept]`` (jobs, guests, shapes, keys) and ``[psi]``.

The policies a host or arbiter applies to a guest's requests (:class:`AcceptPolicy`,
:class:`PsiPolicy` with a :class:`PsiDataPolicy` per data alias), and their parsers; the
defaults are the safe choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from protocols.roles import Role
from psi.canon import DuplicatePolicy, IdType
from psi.protocol import PsiMode
from vfl.config.network import PeerConfig, peer_ids
from vfl.config.values import enum_list, only_keys, positive_int, required_str, str_list
from vfl.privacy.label_protection import ProtectMode

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
    "guest_features",
}
_PSI_KEYS = {"modes", "min_pad_to", "id_column", "duplicates", "data"}
_PSI_DATA_KEYS = {"id_column", "id_type", "duplicates", "timestamp_column"}


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
    guest_features
        Whether a guest's job may choose this party's feature columns (its ``[host]``
        section); by default this party applies its own ``[features.<alias>]`` and a guest
        never learns its column names (docs/protocol.md §4.4.3).
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
    guest_features: bool = False

    def admits(self, guest: str, job_type: JobType) -> bool:
        """Whether ``guest`` may submit jobs of ``job_type`` here (check 1 of
        :mod:`vfl.service.accept`, without its reasons)."""
        return guest in self.guests and job_type in self.job_types


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


def parse_accept(
    raw: Mapping[str, Any],
    *,
    where: str,
    guest_peers: tuple[str, ...],
    peers: list[PeerConfig],
    data: Mapping[str, Path],
    allow_test_key: bool,
) -> AcceptPolicy:
    """``[accept]`` (optional): absent keys take the defaults :class:`AcceptPolicy` names."""
    table = raw.get("accept", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [accept] must be a table")
    only_keys(table, _ACCEPT_KEYS, f"{where}: [accept]")
    guests = peer_ids(table, "guests", f"{where}: accept.guests", peers, Role.GUEST)
    aliases = str_list(table, "data", f"{where}: accept.data")
    for alias in aliases or ():
        if alias not in data:
            known = ", ".join(sorted(data)) or "none"
            raise ConfigError(
                f"{where}: accept.data: {alias!r} is not an alias in [data] (aliases: {known})"
            )
    types = enum_list(table, "job_types", f"{where}: accept.job_types", JobType)
    modes = enum_list(table, "protect_modes", f"{where}: accept.protect_modes", ProtectMode)
    min_key_bits = positive_int(table, "min_key_bits", f"{where}: accept.min_key_bits")
    if min_key_bits is not None and min_key_bits < 2048 and not allow_test_key:
        raise ConfigError(
            f"{where}: accept.min_key_bits = {min_key_bits} is below the 2048-bit floor; "
            "raise it (smaller keys need [arbiter] allow_test_key = true, tests only)"
        )
    allow_plaintext = table.get("allow_plaintext", False)
    if not isinstance(allow_plaintext, bool):
        raise ConfigError(f"{where}: accept.allow_plaintext must be true or false")
    guest_features = table.get("guest_features", False)
    if not isinstance(guest_features, bool):
        raise ConfigError(f"{where}: accept.guest_features must be true or false")
    default = AcceptPolicy()
    return AcceptPolicy(
        guests=frozenset(guest_peers if guests is None else guests),
        job_types=default.job_types if types is None else frozenset(types),
        data=frozenset(data if aliases is None else aliases),
        max_d=positive_int(table, "max_d", f"{where}: accept.max_d") or default.max_d,
        max_k=positive_int(table, "max_k", f"{where}: accept.max_k") or default.max_k,
        max_host_params=(
            positive_int(table, "max_host_params", f"{where}: accept.max_host_params")
            or default.max_host_params
        ),
        min_key_bits=(
            min_key_bits if min_key_bits is not None else (0 if allow_test_key else 2048)
        ),
        protect_modes=default.protect_modes if modes is None else frozenset(modes),
        allow_plaintext=allow_plaintext,
        guest_features=guest_features,
    )


def parse_psi(raw: Mapping[str, Any], *, where: str, data: Mapping[str, Path]) -> PsiPolicy:
    """``[psi]`` (optional), its ``[psi.data.<alias>]`` tables naming ``[data]`` aliases."""
    table = raw.get("psi", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [psi] must be a table")
    only_keys(table, _PSI_KEYS, f"{where}: [psi]")
    modes = enum_list(table, "modes", f"{where}: psi.modes", PsiMode)
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
        only_keys(alias_t, _PSI_DATA_KEYS, aw)
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
    column = (
        required_str(table, "id_column", f"{where}.id_column") if "id_column" in table else None
    )
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
            stamp = required_str(table, "timestamp_column", f"{where}.timestamp_column")
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
