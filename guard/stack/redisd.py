"""Redis from Debian on a private port, config and AOF under the stack home.

Named ``redisd`` so it never shadows the ``redis`` client package. Redis is the guard's durable key
store, hence ``appendonly yes`` + ``appendfsync always`` (see assets/redis.conf for the reasoning).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from guard.stack.assets import render_asset, write_if_changed
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.service import Service


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

    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        write_if_changed(self.conf, render_asset(
            "redis.conf", host=self.cfg.host, port=self.cfg.redis_port, pidfile=self.dir / "redis-server.pid",
            log_file=self.cfg.logs / "redis.log", data_dir=self.dir / "data"), 0o600)

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(exe).exists():
            raise StackError("redis-server is not installed; run scripts/setup.sh "
                             "(apt-get install redis-server).")
        return [exe, str(self.conf)]

    def ready(self) -> bool:
        import redis

        client = redis.Redis(host=self.cfg.host, port=self.cfg.redis_port, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
