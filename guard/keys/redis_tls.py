"""TLS to the key store: one context per process, trusting only the CA the URL names.

Why: redis-py's `SSLConnection` builds a new `ssl.SSLContext` for every connection it opens, starting from
`ssl.create_default_context()`, which loads the system's whole trust store (~20 ms of parsing a CA bundle
per connection), then adds the CA file of the URL (`ssl_ca_certs`) to it. Two things follow:

- the key store's client trusts every public CA as well as the deployment's own: any certificate a public
  CA issued for the key store's host name would be accepted. The key store holds every wrapped key of a
  branch; its client should trust the CA it was configured with and nothing else;
- a worker whose pool grows while it works (a first sight keeps requests in flight beside the commit's)
  pays the trust store's parsing once per new connection, on its hot path.

`PinnedSSLConnection` wraps each socket with a context made once per process for the connection's TLS
settings: `ssl.create_default_context(cafile=...)` when the URL names a CA file (only that CA is trusted),
the system's trust store only when it names none. Hostname checking and the verify mode are redis-py's
(`ssl_check_hostname`, `ssl_cert_reqs`: required by default). A CA, certificate or key file that changes
(rotation) is read again: the files' sizes and modification times are checked at every connect, and a
change replaces the context of those settings (one context is kept per set of settings, however often the
files rotate). OCSP checks (not used by the guard) fall back to redis-py's own path.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from typing import Any

from redis.connection import SSLConnection

#: TLS settings -> (the stamps of the files they name, the context made from them).
_contexts: dict[tuple[Any, ...], tuple[tuple[Any, ...], ssl.SSLContext]] = {}
_lock = threading.Lock()


def _file_stamp(path: str | None) -> tuple[int, int] | None:
    """(size, mtime ns) of a CA file, so a replaced file gets a new context; None for no file."""
    if path is None:
        return None
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def pinned_context(*, ca_certs: str | None, ca_path: str | None = None, ca_data: str | bytes | None = None,
                   cert_reqs: ssl.VerifyMode = ssl.CERT_REQUIRED, check_hostname: bool = True,
                   certfile: str | None = None, keyfile: str | None = None,
                   min_version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    """The process's context for these TLS settings (made at the first call, shared after).

    With a CA (`ca_certs`, `ca_path` or `ca_data`) the context trusts that CA only; with none, the system's
    trust store. Client certificates with a password are not cached (the password may be a callable).
    """
    settings = (ca_certs, ca_path, ca_data, cert_reqs, check_hostname, certfile, keyfile, min_version, ciphers)
    stamps = (_file_stamp(ca_certs), _file_stamp(certfile), _file_stamp(keyfile))
    with _lock:
        cached = _contexts.get(settings)
        if cached is not None and cached[0] == stamps:
            return cached[1]
        if ca_certs is None and ca_path is None and ca_data is None:
            context = ssl.create_default_context()
        else:
            context = ssl.create_default_context(cafile=ca_certs, capath=ca_path, cadata=ca_data)
        context.check_hostname = check_hostname
        context.verify_mode = cert_reqs
        if certfile or keyfile:
            context.load_cert_chain(certfile=certfile or "", keyfile=keyfile)
        if min_version is not None:
            context.minimum_version = min_version
        if ciphers:
            context.set_ciphers(ciphers)
        # A rotated file's context replaces the one before it: connections already open keep theirs.
        _contexts[settings] = (stamps, context)
    return context


class PinnedSSLConnection(SSLConnection):
    """redis-py's TLS connection with the process's pinned context (see the module docstring)."""

    def _wrap_socket_with_ssl(self, sock: socket.socket) -> ssl.SSLSocket:
        if (self.ssl_validate_ocsp or self.ssl_validate_ocsp_stapled or self.certificate_password is not None
                or self.ssl_include_verify_flags or self.ssl_exclude_verify_flags):
            return super()._wrap_socket_with_ssl(sock)
        context = pinned_context(ca_certs=self.ca_certs, ca_path=self.ca_path, ca_data=self.ca_data,
                                 cert_reqs=self.cert_reqs, check_hostname=self.check_hostname,
                                 certfile=self.certfile, keyfile=self.keyfile,
                                 min_version=self.ssl_min_version, ciphers=self.ssl_ciphers)
        return context.wrap_socket(sock, server_hostname=self.host)
