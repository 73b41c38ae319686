"""The local stack's one private CA and the certificates it signs (``<home>/tls``), made with `cryptography`.

* ``ca.crt`` / ``ca.key``: a self-signed CA (ECDSA P-256, 10 years) that signs everything below. Clients
  trust ``ca.crt`` only (``ssl.ca.location`` / ``ssl.truststore.location``).
* ``broker.pem``, ``controller.pem``: each node's private key (PKCS#8) followed by its certificate and the
  CA's, the layout Kafka reads with ``ssl.keystore.type=PEM``. The names in the certificates
  (``CN=broker``, ``CN=controller``) become the principals ``User:broker`` and ``User:controller`` on the
  mutual-TLS listeners (``ssl.principal.mapping.rules``), where the broker talks to the controller and to
  itself (transaction markers).
* ``redis.crt`` / ``redis.key``, ``postgres.crt`` / ``postgres.key``: the other servers' certificates
  (`ensure_server_cert`); Redis and PostgreSQL clients verify them against ``ca.crt`` (``GUARD_REDIS_URL``'s
  ``ssl_ca_certs``, ``GUARD_BRANCH_DSN``'s ``sslrootcert``, Debezium's ``database.sslrootcert``).
* ``admin.crt`` / ``admin.key``: a client certificate, ``CN=admin`` (``User:admin``), with which
  `guard stack up` reaches the broker's mutual-TLS listener to create the SCRAM users and the ACLs: it works
  before any SCRAM credential exists (a home formatted before SASL was introduced) and after a password file
  was replaced (rotation).

Every file is written 0600 in a 0700 directory. Files are made once; a certificate is made again when it is
missing, expires within 30 days, or lacks a host name the stack now needs (``hosts``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guard.stack.procs import progress

CA_DAYS = 3650
LEAF_DAYS = 730
RENEW_BEFORE = dt.timedelta(days=30)
#: Names every server certificate carries besides the stack's host.
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` atomically with mode 0600 (created that way, never readable by others in between)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "BranchGuard local stack"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


class LocalCA:
    """The CA and leaf certificates under one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    def keystore(self, name: str) -> Path:
        """Key + certificate chain for Kafka's ``ssl.keystore.type=PEM``."""
        return self.dir / f"{name}.pem"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    # --- the CA ----------------------------------------------------------------------------------------
    def ensure_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if self.ca_cert.exists() and self.ca_key.exists():
            cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
            if isinstance(key, ec.EllipticCurvePrivateKey) and _valid_for(cert, RENEW_BEFORE):
                return key, cert
        progress(f"tls: creating the stack's private CA in {self.dir}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = _name("BranchGuard local CA")
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(self.ca_key, _key_pem(key))
        _write_private(self.ca_cert, _cert_pem(cert))
        # a new CA invalidates every leaf it did not sign
        for leaf in self.dir.glob("*.pem"):
            leaf.unlink()
        for leaf in self.dir.glob("*.crt"):
            if leaf != self.ca_cert:
                leaf.unlink()
        return key, cert

    # --- leaves ----------------------------------------------------------------------------------------
    def ensure_leaf(self, name: str, hosts: Sequence[str] = (), *, server: bool = True) -> Path:
        """`name`'s key and certificate (CN=`name`): ``<name>.pem`` (Kafka) plus ``<name>.crt``/``.key``.

        Server certificates carry `hosts` as subject alternative names and may also be used as client
        certificates (a broker is a client of the controller and of its own mutual-TLS listener).
        """
        ca_key, ca_cert = self.ensure_ca()
        wanted = list(dict.fromkeys([*hosts, *DEFAULT_HOSTS])) if server else []
        if self._leaf_ok(name, ca_cert, wanted):
            return self.keystore(name)
        progress(f"tls: issuing the certificate of {name} (CN={name}{', ' + ', '.join(wanted) if wanted else ''})")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if wanted:
            builder = builder.add_extension(_san(wanted), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_private(self.key(name), _key_pem(key))
        _write_private(self.cert(name), _cert_pem(cert))
        _write_private(self.keystore(name), _key_pem(key) + _cert_pem(cert) + _cert_pem(ca_cert))
        return self.keystore(name)

    def _leaf_ok(self, name: str, ca_cert: x509.Certificate, wanted: list[str]) -> bool:
        if not (self.keystore(name).exists() and self.cert(name).exists() and self.key(name).exists()):
            return False
        try:
            cert = x509.load_pem_x509_certificate(self.cert(name).read_bytes())
        except ValueError:
            return False
        if cert.issuer != ca_cert.subject or not _valid_for(cert, RENEW_BEFORE):
            return False
        try:
            ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,  # type: ignore[call-arg, union-attr]
                                        ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - any verification failure means: issue it again
            return False
        if not wanted:
            return True
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
        return set(wanted) <= have


def _valid_for(cert: x509.Certificate, margin: dt.timedelta) -> bool:
    now = dt.datetime.now(dt.UTC)
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - margin > now


# --- the home-based helpers the Redis, PostgreSQL and compose code use (same CA, same files) --------------
def tls_dir(home: Path) -> Path:
    return home / "tls"


def ensure_ca(home: Path) -> tuple[Path, Path]:
    """(ca.crt, ca.key) under ``<home>/tls``, created once (idempotent); 0600 files in a 0700 directory."""
    ca = LocalCA(tls_dir(home))
    ca.ensure_ca()
    os.chmod(ca.dir, 0o700)
    return ca.ca_cert, ca.ca_key


def ensure_server_cert(home: Path, name: str, hosts: Sequence[str] = DEFAULT_HOSTS) -> tuple[Path, Path]:
    """(``<name>.crt``, ``<name>.key``) signed by the stack CA for `hosts` (plus `DEFAULT_HOSTS`); issued
    again when a name is missing, it expires within 30 days or another CA signed it."""
    ca = LocalCA(tls_dir(home))
    ca.ensure_leaf(name, hosts)
    return ca.cert(name), ca.key(name)
