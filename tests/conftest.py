"""Shared fixtures: certificates are made once per session; tests use unique job ids."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pytest

from protocols.crypto.paillier import PrivateKey, PublicKey, generate_keypair
from protocols.roles import Party, Role
from protocols.transport import tls

BANK = Party("bank", Role.GUEST)
RETAILER = Party("retailer", Role.HOST)
ARBITER = Party("arbiter", Role.ARBITER)
PARTIES = (BANK, RETAILER, ARBITER)


class TestTag(StrEnum):
    """Tags registered by every test channel."""

    __test__ = False
    DATA = "test.DATA"
    REQUEST = "test.REQUEST"
    REPLY = "test.REPLY"


@dataclass(frozen=True)
class Pki:
    """Demo PKI plus deliberately bad certificates."""

    dir: Path
    other_dir: Path  # another CA with the same party ids

    def identity(self, party: Party) -> tls.TlsIdentity:
        return tls.load_demo_identity(self.dir, party.party_id)

    def other_ca_identity(self, party: Party) -> tls.TlsIdentity:
        return tls.load_demo_identity(self.other_dir, party.party_id)

    def extra_identity(self, name: str, party: Party, **sign_kwargs: object) -> tls.TlsIdentity:
        """A fresh key + certificate for ``party`` signed by the main CA (not validated)."""
        out = self.dir / "extra" / name
        key, csr = tls.create_key_and_csr(out, party)
        pem = tls.sign_csr(
            csr_pem=csr.read_bytes(),
            ca_cert=self.dir / "ca.pem",
            ca_key=self.dir / "ca.key",
            **sign_kwargs,  # type: ignore[arg-type]
        )
        return tls.TlsIdentity(
            party=party,
            certificate_pem=pem,
            key_pem=key.read_bytes(),
            ca_pem=(self.dir / "ca.pem").read_bytes(),
        )

    def expired_identity(self, party: Party) -> tls.TlsIdentity:
        start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
        return self.extra_identity(f"expired-{party.party_id}", party, days=1, not_before=start)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    tls.create_demo_pki(root / "main", list(PARTIES))
    tls.create_demo_pki(root / "other", list(PARTIES))
    return Pki(dir=root / "main", other_dir=root / "other")


@pytest.fixture(scope="session")
def keypair() -> tuple[PublicKey, PrivateKey]:
    """A small key, through the explicit test-only flag."""
    return generate_keypair(bits=1024, allow_test_key=True)


@pytest.fixture(scope="session")
def pk(keypair: tuple[PublicKey, PrivateKey]) -> PublicKey:
    return keypair[0]


@pytest.fixture(scope="session")
def sk(keypair: tuple[PublicKey, PrivateKey]) -> PrivateKey:
    return keypair[1]


@pytest.fixture
def job_id() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"
