"""Certificates and mutual TLS between parties.

A party's identity lives in its certificate: the subject alternative name (DNS
form) and common name are the party id, the organisational unit is the role.
Clients check the expected peer id through gRPC's target-name override, so
identity never depends on host names. Servers read the client's certificate from
the TLS session, compare it with the certificate pinned for that party id, and
refuse an envelope whose claimed sender differs (:mod:`protocols.transport.base`).

Two ways to obtain certificates:

* demo mode (:func:`create_demo_pki`): one local CA and a key plus certificate per
  party, all in one folder, for a demo on one machine;
* real mode: the CA operator runs :func:`create_ca`; each party runs
  :func:`create_key_and_csr` in its own silo (the key never leaves it); the CA
  signs the request with :func:`sign_csr`; peers exchange certificates and pin them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.errors import ConfigError, PeerIdentityError
from protocols.files import atomic_write
from protocols.roles import Party, Role, check_party_id

DEFAULT_DAYS = 365
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class TlsIdentity:
    """A party's own certificate chain material (PEM)."""

    party: Party
    certificate_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def fingerprint(certificate_pem: bytes) -> str:
    """SHA-256 fingerprint (hex) of a PEM certificate's DER encoding."""
    cert = _load_cert(certificate_pem, where="certificate")
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def party_of(certificate_pem: bytes) -> Party:
    """The party named by a certificate (SAN = CN = party id, OU = role)."""
    cert = _load_cert(certificate_pem, where="peer certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if len(names) != 1 or cns != names or len(ous) != 1:
        raise PeerIdentityError(
            "certificate does not name exactly one party (needs one DNS SAN equal to the CN and "
            "one OU with the role); issue it with `vfl certs`"
        )
    return Party(check_party_id(names[0], where="certificate SAN"), Role.parse(str(ous[0])))


def check_validity(certificate_pem: bytes, *, where: str) -> None:
    """Raise :class:`ConfigError` if the certificate is expired or not yet valid."""
    cert = _load_cert(certificate_pem, where=where)
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise ConfigError(
            f"{where}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            "request a new one from the CA (`vfl certs request`, then `vfl certs sign`)"
        )
    if now + _CLOCK_SKEW < cert.not_valid_before_utc:
        raise ConfigError(f"{where}: certificate is not valid before {cert.not_valid_before_utc}")


def load_identity(*, certificate: Path, key: Path, ca: Path) -> TlsIdentity:
    """Load and check a party's certificate, key and CA, naming the file at fault."""
    cert_pem = _read(certificate, "certificate")
    key_pem = _read(key, "key")
    ca_pem = _read(ca, "CA certificate")
    party = party_of(cert_pem)
    check_validity(cert_pem, where=str(certificate))
    check_validity(ca_pem, where=str(ca))
    private = _load_key(key_pem, where=str(key))
    cert = _load_cert(cert_pem, where=str(certificate))
    if private.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ConfigError(f"{key}: this key does not belong to certificate {certificate}")
    ca_cert = _load_cert(ca_pem, where=str(ca))
    if cert.issuer != ca_cert.subject:
        raise ConfigError(f"{certificate} was not issued by the CA in {ca}")
    return TlsIdentity(party=party, certificate_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)


def load_demo_identity(folder: Path, party_id: str) -> TlsIdentity:
    """Load ``<id>.pem``, ``<id>.key`` and ``ca.pem`` as written by :func:`create_demo_pki`."""
    return load_identity(
        certificate=folder / f"{party_id}.pem", key=folder / f"{party_id}.key", ca=folder / "ca.pem"
    )


# ---------------------------------------------------------------------------
# issuing


def create_ca(
    out_dir: Path, *, name: str = "vfl federation CA", days: int = 3650
) -> tuple[Path, Path]:
    """Create a CA key (owner-only) and self-signed certificate in ``out_dir``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out_dir / "ca.key", out_dir / "ca.pem"
    atomic_write(key_path, mode=0o600, data=_key_pem(key))
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def create_key_and_csr(out_dir: Path, party: Party) -> tuple[Path, Path]:
    """Create the party's private key (owner-only) and a CSR naming it, in ``out_dir``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_party_name(party))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(party.party_id)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out_dir / f"{party.party_id}.key", out_dir / f"{party.party_id}.csr"
    atomic_write(key_path, mode=0o600, data=_key_pem(key))
    atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return key_path, csr_path


def sign_csr(
    *,
    csr_pem: bytes,
    ca_cert: Path,
    ca_key: Path,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
) -> bytes:
    """Sign a party's CSR after checking it names exactly one party; return the PEM."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise ConfigError("the CSR's signature does not verify; create it again")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ConfigError(
            "the CSR has no subject alternative name; use `vfl certs request`"
        ) from None
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    ous = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    names = san.get_values_for_type(x509.DNSName)
    if len(names) != 1 or cns != names or len(ous) != 1:
        raise ConfigError("the CSR must name one party: one DNS SAN equal to the CN, one OU role")
    party = Party(
        check_party_id(names[0], where="CSR SAN"), Role.parse(str(ous[0]), where="CSR OU")
    )
    ca = _load_cert(_read(ca_cert, "CA certificate"), where=str(ca_cert))
    key = _load_key(_read(ca_key, "CA key"), where=str(ca_key))
    start = not_before or dt.datetime.now(dt.UTC) - _CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(_party_name(party))
        .issuer_name(ca.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(party.party_id)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def create_demo_pki(
    out_dir: Path, parties: list[Party], *, days: int = DEFAULT_DAYS
) -> dict[str, Path]:
    """One CA plus a key and certificate per party in ``out_dir`` (demo mode).

    Returns the certificate path per party id (keys are ``<id>.key`` beside them).
    """
    ids = [p.party_id for p in parties]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"party ids must be unique, got {ids}")
    ca_cert, ca_key = create_ca(out_dir, name="vfl demo CA")
    paths = {}
    for party in parties:
        _, csr_path = create_key_and_csr(out_dir, party)
        cert_path = out_dir / f"{party.party_id}.pem"
        atomic_write(
            cert_path,
            sign_csr(csr_pem=csr_path.read_bytes(), ca_cert=ca_cert, ca_key=ca_key, days=days),
            mode=0o644,  # a certificate is public
        )
        csr_path.unlink()
        paths[party.party_id] = cert_path
    return paths


# ---------------------------------------------------------------------------
# helpers


def _party_name(party: Party) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, party.role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, party.party_id),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from exc


def _load_cert(pem: bytes, *, where: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"{where}: not a PEM certificate ({exc})") from exc


def _load_key(pem: bytes, *, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{where}: expected an EC key as made by `vfl certs`")
    return key
