"""`PolicyEngine`: Cedar decisions from a policy directory, validated, cached and reloaded in place.

A policy directory holds (docs/policy.md):

* `schema.cedarschema`: the entity model, the actions and the context of every request;
* `*.cedar`: the policies, every one with a unique `@id("...")` (a decision names the policies that made
  it by these ids; a policy without one is refused at load);
* `entities.json` (optional): organisations, roles, branches (owner, transfer state, cut-off), tables,
  field classes, staff and data subjects, in Cedar's JSON entity format.

Loading parses the schema, validates every policy and every entity against it and refuses the directory
on any error (`PolicyError`, naming the file). `maybe_reload` notices a change of the directory (file names,
sizes, modification times, then a content hash) and loads it; a directory that doesn't load is refused and
logged, and the running policy stays in force until a good one replaces it.

Default deny: a request no policy permits is denied, and so is one whose evaluation fails (an unknown
entity, a context that doesn't fit the schema). A decision names the policies that determined it
(`Decision.policies`: the permits of an allow, the forbids of a deny, none for a default deny) and the
evaluation errors.

Cedar has no clock: the time of a request is in its context. Decisions are cached per (principal,
action, resource, context bucket): the bucket is the context with its time rounded down to
`bucket_s` seconds, and the decision is computed at the bucket's start, so a cached decision is exactly
the one the engine would compute for any request of the bucket (a cut-off takes effect at bucket
precision). The cache is dropped whenever the policies or the entities change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cedarpy

from guard.errors import GuardError
from guard.policy.model import NAMESPACE, action_uid, cedar_datetime, entity_uid, ref

log = logging.getLogger("guard.policy")

SCHEMA_FILE = "schema.cedarschema"
ENTITIES_FILE = "entities.json"
POLICY_SUFFIX = ".cedar"

#: An entity as (type, id); the type without namespace is read in the BranchGuard namespace.
Uid = tuple[str, str]


class PolicyError(GuardError):
    """A policy directory that can't be used: unreadable, not valid against its schema, or ambiguous."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision: allowed or not, the policies (their `@id`s) that determined it, errors, and why."""

    allowed: bool
    policies: tuple[str, ...]
    errors: tuple[str, ...] = ()
    reason: str = ""

    @property
    def decision(self) -> str:
        """`allow` or `deny`."""
        return "allow" if self.allowed else "deny"

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "policies": list(self.policies), "errors": list(self.errors),
                "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Request:
    """One request: who (`principal`) does what (`action`) to what (`resource`), in which `context`.

    `context` holds plain values: `time` (datetime or unix seconds), `purpose`, `source`, `volume`, and
    optionally `field_class` (C1/C2/C3) and `fields` (names); the engine turns them into Cedar values.
    """

    principal: Uid
    action: str
    resource: Uid
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Loaded:
    """One loaded directory, never changed after load (a reload builds a new one)."""

    digest: str
    schema: Any
    policies: Any
    entity_docs: list[dict[str, Any]]
    ids: dict[str, str]
    files: tuple[str, ...]


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evaluations: int = 0
    invalidations: int = 0


def default_directory() -> Path:
    """`policy/` of the checkout (what `policy_dir` defaults to)."""
    return Path(__file__).resolve().parents[2] / "policy"


def parse_uid(text: str) -> Uid:
    """`Staff::"t0101"`, `BranchGuard::Staff::"t0101"` or `Staff:t0101` → ("Staff", "t0101")."""
    if '::"' in text and text.endswith('"'):
        kind, ident = text.split('::"', 1)
        return kind, ident[:-1]
    if ":" in text:
        kind, ident = text.rsplit(":", 1)
        return kind.rstrip(":"), ident
    raise PolicyError(f"entity {text!r}: expected Type::\"id\" (e.g. Staff::\"t0101\")")


