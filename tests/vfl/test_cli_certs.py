"""`vfl certs`: demo mode, and real mode (CA, key + CSR at the party, CA signs, peers pin)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from protocols.errors import ConfigError
from protocols.roles import Party, Role
from protocols.transport import tls
from vfl.cli import main


def test_demo_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["certs", "--demo", str(tmp_path), "--party", "bank:guest", "--party", "shop:host"])
        == 0
    )
    ident = tls.load_identity(
        certificate=tmp_path / "shop.pem", key=tmp_path / "shop.key", ca=tmp_path / "ca.pem"
    )
    assert ident.party == Party("shop", Role.HOST)
    assert stat.S_IMODE((tmp_path / "shop.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert "shop" in capsys.readouterr().out


def test_real_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, silo = tmp_path / "ca", tmp_path / "bank"
    assert main(["certs", "init-ca", "--out", str(ca)]) == 0
    assert main(["certs", "request", "--id", "bank", "--role", "guest", "--out", str(silo)]) == 0
    assert not (silo / "bank.pem").exists() and (silo / "bank.csr").exists()
    assert (
        main(
            [
                "certs",
                "sign",
                "--ca-dir",
                str(ca),
                "--csr",
                str(silo / "bank.csr"),
                "--out",
                str(silo / "bank.pem"),
                "--days",
                "30",
            ]
        )
        == 0
    )
    ident = tls.load_identity(
        certificate=silo / "bank.pem", key=silo / "bank.key", ca=ca / "ca.pem"
    )
    assert ident.party == Party("bank", Role.GUEST)
    out = capsys.readouterr().out
    assert tls.fingerprint(ident.certificate_pem) in out  # what the peer pins
    assert main(["certs", "show", str(silo / "bank.pem")]) == 0
    assert "bank (guest)" in capsys.readouterr().out


def test_sign_refuses_a_csr_without_party_name(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert, key = tls.create_ca(tmp_path / "ca")
    k = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bank")]))
        .sign(k, hashes.SHA256())
    )
    with pytest.raises(ConfigError, match="subject alternative name"):
        tls.sign_csr(csr_pem=csr.public_bytes(serialization.Encoding.PEM), ca_cert=cert, ca_key=key)
    with pytest.raises(ConfigError, match="not a PEM certificate signing request"):
        tls.sign_csr(csr_pem=b"junk", ca_cert=cert, ca_key=key)


def test_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    tls.create_demo_pki(tmp_path, [Party("bank", Role.GUEST), Party("shop", Role.HOST)])
    with pytest.raises(ConfigError, match="does not belong"):
        tls.load_identity(
            certificate=tmp_path / "bank.pem", key=tmp_path / "shop.key", ca=tmp_path / "ca.pem"
        )


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert main(["certs"]) == 2
