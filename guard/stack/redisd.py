"""Redis from Debian on a private port, config and AOF under the stack home.

Named ``redisd`` so it never shadows the ``redis`` client package. Redis is the guard's durable key
store, hence ``appendonly yes`` + ``appendfsync always`` (see assets/redis.conf for the reasoning).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import progress
from guard.stack.secrets import REDIS_ADMIN_USER, REDIS_GUARD_USER, StackSecrets, sha256_hex
from guard.stack.service import Service
from guard.stack.tls import ensure_server_cert

#: What the guard's Redis user may run: everything of its own keys except the dangerous and admin
#: commands, and explicitly never FLUSHALL, FLUSHDB, CONFIG, DEBUG, KEYS or SHUTDOWN. Re-added on purpose:
#: BGREWRITEAOF, because an erasure must purge the destroyed key from the append-only file too
#: (guard/keys/store.py `compact`); it rewrites the file, it reads and deletes nothing. INFO, because
#: `compact` must see that rewrite start and complete (`aof_rewrite_in_progress`, `aof_rewrites`,
#: `aof_last_bgrewrite_status`): it reports server state and counts, no key name or value. The guard uses
#: GET/SET/EXISTS/DEL, hashes, sets, sorted sets, EVALSHA/SCRIPT LOAD (its Lua scripts, whose commands are
#: checked against the same rules), MULTI/EXEC, PUBLISH/SUBSCRIBE (cache invalidation) and SCAN (only
#: `guard bench`'s clean-up: SCAN lists key *names* of every tenant, never values).
GUARD_COMMANDS = ("+@all -@dangerous -@admin -flushall -flushdb -config -debug -keys -shutdown "
                  "-acl +acl|whoami +bgrewriteaof +info +scan")


#: Kinds of key-store keys of the layout before issue 20 (`bg:<kind>:...`), besides the tenant keys
#: (`bg:tkey:<tenant>:<purpose>`), and its single keys (`bg:<name>`): guard/keys/store.py's layout.
OLD_KINDS = ("kek", "dek", "erased", "hold", "storage-only", "topics", "expiry", "alerted", "erasure-due",
             "erasure-due-info", "pending", "ckeys", "ckey-owner")
OLD_SINGLETONS = ("erasure-epoch", "compact-due")


def stack_tenants() -> list[str]:
    """Tenants whose keys the stack's `guard` user may touch: GUARD_TENANT (default demo-bank)."""
    return [t for t in (os.environ.get("GUARD_TENANT") or "demo-bank").split(",") if t]


def acl_text(guard_hashes: list[str], admin_hashes: list[str], tenants: list[str]) -> str:
    """The ACL file: default user off, `admin` with everything, `guard` limited (see GUARD_COMMANDS).

    The default user is `off` with no password (`resetpass`, not `nopass`): no connection can ever log in as
    it, so a client without credentials gets NOAUTH. Its *rules* are nevertheless `~* &* +@all`, because
    Redis 7.0 replays the append-only file with a client that runs as the default user and checks the
    commands of each MULTI/EXEC against that user's rules at EXEC: with `-@all`, every transaction and every
    multi-command Lua script in the AOF (key creation, shred, the tenant keys) is refused on restart
    ("NOPERM ACLs rules changed ...") and its keys are silently lost. Measured on the Debian 7.0.15 server:
    `-@all` lost both a MULTI/EXEC and a two-SET EVAL across a SIGKILL; these rules kept both.
    """
    from guard.keys.store import tenant_prefix

    keys = " ".join(f"~{tenant_prefix(t)}*" for t in tenants)
    channels = " ".join(f"&{tenant_prefix(t)}*" for t in tenants)
    return (f"user default off resetpass resetkeys resetchannels ~* &* +@all\n"
            f"user {REDIS_ADMIN_USER} on {' '.join('#' + h for h in admin_hashes)} ~* &* +@all\n"
            f"user {REDIS_GUARD_USER} on {' '.join('#' + h for h in guard_hashes)} resetkeys {keys} "
            f"resetchannels {channels} {GUARD_COMMANDS}\n")