class PolicyEngine:
    """Decides requests with the policies of one directory; safe to share between threads.

    `entity_source`, if given, returns more entity documents (e.g. staff from the branch database,
    `guard.policy.sources`); it is read at load and every `entity_refresh_s` by `maybe_reload`, and a
    change drops the cache like a policy change does. A request by a principal the entities don't hold
    reads the source again at once (at most every `unknown_refresh_s`), so a member of staff added to the
    branch database counts from their first request, not from the next periodic refresh.
    """

    def __init__(self, directory: str | Path, *, entity_source: Callable[[], list[dict[str, Any]]] | None = None,
                 bucket_s: float = 1.0, check_interval_s: float = 1.0, entity_refresh_s: float = 30.0,
                 unknown_refresh_s: float = 5.0, cache_size: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory)
        self.bucket_s = float(bucket_s)
        self.check_interval_s = check_interval_s
        self.entity_refresh_s = entity_refresh_s
        self.unknown_refresh_s = unknown_refresh_s
        self.cache_size = cache_size
        self.stats = CacheStats()
        #: Increases with every change of policies or entities (a cache or a template keyed on it expires).
        self.generation = 0
        #: Why the last reload was refused (None: the running policy is the directory's current content).
        self.last_error: str | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._entity_source = entity_source
        self._source_docs: list[dict[str, Any]] = []
        self._source_digest = ""
        self._added: dict[tuple[str, str], dict[str, Any]] = {}
        self._cache: dict[tuple[Any, ...], Decision] = {}
        self._checked = clock()
        self._entities_checked = clock()
        self._unknown_checked = float("-inf")
        #: The uids (namespaced type, id) the running entities define: who counts as known.
        self._known: frozenset[tuple[str, str]] = frozenset()
        self._fingerprint = _fingerprint(self.directory)
        self._refused: str | None = None
        if entity_source is not None:
            try:
                self._source_docs = entity_source()
            except Exception as exc:  # noqa: BLE001 - fail closed: without its staff, the policy denies them
                log.warning("policy entities could not be read from the source (%s); staff from it are "
                            "unknown (denied) until a refresh reads them", type(exc).__name__)
            self._source_digest = _digest_docs(self._source_docs)
        self._loaded = load_directory(self.directory)
        self._entities, self._known = self._build_entities(self._loaded)

    # --- what is loaded ----------------------------------------------------------------------------
    @property
    def digest(self) -> str:
        """SHA-256 of the running directory's files (names and contents)."""
        return self._loaded.digest

    @property
    def policy_ids(self) -> tuple[str, ...]:
        """The `@id`s of the running policies, in file order."""
        return tuple(self._loaded.ids.values())

    def knows(self, uid: Uid) -> bool:
        """Whether the running entities define `uid` (from the directory, the source or `add_entities`)."""
        return (uid[0] if "::" in uid[0] else f"{NAMESPACE}::{uid[0]}", uid[1]) in self._known

    # --- decisions ---------------------------------------------------------------------------------
    def decide(self, principal: Uid, action: str, resource: Uid, context: Mapping[str, Any] | None = None, *,
               entities: Sequence[Mapping[str, Any]] | None = None) -> Decision:
        """The decision on one request (cached unless `entities` adds request-specific entities)."""
        return self.decide_batch([Request(principal, action, resource, context or {})], entities=entities)[0]

    def decide_batch(self, requests: Sequence[Request], *,
                     entities: Sequence[Mapping[str, Any]] | None = None) -> list[Decision]:
        """The decisions on many requests: cached ones from the cache, the others in one Cedar call.

        Requests of the same cache key are evaluated once. `entities` (e.g. the data subject a reveal is
        about) are added to the entity set for these requests only, and their decisions are not cached.
        """
        loaded, ents, cache, gen = self._loaded, self._entities, self._cache, self.generation
        out: list[Decision | None] = [None] * len(requests)
        todo: dict[tuple[Any, ...], list[int]] = {}
        stats = self.stats
        for i, req in enumerate(requests):
            key = (req.principal, req.action, req.resource, self._bucket(req.context))
            if entities is None:
                hit = cache.get(key)
                if hit is not None:
                    out[i] = hit
                    stats.hits += 1
                    continue
            stats.misses += 1
            todo.setdefault(key, []).append(i)
        if todo and self._entity_source is not None and self._unknown_principal(todo):
            now = self._clock()
            if now - self._unknown_checked >= self.unknown_refresh_s:
                self._unknown_checked = now
                if self._refresh_source():  # a new member of staff: decide with the source's current rows
                    return self.decide_batch(requests, entities=entities)
        if todo:
            if entities:
                ents = ents.with_added_json_str(json.dumps(list(entities)), loaded.schema)
            keys = list(todo)
            cedar_requests = [_cedar_request(k) for k in keys]
            stats.evaluations += len(cedar_requests)
            results = cedarpy.is_authorized_batch(cedar_requests, loaded.policies, ents, loaded.schema)
            for k, result in zip(keys, results, strict=True):
                made = _decision(result, loaded.ids)
                if entities is None and gen == self.generation:
                    if len(cache) >= self.cache_size:
                        cache.clear()
                    cache[k] = made
                for i in todo[k]:
                    out[i] = made
        return out  # type: ignore[return-value]

    def _unknown_principal(self, todo: Mapping[tuple[Any, ...], list[int]]) -> bool:
        known = self._known
        return any(((kind if "::" in kind else f"{NAMESPACE}::{kind}"), ident) not in known
                   for (kind, ident), *_ in todo)

    def _bucket(self, ctx: Mapping[str, Any]) -> tuple[Any, ...]:
        """The context's cache bucket: its time rounded down to `bucket_s`, every other value as is."""
        when = ctx.get("time")
        if isinstance(when, datetime):
            when = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        stamp = None if when is None else (float(when) // self.bucket_s) * self.bucket_s
        rest = tuple(sorted((k, tuple(v) if isinstance(v, (list, set, tuple, frozenset)) else v)
                            for k, v in ctx.items() if k != "time"))
        return (stamp, rest)

    # --- changes -----------------------------------------------------------------------------------
    def add_entities(self, docs: Iterable[Mapping[str, Any]]) -> int:
        """Add entities the running set lacks (e.g. a table first seen on the stream); returns how many.

        Entities already present are left as they are; added ones are kept across reloads (a reloaded
        `entities.json` that defines the same entity wins). Drops the cache when something was added.
        """
        new = {(d["uid"]["type"], d["uid"]["id"]): dict(d) for d in docs}
        with self._lock:
            known = {(d["uid"]["type"], d["uid"]["id"]) for d in self._all_docs(self._loaded)}
            fresh = {k: v for k, v in new.items() if k not in known}
            if not fresh:
                return 0
            self._added.update(fresh)
            self._entities, self._known = self._build_entities(self._loaded)
            self._invalidate()
        return len(fresh)

    def maybe_reload(self, *, force: bool = False) -> bool:
        """Reload the directory if it changed (checked at most every `check_interval_s`), and the entity
        source every `entity_refresh_s`. True when the running policy or entities changed.

        A directory that fails to load is refused: logged once per content, `last_error` set, the running
        policy kept.
        """
        now = self._clock()
        changed = False
        if force or now - self._checked >= self.check_interval_s:
            self._checked = now
            print_ = _fingerprint(self.directory)
            if force or print_ != self._fingerprint:
                self._fingerprint = print_
                changed |= self._reload_directory()
        if self._entity_source is not None and (force or now - self._entities_checked >= self.entity_refresh_s):
            self._entities_checked = now
            changed |= self._refresh_source()
        return changed

    def reload(self) -> bool:
        """Load the directory now (same refusal rules as `maybe_reload`)."""
        return self.maybe_reload(force=True)

    def _reload_directory(self) -> bool:
        digest = directory_digest(self.directory)
        if digest == self._loaded.digest:
            self.last_error = None
            return False
        if digest == self._refused:
            return False
        try:
            loaded = load_directory(self.directory)
            entities, known = self._build_entities(loaded)
        except PolicyError as exc:
            self._refused = digest
            self.last_error = str(exc)
            log.error("policy reload refused, the running policy (%s) stays in force: %s",
                      self._loaded.digest[:12], exc)
            return False
        with self._lock:
            self._loaded, self._entities, self._known = loaded, entities, known
            self._refused = None
            self.last_error = None
            self._invalidate()
        log.info("policy reloaded from %s: %d policies, digest %s", self.directory, len(loaded.ids),
                 loaded.digest[:12])
        return True

    def _refresh_source(self) -> bool:
        assert self._entity_source is not None
        try:
            docs = self._entity_source()
        except Exception as exc:  # noqa: BLE001 - a database hiccup keeps the entities in force
            log.warning("policy entities not refreshed (%s); the loaded ones stay in force", type(exc).__name__)
            return False
        digest = _digest_docs(docs)
        if digest == self._source_digest:
            return False
        previous = self._source_docs
        self._source_docs = docs
        try:
            entities, known = self._build_entities(self._loaded)
        except PolicyError as exc:
            self._source_docs = previous
            log.error("policy entities from the source refused, the loaded ones stay in force: %s", exc)
            return False
        with self._lock:
            self._source_digest = digest
            self._entities, self._known = entities, known
            self._invalidate()
        log.info("policy entities refreshed from the source: %d entities", len(docs))
        return True

    def _invalidate(self) -> None:
        self.generation += 1
        self.stats.invalidations += 1
        self._cache = {}

    def _all_docs(self, loaded: _Loaded) -> list[dict[str, Any]]:
        """The directory's entities, then the source's, then added ones; the first definition of a uid wins."""
        seen: set[tuple[str, str]] = set()
        out = []
        for doc in (*loaded.entity_docs, *self._source_docs, *self._added.values()):
            uid = (doc["uid"]["type"], doc["uid"]["id"])
            if uid not in seen:
                seen.add(uid)
                out.append(doc)
        return out

    def _build_entities(self, loaded: _Loaded) -> tuple[Any, frozenset[tuple[str, str]]]:
        """Cedar entities of `loaded` with the source's and added ones, and the uids they define."""
        docs = self._all_docs(loaded)
        try:
            built = cedarpy.Entities.from_json_str(json.dumps(docs), loaded.schema)
        except ValueError as exc:
            raise PolicyError(f"entities do not fit the schema: {exc}") from None
        return built, frozenset((d["uid"]["type"], d["uid"]["id"]) for d in docs)


# --- loading -------------------------------------------------------------------------------------------
def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise PolicyError(f"policy directory {directory} does not exist")
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and (p.name in (SCHEMA_FILE, ENTITIES_FILE) or p.suffix == POLICY_SUFFIX))


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in _files(directory))
    except (OSError, PolicyError):
        return ()


