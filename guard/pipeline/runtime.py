"""Wiring: builds the key manager, catalog and sanitizer from settings, with errors that say what to do."""

from __future__ import annotations

import redis
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from guard.classify.catalog import Catalog
from guard.config import Settings
from guard.errors import KeyUnavailableError
from guard.keys.kms import LocalKeyring
from guard.keys.manager import KeyManager
from guard.keys.store import RedisKeyStore
from guard.pipeline.policy import WriteChecker
from guard.pipeline.sanitizer import Sanitizer


def build_keys(settings: Settings, *, listen: bool = True, wait_s: float = 30.0, indexes: bool = True) -> KeyManager:
    """The key manager; waits up to `wait_s` for the key store (a worker may start during a Redis restart).

    `indexes=False` for anything that only opens images (an image-only reader): it never holds a blind-index key.
    """
    store = RedisKeyStore(settings.redis_url, settings.tenant,
                          password_file=settings.redis_password_file or None)
    try:
        for attempt in Retrying(stop=stop_after_delay(wait_s), wait=wait_exponential(multiplier=0.2, max=3),
                                retry=retry_if_exception_type(redis.RedisError), reraise=True):
            with attempt:
                store.client.ping()
    except redis.RedisError:
        raise KeyUnavailableError(
            f"the key store (Redis at {settings.redis_url}) does not answer: run `guard stack up` "
            "or point GUARD_REDIS_URL at your Redis"
        ) from None
    return KeyManager(
        LocalKeyring.from_environment(create=True),
        store,
        settings.tenant,
        cache_ttl=settings.key_cache_ttl,
        compaction_delay_s=settings.aof_compaction_delay_s,
        listen=listen,
        indexes=indexes,
    )


def build_catalog(settings: Settings) -> Catalog:
    return Catalog.load(settings.catalog or None)


def build_sanitizer(settings: Settings, keys: KeyManager | None = None, *, shared_alerts: bool = True) -> Sanitizer:
    keys = keys or build_keys(settings)
    registry = None
    if settings.schema_registry_url:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        registry = SchemaRegistryClient({"url": settings.schema_registry_url})
    sanitizer = Sanitizer(
        settings,
        keys,
        build_catalog(settings),
        registry=registry,
        alert_once=keys.store.alert_once if shared_alerts else None,
    )
    # Every write checked against the access policy (docs/policy.md); `policy = "off"` leaves it out.
    sanitizer.checker = WriteChecker.from_settings(settings, keys.store)
    return sanitizer