class Redis(Service):
    name = "redis"
    port_env = "GUARD_REDIS_PORT"
    ready_timeout = 30.0

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__(cfg)
        self.dir = cfg.home / "redis"

    @property
    def port(self) -> int:
        return self.cfg.redis_port

    @property
    def conf(self) -> Path:
        return self.dir / "redis.conf"

    @property
    def marker(self) -> str:
        # redis-server rewrites its argv to "redis-server 127.0.0.1:16379", so the port is the marker
        return f"{self.cfg.host}:{self.cfg.redis_port}"

    @property
    def aclfile(self) -> Path:
        return self.dir / "users.acl"

    def write_acl(self, also: dict[str, str] | None = None) -> None:
        """Render the ACL file from the current passwords, plus ``also`` (user → password) during a rotation."""
        sec = StackSecrets(self.cfg)
        also = also or {}
        guard = [sha256_hex(sec.password("redis-guard"))]
        admin = [sha256_hex(sec.password("redis-admin"))]
        guard += [sha256_hex(also[REDIS_GUARD_USER])] if REDIS_GUARD_USER in also else []
        admin += [sha256_hex(also[REDIS_ADMIN_USER])] if REDIS_ADMIN_USER in also else []
        write_if_changed(self.aclfile, acl_text(guard, admin, stack_tenants()), 0o600)

    @property
    def acl_loaded(self) -> Path:
        """What the running Redis held after the stack last set its ACL (`remember_acl`)."""
        return self.dir / "users.acl.loaded"

    def reload_acl(self) -> None:
        """Write the ACL file and have the running Redis load it (a Redis started with an older file, e.g.
        before the guard's user got a command it now needs, gets the current rules without a restart).

        Only when the file or the live rules differ from what the stack last set (`acl_loaded`): on Redis 7.0
        (Debian's) `ACL LOAD` closes every client's connection, the guard's workers' included, so an `up` of a
        running stack whose rules already hold (the usual case) leaves them connected. Rules changed by hand
        (`ACL SETUSER`) differ from what was set, and are replaced by the file's.
        """
        import redis

        self.write_acl()
        if self.acl_loaded.exists() and self.acl_loaded.read_text(encoding="utf-8") == self._acl_state():
            return
        for attempt in (1, 2):
            client = self.admin_client(socket_timeout=10)
            try:
                client.execute_command("ACL", "LOAD")
                break
            except redis.ConnectionError:
                # Redis 7.0 closes every connection on a load, this one included, at times before its reply
                # is written: the load most likely happened; a second one on a new connection makes sure.
                if attempt == 2:
                    break
            finally:
                client.close()
        write_if_changed(self.acl_loaded, self._acl_state(), 0o600)

    def remember_acl(self) -> None:
        """Note the live rules as the stack's own (after it changed them with `ACL SETUSER`: a rotation)."""
        write_if_changed(self.acl_loaded, self._acl_state(), 0o600)

    def _acl_state(self) -> str:
        """The ACL file's digest and the live rules (`ACL LIST`, sorted: Redis lists users in hash order), read
        on a connection of its own (a load closes the ones open before it)."""
        client = self.admin_client(socket_timeout=10)
        try:
            live = sorted(line.decode() if isinstance(line, bytes) else str(line)
                          for line in client.execute_command("ACL", "LIST"))
        finally:
            client.close()
        return "\n".join([sha256_hex(self.aclfile.read_text(encoding="utf-8")), *live]) + "\n"

    def secured(self) -> bool:
        """False for a Redis rendered before issue 20 (plaintext port, default user): `up` restarts it."""
        return self.conf.exists() and "aclfile" in self.conf.read_text(encoding="utf-8")

    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        crt, key = ensure_server_cert(self.cfg.home, "redis")
        self.write_acl()
        write_if_changed(self.conf, render_asset(
            "redis.conf", host=self.cfg.host, port=self.cfg.redis_port, pidfile=self.dir / "redis-server.pid",
            log_file=self.cfg.logs / "redis.log", data_dir=self.dir / "data", tls_cert=crt, tls_key=key,
            tls_ca=self.cfg.ca_file, aclfile=self.aclfile), 0o600)

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(exe).exists():
            raise StackError("redis-server is not installed; run scripts/setup.sh "
                             "(apt-get install redis-server).")
        return [exe, str(self.conf)]

    def admin_client(self, **kwargs: Any) -> Any:
        """The `admin` ACL user over TLS (stack operations only: migration, rotation, tests' negative checks).

        The key store is verified against the stack's CA alone, as the guard's own client does
        (`guard.keys.redis_tls`): redis-py's TLS connection would trust the system's public CAs beside it."""
        import redis

        from guard.keys.redis_tls import PinnedSSLConnection

        pool = redis.ConnectionPool(connection_class=PinnedSSLConnection, host=self.cfg.host,
                                    port=self.cfg.redis_port, ssl_ca_certs=str(self.cfg.ca_file),
                                    ssl_cert_reqs="required", username=REDIS_ADMIN_USER,
                                    password=StackSecrets(self.cfg).password("redis-admin"), **kwargs)
        return redis.Redis(connection_pool=pool)

    def ready(self) -> bool:
        client = self.admin_client(socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def migrate_keys(self) -> int:
        """Move keys of the layout before issue 20 (`bg:kek:<branch>`, `bg:tkey:<tenant>:<p>`, ...) under the
        tenant prefix `bg:<tenant>:`, registering the tenant keys and branches found; returns keys moved.

        The old layout had no tenant in most names; they belong to the stack's tenant (GUARD_TENANT,
        default demo-bank). Every kind of the old layout is covered, the erasure keys of issue 13 included
        (`pending`, `erasure-due`, `ckeys`, the counters `erasure-epoch` and `compact-due`, ...). A key whose
        new name is already taken is not overwritten (RENAMENX): it is left under its old name and named in
        the progress line, so nothing is lost silently. Idempotent: a store without old keys is left alone.
        """
        import redis

        from guard.keys.store import tenant_prefix

        tenant = stack_tenants()[0]
        new = tenant_prefix(tenant)
        client = self.admin_client(socket_timeout=10)
        moved = 0
        kept: list[str] = []
        try:
            for kind in ("tkey", *OLD_KINDS):
                for raw in list(client.scan_iter(match=f"bg:{kind}:*", count=1000)):
                    old = raw.decode()
                    rest = old[len(f"bg:{kind}:"):]
                    if kind == "tkey":
                        owner, _, purpose = rest.rpartition(":")
                        target = f"{tenant_prefix(owner)}tkey:{purpose}"
                        client.hset(f"{tenant_prefix(owner)}tenant", purpose, 0)
                    else:
                        target = f"{new}{kind}:{rest}"
                        if kind == "kek":
                            client.sadd(f"{new}branches", rest)
                    moved, kept = self._move(client, redis, old, target, moved, kept)
            for name in OLD_SINGLETONS:
                if client.exists(f"bg:{name}"):
                    moved, kept = self._move(client, redis, f"bg:{name}", f"{new}{name}", moved, kept)
        finally:
            client.close()
        if moved:
            progress(f"redis: moved {moved} key-store keys of the layout before issue 20 under the tenant "
                     f"prefix {new} (tenant keys, branch keys and data keys are kept)")
        if kept:
            progress(f"redis: {len(kept)} key(s) of the old layout left in place because their new name already "
                     f"exists (compare and remove them with the admin user): {', '.join(kept[:10])}"
                     + (" ..." if len(kept) > 10 else ""))
        return moved

    @staticmethod
    def _move(client: Any, redis: Any, old: str, target: str, moved: int, kept: list[str]) -> tuple[int, list[str]]:
        try:
            if client.renamenx(old, target):
                return moved + 1, kept
        except redis.ResponseError:  # expired between SCAN and RENAMENX (alert deduplication keys have a TTL)
            return moved, kept
        return moved, [*kept, old]