def directory_digest(directory: Path) -> str:
    """SHA-256 over the policy directory's file names and contents (what `guard policy validate` prints)."""
    h = hashlib.sha256()
    try:
        for p in _files(directory):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    except (OSError, PolicyError):
        return "unreadable"
    return h.hexdigest()


def load_directory(directory: Path) -> _Loaded:
    """Parse and validate a policy directory; `PolicyError` names the first file that fails and why."""
    files = _files(directory)
    digest = directory_digest(directory)
    schema_path = directory / SCHEMA_FILE
    if not schema_path.is_file():
        raise PolicyError(f"{schema_path} is missing: policies are validated against it")
    try:
        schema = cedarpy.Schema.from_str(schema_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise PolicyError(f"{schema_path}: {exc}") from None
    texts = []
    ids: dict[str, str] = {}
    policy_files = [p for p in files if p.suffix == POLICY_SUFFIX]
    if not policy_files:
        raise PolicyError(f"{directory} has no *.cedar policy file")
    for path in policy_files:
        text = path.read_text(encoding="utf-8")
        try:
            est = json.loads(cedarpy.policies_to_json_str(text))
        except (ValueError, RuntimeError) as exc:
            raise PolicyError(f"{path}: {exc}") from None
        local: dict[str, str] = {}
        for kind in ("staticPolicies", "templates"):
            for pid, body in est.get(kind, {}).items():
                name = (body.get("annotations") or {}).get("id")
                if not name:
                    raise PolicyError(f"{path}: a policy ({pid} of the file, effect {body.get('effect')}) has no "
                                      "@id(\"...\"); every policy needs one, decisions name policies by it")
                if name in ids.values():
                    raise PolicyError(f"{path}: @id({name!r}) is used twice")
                ids[f"{len(ids)}"] = name
                local[pid] = name
        result = cedarpy.validate_policies(text, schema)
        if not result.validation_passed:
            raise PolicyError(f"{path}: not valid against {SCHEMA_FILE}: "
                              + "; ".join(_name_policies(e.error, local) for e in result.errors))
        texts.append(text)
    whole = "\n".join(texts)
    try:
        policies = cedarpy.PolicySet.from_str(whole)
    except ValueError as exc:
        raise PolicyError(f"{directory}: {exc}") from None
    # The parser numbers policies policy0, policy1, ... in text order: the same order as `ids`.
    ids = {f"policy{n}": name for n, name in enumerate(ids.values())}
    entity_docs: list[dict[str, Any]] = []
    entities_path = directory / ENTITIES_FILE
    if entities_path.is_file():
        try:
            entity_docs = json.loads(entities_path.read_text(encoding="utf-8"))
            cedarpy.Entities.from_json_str(json.dumps(entity_docs), schema)
        except (ValueError, OSError) as exc:
            raise PolicyError(f"{entities_path}: {exc}") from None
        if not isinstance(entity_docs, list):
            raise PolicyError(f"{entities_path}: expected a JSON list of entities")
    return _Loaded(digest, schema, policies, entity_docs, ids, tuple(p.name for p in files))


def validate_directory(directory: str | Path) -> list[str]:
    """Errors of a policy directory (empty: it loads), for `guard policy validate`."""
    try:
        load_directory(Path(directory))
    except PolicyError as exc:
        return [str(exc)]
    return []


# --- evaluation ----------------------------------------------------------------------------------------
def _cedar_request(key: tuple[Any, ...]) -> dict[str, Any]:
    principal, action, resource, (stamp, rest) = key
    ctx: dict[str, Any] = {}
    if stamp is not None:
        ctx["time"] = cedar_datetime(stamp)
    for name, value in rest:
        if name == "field_class" and isinstance(value, str):
            ctx[name] = ref("FieldClass", value)
        else:
            ctx[name] = list(value) if isinstance(value, tuple) else value
    return {"principal": entity_uid(*principal), "action": action_uid(action),
            "resource": entity_uid(*resource), "context": ctx}


def _decision(result: Any, ids: Mapping[str, str]) -> Decision:
    diag = result.diagnostics
    policies = tuple(ids.get(pid, pid) for pid in diag.reasons)
    errors = tuple(_name_policies(str(e), ids) for e in diag.errors)
    if result.allowed:
        reason = "permitted by " + ", ".join(policies)
    elif policies:
        reason = "forbidden by " + ", ".join(policies)
    elif errors:
        reason = "denied: the request could not be evaluated (default deny)"
    else:
        reason = "no policy permits it (default deny)"
    if errors and result.allowed:
        reason += f" ({len(errors)} policies failed to evaluate)"
    return Decision(result.allowed, policies, errors, reason)


def _name_policies(text: str, local: Mapping[str, str]) -> str:
    """A validator message with the file's positional policy ids (`policy0`) replaced by their `@id`s."""
    for pid in sorted(local, key=len, reverse=True):
        text = text.replace(f"`{pid}`", f"@id({local[pid]!r})")
    return text


def _digest_docs(docs: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()
