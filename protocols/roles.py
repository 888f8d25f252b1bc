"""Party identity: an id and a role.

A party id is what its certificate names (subject alternative name, DNS form),
so identity never depends on host names or addresses. Several parties may share
a role (for example the clients of a FedAvg job are all hosts or guests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from protocols.errors import ConfigError

_PARTY_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class Role(Enum):
    """The three roles of docs/protocol.md §0."""

    GUEST = "guest"
    HOST = "host"
    ARBITER = "arbiter"

    @classmethod
    def parse(cls, value: str, *, where: str = "role") -> Role:
        """Parse a role name, raising :class:`ConfigError` naming ``where``."""
        try:
            return cls(value.strip().lower())
        except ValueError:
            names = ", ".join(r.value for r in cls)
            raise ConfigError(f"{where}: {value!r} is not a role; use one of {names}") from None


def check_party_id(party_id: str, *, where: str = "party id") -> str:
    """Return ``party_id`` if it is a valid DNS label, else raise :class:`ConfigError`."""
    if not isinstance(party_id, str) or not _PARTY_ID.match(party_id):
        raise ConfigError(
            f"{where}: {party_id!r} is not a valid party id; use 1-63 lower-case letters, "
            "digits and inner dashes (it becomes the certificate's DNS name)"
        )
    return party_id


@dataclass(frozen=True)
class Party:
    """A party: its id (the certificate's SAN) and its role."""

    party_id: str
    role: Role

    def __post_init__(self) -> None:
        check_party_id(self.party_id)

    def __str__(self) -> str:
        return f"{self.party_id} ({self.role.value})"


@dataclass(frozen=True)
class PartyAddress:
    """Where a party's service listens, and the certificate pinned for it."""

    party: Party
    address: str
    certificate_pem: bytes | None = None
