"""`guard reveal serve`: the service built from settings and run on uvicorn.

The process holds the key manager with blind-index keys (for search) and the data keys it opens images
with; none of them leaves it. It reads the policy directory (reloaded when it changes, a bad reload keeps
the running policy), the catalog, the token key file, and talks to Kafka (sanitized topics read
`read_committed`, audit records to `guard.audit`) and Redis (keys, tokens, rate windows).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from guard.config import Settings
from guard.errors import ConfigError
from guard.keys.store import RedisKeyStore
from guard.reveal.kafka_io import AuditSink, RecordFetcher
from guard.reveal.ratelimit import RateLimiter
from guard.reveal.service import SEARCH_BUDGET, Policy, RevealService
from guard.reveal.tokens import TokenStore, load_token_key

log = logging.getLogger("guard.reveal")


@dataclass
class Built:
    service: RevealService
    fetcher: RecordFetcher
    sink: AuditSink

    def close(self) -> None:
        self.fetcher.close()
        self.sink.close()


def token_store(settings: Settings, *, create_key: bool = False) -> TokenStore:
    """The token store of the settings' key store and token key file."""
    key = load_token_key(settings.reveal_token_key_file or None, create=create_key)
    return TokenStore(RedisKeyStore(settings.redis_url, settings.tenant,
                                    password_file=settings.redis_password_file or None), key)


def build_service(settings: Settings, policy: Policy) -> Built:
    """Everything the service needs, from settings; fails early with errors that say what to do."""
    from guard.pipeline.runtime import build_catalog, build_keys

    keys = build_keys(settings, listen=True, indexes=True)
    tokens = token_store(settings, create_key=True)
    limiter, search_limiter = rate_limiters(settings, keys.store)
    fetcher = RecordFetcher(settings)
    # Every call's audit records are chained and checkpointed (docs/audit.md): no signing key, no service,
    # as for the worker and `guard erase`.
    from guard.audit.writer import load_audit_signer
    from guard.records.builders import RecordBuilder

    sink = AuditSink(settings, signer=load_audit_signer(settings), checkpoint=RecordBuilder(settings, keys).checkpoint,
                     store=keys.store.put_audit_checkpoints)
    service = RevealService(settings, keys, build_catalog(settings), policy, fetcher, sink, tokens, limiter,
                            search_limiter=search_limiter)
    return Built(service, fetcher, sink)


def rate_limiters(settings: Settings, store: RedisKeyStore) -> tuple[RateLimiter, RateLimiter]:
    """(the reveals' budget, the searches' budget): a search counts against both, in counters of its own for
    the second, so that brute-forcing a masked value through its blind index is slow (docs/reveal.md)."""
    for name in ("reveal_rate_limit", "reveal_rate_window_s", "reveal_search_rate_limit",
                 "reveal_search_rate_window_s"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name} is {getattr(settings, name)}: rate limits and their windows must be "
                              f"positive (set GUARD_{name.upper()} to 1 or more; defaults 600 per 60 s for "
                              "reveals, 100 per 3600 s for searches)")
    limiter = RateLimiter(store, limit=settings.reveal_rate_limit, window_s=settings.reveal_rate_window_s)
    return limiter, RateLimiter(store, limit=settings.reveal_search_rate_limit,
                                window_s=settings.reveal_search_rate_window_s, budget=SEARCH_BUDGET, within=limiter)


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine: `localhost` or a loopback address (127.0.0.0/8,
    ::1). Any other name, and the wildcards 0.0.0.0 and ::, are not: a name can resolve to anything."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(settings: Settings) -> dict[str, str]:
    """uvicorn's TLS arguments, or none for plain HTTP, which is refused anywhere but on loopback.

    Bearer tokens and revealed plaintext travel in the requests and answers: served without TLS on an address
    other machines reach, both cross the network in the clear. Checked before the service is built, so a
    refused configuration touches neither Kafka nor Redis nor the token key file.
    """
    if settings.reveal_tls_cert or settings.reveal_tls_key:
        for what in (settings.reveal_tls_cert, settings.reveal_tls_key):
            if not what or not Path(what).is_file():
                raise ConfigError("reveal_tls_cert and reveal_tls_key must both name PEM files (the server "
                                  "certificate and its key)")
        return {"ssl_certfile": settings.reveal_tls_cert, "ssl_keyfile": settings.reveal_tls_key}
    if not is_loopback(settings.reveal_host):
        raise ConfigError(f"the reveal service would serve plain HTTP on {settings.reveal_host}, which is not a "
                          "loopback address: set reveal_tls_cert and reveal_tls_key (GUARD_REVEAL_TLS_CERT/_KEY, "
                          "PEM files) to serve HTTPS, or listen on 127.0.0.1 (--host) behind a TLS proxy")
    return {}


def serve(settings: Settings, policy: Policy) -> None:
    """Run the API until SIGINT/SIGTERM (uvicorn's graceful shutdown), then close the Kafka clients."""
    import uvicorn

    from guard.reveal.app import create_app

    tls = check_transport(settings)
    built = build_service(settings, policy)
    app = create_app(built.service, max_body_bytes=settings.reveal_max_body_bytes)
    scheme = "https" if tls else "http"
    log.info("reveal service on %s://%s:%d (OpenAPI at /openapi.json)", scheme, settings.reveal_host,
             settings.reveal_port)
    try:
        uvicorn.run(app, host=settings.reveal_host, port=settings.reveal_port, log_level="info",
                    server_header=False, date_header=True, timeout_graceful_shutdown=10, **tls)  # type: ignore[arg-type]
    finally:
        built.close()
