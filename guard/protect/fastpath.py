"""The optional compiled shortcut for ordinary change events (`native/`, importable as `guard_native`).

Why: the Python transform costs 60-100 µs per event on a small VM, nearly all of it interpreter
bookkeeping rather than cryptography. `guard_native.FastPath` does that bookkeeping in Rust for the common
event (create, read, update, delete of a row whose table plan the Python path has already built) and
declines everything else, which then takes the Python path unchanged: schema wrappers, truncates, logical
messages, drift, erased subjects, root-row deletes, anything malformed or read differently than orjson
would read it. It reads the record's JSON itself (no Python object per field), and `FastPath.run` takes
whole runs of a fetched batch, producing each record's sanitized and audit outputs through the runner's
producer (`Sanitizer.run_native`). It seals images itself, under the data key's native twin that the key
manager's cached `Aead` holds (`Aead.sealing_key`, a `guard_native.SealingKey`: OpenSSL's AES-256-GCM, the
key never handed back), looked up once per event in the key manager's own cache (`KeyManager.native_key_cache`,
the rule of `cached_subject_aead`, without a Python call). Blind-index tokens
(search columns, Kafka-key columns) and data-subject tokens are computed there too, under the same keys'
native twins (`BlindIndex.token_key`, a `guard_native.TokenKey`: keyed BLAKE2b, the key never handed back);
display masks of common shapes are computed there (`native/src/mask.rs`, property-tested against
`guard.protect.masking.mask`), other masks and keyed hashes by calls back into the same Python objects the
Python path uses. Both paths produce
the same bytes up to the random nonces (`tests/integration/test_native_path.py` checks this on generated events and
through the real runner, opening every natively sealed image).
Per batch, it also reads what the Python side needs of every record, so that Python works per distinct
value rather than per record: the policy pre-scan of a run (`scan_writes`) and the data subjects whose keys
a batch needs (`FastPath.batch_subjects`); and the runner's first pass over a fetched batch (`take_messages`).

`hot_path` (setting `GUARD_HOT_PATH`): `auto` uses the native path when it is installed, `native` refuses
to start without it, `python` never uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guard.errors import ConfigError

try:  # pragma: no cover - depends on whether the extension was built
    import guard_native as _native
except ImportError:  # pragma: no cover
    _native = None

HOT_PATHS = ("auto", "native", "python")


def native_available() -> bool:
    return _native is not None


def use_native(hot_path: str) -> bool:
    """Whether a sanitizer with this `hot_path` setting runs the native path (raises if it can't)."""
    if hot_path not in HOT_PATHS:
        raise ConfigError(f"hot_path must be one of {', '.join(HOT_PATHS)}, got {hot_path!r}")
    if hot_path == "python":
        return False
    if _native is None:
        if hot_path == "native":
            raise ConfigError("hot_path=native but the guard_native extension is not installed: "
                              "run `make venv` (needs cargo) or `pip install ./native`, or set GUARD_HOT_PATH=auto")
        return False
    return True


def scan_writes(records: list[Any], start: int, stop: int, skip_topic: str,
                decide: Callable[[str, str, bytes | None, int | None], bytes | None]) -> tuple[int, list[bytes | None]]:
    """The policy pre-scan of a native run in one call (`guard_native.scan_writes`, `native/src/scan.rs`):
    `(end, reasons)`, `decide` called once per distinct write (only when `use_native` said yes)."""
    if _native is None:
        raise ConfigError("the guard_native extension is not installed (check use_native first)")
    return _native.scan_writes(records, start, stop, skip_topic, decide)


def first_traced(records: list[Any], start: int, stop: int) -> int:
    """The index of the first of `records[start:stop]` whose message carries a `traceparent` header, or
    `stop` (`guard_native.first_traced`): where a native run must stop, the Python path carrying the trace
    context on. Other headers don't count (a live Debezium connector puts `__debezium.context.*` on every
    record; the untraced Python path carries none of them either)."""
    if _native is None:
        raise ConfigError("the guard_native extension is not installed (check use_native first)")
    return int(_native.first_traced(records, start, stop))


def take_messages(msgs: list[Any], start: int, good: list[Any], first: dict[Any, int], ends: dict[Any, int]) -> int:
    """The runner's first pass over a fetched batch from `msgs[start]` on, up to the first message with an
    error (`guard_native.take_messages`; only when `use_native` said yes)."""
    if _native is None:
        raise ConfigError("the guard_native extension is not installed (check use_native first)")
    return _native.take_messages(msgs, start, good, first, ends)


def new_fast_path(**callbacks: Any) -> Any:
    """A `guard_native.FastPath` (only call when `use_native` said yes)."""
    if _native is None:
        raise ConfigError("the guard_native extension is not installed (check use_native first)")
    return _native.FastPath(**callbacks)
