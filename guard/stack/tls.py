"""The stack's private certificate authority and the server certificates it signs (``cryptography`` only).

Everything lives in ``<home>/tls`` (0700), every file 0600: ``ca.key``/``ca.crt`` and one
``<name>.key``/``<name>.crt`` per server (redis, postgres). Clients verify servers against ``ca.crt``
(``GUARD_REDIS_URL``'s ``ssl_ca_certs``, ``GUARD_BRANCH_DSN``'s ``sslrootcert``, Debezium's
``database.sslrootcert``). All functions are idempotent: an existing, unexpired certificate for the same
names is kept; a new CA re-issues every server certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825
#: Names every server certificate carries: the loopback address and name, and the docker-compose hosts.
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def tls_dir(home: Path) -> Path:
    return home / "tls"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _valid(cert: x509.Certificate, margin_days: int = 30) -> bool:
    now = datetime.datetime.now(datetime.UTC)
    return cert.not_valid_after_utc - datetime.timedelta(days=margin_days) > now >= cert.not_valid_before_utc


def ensure_ca(home: Path) -> tuple[Path, Path]:
    """(ca.crt, ca.key) under ``<home>/tls``, created once (idempotent); 0600 files in a 0700 directory."""
    d = tls_dir(home)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    crt, key = d / "ca.crt", d / "ca.key"
    if crt.exists() and key.exists():
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        if _valid(cert):
            return crt, key
    private = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "BranchGuard local stack"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"BranchGuard stack CA ({home})"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
            .sign(private, hashes.SHA256()))
    _write_private(key, _key_pem(private))
    _write_private(crt, cert.public_bytes(serialization.Encoding.PEM))
    # a new CA invalidates every certificate it did not sign
    for old in d.glob("*.crt"):
        if old.name != "ca.crt":
            old.unlink()
    return crt, key


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def ensure_server_cert(home: Path, name: str, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> tuple[Path, Path]:
    """(``<name>.crt``, ``<name>.key``) signed by the stack CA for ``hosts``; re-issued when they changed."""
    ca_crt, ca_key = ensure_ca(home)
    d = tls_dir(home)
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    if crt.exists() and key.exists():
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        try:
            same_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == _san(hosts)
        except x509.ExtensionNotFound:
            same_names = False
        if _valid(cert) and same_names and cert.issuer == ca_cert.subject:
            return crt, key
    ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(ca_private, ec.EllipticCurvePrivateKey)  # noqa: S101 - written by ensure_ca
    private = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()),
                           critical=False)
            .sign(ca_private, hashes.SHA256()))
    _write_private(key, _key_pem(private))
    _write_private(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt, key
