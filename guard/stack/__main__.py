"""``python -m guard.stack up|down|status|env|restart S|kill S|start S|connector|rotate R|provision|transactions``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from guard.stack import orchestrator
from guard.stack.connector import ENGINES, ensure_connector
from guard.stack.errors import StackError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m guard.stack", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start everything (idempotent), register the connector")
    sub.add_parser("down", help="stop everything, keep data")
    sub.add_parser("status", help="what runs")
    sub.add_parser("env", help="print GUARD_* settings as shell exports")
    for name in ("restart", "kill", "start"):
        sp = sub.add_parser(name, help=f"{name} one service")
        sp.add_argument("service", choices=orchestrator.SERVICES)
    sub.add_parser("connector", help="(re)register the Debezium connector only")
    rot = sub.add_parser("rotate", help="new passwords for redis (guard, admin) or postgres (branch_app, cdc), "
                                        "applied to the running stack")
    rot.add_argument("what", choices=orchestrator.ROTATABLE)
    cs = sub.add_parser("compose-secrets", help="docker-compose: CA, certificates, passwords, ACL and users files")
    cs.add_argument("home", help="the volume every compose service mounts (/stack)")
    tx = sub.add_parser("transactions", help="list hanging Kafka transactions (exit 4 if any); --abort aborts them")
    tx.add_argument("--abort", action="store_true", help="abort every hanging transaction found")
    tx.add_argument("--max-transaction-timeout", type=int, default=1, metavar="MINUTES",
                    help="only transactions open longer than this (minutes, default 1)")
    pv = sub.add_parser("provision", help="provision an external PostgreSQL + Connect (docker-compose)")
    pv.add_argument("--admin-dsn", default=os.environ.get("GUARD_PG_ADMIN_DSN", ""))
    pv.add_argument("--connect-url", default=os.environ.get("GUARD_CONNECT_URL", "http://connect:8083"))
    pv.add_argument("--db-host", default=os.environ.get("GUARD_CONNECTOR_DB_HOST", "postgres"))
    pv.add_argument("--db-port", type=int, default=int(os.environ.get("GUARD_CONNECTOR_DB_PORT", "5432")))
    pv.add_argument("--mariadb-admin-dsn", default=os.environ.get("GUARD_MARIADB_ADMIN_DSN", ""),
                    help="mysql://root:...@mariadb:3306/ of the MariaDB branch (docker-compose); empty: skip it")
    pv.add_argument("--kafka-bootstrap", default=os.environ.get("GUARD_KAFKA_BOOTSTRAP", "kafka:9092"),
                    help="the broker as Connect sees it (the MariaDB connector's schema history)")
    # --- Kafka security for docker-compose (issue 20, kafka part) ---
    ks = sub.add_parser("kafka-secrets", help="compose: make the Kafka CA, certificates and passwords in --dir")
    ks.add_argument("--dir", required=True, type=Path)
    ks.add_argument("--host", action="append", default=[], help="a name the brokers are reached by (repeat)")
    ks.add_argument("--owner", action="append", default=[], metavar="WHO=UID",
                    help="kafka|connect|guard=<uid>: the user of the container reading those files")
    ki = sub.add_parser("kafka-init", help="compose: create the Kafka SCRAM users and ACLs as admin (mTLS)")
    ki.add_argument("--dir", required=True, type=Path)
    ki.add_argument("--host", required=True)
    ki.add_argument("--port", type=int, default=9092)
    ki.add_argument("--internal-port", type=int, default=9094)
    # --- end of Kafka security for docker-compose ---
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            orchestrator.up()
        elif args.cmd == "down":
            orchestrator.down()
        elif args.cmd == "status":
            rows = orchestrator.status()
            for s in rows:
                print(f"{s.name:<32} {'running' if s.running else 'STOPPED':<8} {s.detail}")
            return 0 if all(s.running for s in rows) else 3
        elif args.cmd == "env":
            for k, v in orchestrator.env().items():
                print(f"export {k}={shlex.quote(v)}")  # DSNs and URLs carry '&': quoted for eval
        elif args.cmd == "compose-secrets":
            from guard.stack.compose import compose_secrets

            compose_secrets(Path(args.home))
        elif args.cmd == "rotate":
            orchestrator.rotate(args.what)
        elif args.cmd == "connector":
            for engine in ENGINES:
                ensure_connector(engine=engine)
        elif args.cmd == "transactions":
            return _transactions(args.abort, args.max_transaction_timeout)
        elif args.cmd == "kafka-secrets":
            from guard.stack.kafka_auth import compose_secrets as kafka_compose_secrets

            owners = {k: int(v) for k, _, v in (o.partition("=") for o in args.owner)}
            kafka_compose_secrets(args.dir, args.host, owners)
        elif args.cmd == "kafka-init":
            from guard.stack.kafka_auth import compose_init

            compose_init(args.dir, args.host, args.port, args.internal_port)
        elif args.cmd == "provision":
            if not args.admin_dsn:
                p.error("--admin-dsn (or GUARD_PG_ADMIN_DSN) is required")
            orchestrator.provision(args.admin_dsn, args.connect_url, args.db_host, args.db_port)
            if args.mariadb_admin_dsn:
                orchestrator.provision_mariadb_external(args.mariadb_admin_dsn, args.connect_url, args.kafka_bootstrap)
        else:
            getattr(orchestrator, args.cmd)(args.service)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _transactions(do_abort: bool, max_timeout_minutes: int) -> int:
    """One line per hanging transaction (and per abort); 0 when none (or all aborted), 4 when some hang."""
    from guard.stack import transactions
    from guard.stack.config import StackConfig

    cfg = StackConfig.from_env()
    hanging = transactions.find_hanging(cfg, max_timeout_minutes)
    if not hanging:
        print(f"no hanging transactions (open > {max_timeout_minutes} min, unknown to their coordinator)")
        return 0
    for h in hanging:
        print(f"{h.topic}-{h.partition}: hanging transaction of producer {h.producer_id} (epoch "
              f"{h.producer_epoch}) from offset {h.start_offset}, last write at {h.last_timestamp_ms} ms")
        if do_abort:
            transactions.abort(cfg, h.topic, h.partition, h.start_offset)
            print(f"{h.topic}-{h.partition}: aborted the transaction from offset {h.start_offset}")
    return 0 if do_abort else 4


if __name__ == "__main__":
    sys.exit(main())
