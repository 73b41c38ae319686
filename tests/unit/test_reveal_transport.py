"""`guard reveal serve` refuses plain HTTP anywhere but on loopback.

Bearer tokens and revealed plaintext travel in the requests and answers; config.py said plain HTTP was
loopback only, but `serve` listened in the clear on whatever `reveal_host` said (0.0.0.0 included). The
check runs before the service is built: these settings name no reachable Kafka, Redis or token key file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.config import Settings
from guard.errors import ConfigError
from guard.reveal.server import check_transport, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_plain_http_is_served_on_loopback(host: str) -> None:
    assert is_loopback(host)
    assert check_transport(Settings(reveal_host=host)) == {}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.10", "reveal.bank.example",  # noqa: S104
                                  "localhost.bank.example", "", "fe80::1"])
def test_plain_http_elsewhere_is_refused_with_what_to_do(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConfigError) as err:
        check_transport(Settings(reveal_host=host))
    message = str(err.value)
    assert "reveal_tls_cert" in message and "reveal_tls_key" in message and "127.0.0.1" in message


def test_with_tls_any_address_is_served_and_half_a_tls_configuration_is_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "reveal.crt", tmp_path / "reveal.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    tls = check_transport(Settings(reveal_host="0.0.0.0", reveal_tls_cert=str(cert),  # noqa: S104
                                   reveal_tls_key=str(key)))
    assert tls == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    with pytest.raises(ConfigError, match="must both name PEM files"):
        check_transport(Settings(reveal_host="0.0.0.0", reveal_tls_cert=str(cert)))  # noqa: S104


def test_serve_refuses_before_it_builds_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.reveal import server

    def build(*_: object) -> None:
        raise AssertionError("the service was built for a refused transport")

    monkeypatch.setattr(server, "build_service", build)
    with pytest.raises(ConfigError, match="not a loopback address"):
        server.serve(Settings(reveal_host="0.0.0.0"), policy=None)  # type: ignore[arg-type]  # noqa: S104
