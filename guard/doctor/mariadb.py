"""The MariaDB branch (issue 19): its binlog settings and the CDC account's grants."""

from __future__ import annotations

import re
import stat

from guard.classify.source import ATTRIBUTION_DATABASE, ATTRIBUTION_TABLE
from guard.config import Settings, mariadb_connect_args
from guard.doctor.check import Check

#: What the CDC account may hold and what it must: Debezium's MariaDB connector's needs (guard/stack/provision.py).
MARIADB_CDC_GLOBAL = frozenset({"RELOAD", "REPLICATION SLAVE", "BINLOG MONITOR"})
#: The binlog Debezium needs: ROW events with whole row images.
MARIADB_BINLOG = {"log_bin": "1", "binlog_format": "ROW", "binlog_row_image": "FULL"}


def check_mariadb(settings: Settings) -> list[Check]:
    """The second branch's MariaDB: reachable and authenticated (the DSN's account), anonymous and password-less
    logins refused, the binlog as Debezium needs it, and the CDC account (when its password file is set) with
    exactly its least privileges."""
    import pymysql

    try:
        args = mariadb_connect_args(settings.branch2_dsn)
    except OSError as exc:
        return [Check("mariadb", False, f"cannot read the password file of GUARD_BRANCH2_DSN ({exc.strerror})",
                      "fix password_file in GUARD_BRANCH2_DSN (local stack: `guard stack env`)")]
    host, port = args["host"], args["port"]
    where = f"{host}:{port}"
    tls = {k: v for k, v in args.items() if k.startswith("ssl_")}
    common = {"host": host, "port": port, "connect_timeout": 5, **tls}
    try:
        conn = pymysql.connect(**args, connect_timeout=5)
    except pymysql.err.OperationalError as exc:
        code = exc.args[0] if exc.args else 0
        if code in (1045, 1698):
            return [Check("mariadb", False, f"{where} refused the account of GUARD_BRANCH2_DSN (error {code})",
                          "check the user and password in GUARD_BRANCH2_DSN (local stack: `guard stack env`)")]
        return [Check("mariadb", False, f"{where} does not answer (error {code})",
                      "start it (`guard stack up` locally) or fix GUARD_BRANCH2_DSN")]
    out = [Check("mariadb", True, f"{where} answers and authenticated the account of GUARD_BRANCH2_DSN")]
    with conn, conn.cursor() as cur:
        cur.execute("SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@server_id, @@bind_address")
        row = cur.fetchone()
    assert row is not None
    seen = dict(zip(("log_bin", "binlog_format", "binlog_row_image"), (str(v) for v in row[:3]), strict=True))
    wrong = {k: v for k, v in seen.items() if v != MARIADB_BINLOG[k]}
    if wrong or not row[3]:
        out.append(Check("mariadb binlog", False, ", ".join(f"{k}={v} (need {MARIADB_BINLOG[k]})"
                                                            for k, v in wrong.items()) or "server_id is 0",
                         "set log-bin, binlog_format=ROW, binlog_row_image=FULL and a server_id (see "
                         "guard/stack/assets/mariadb.cnf) and restart MariaDB"))
    else:
        out.append(Check("mariadb binlog", True, f"ROW, full row images, server_id {row[3]}, listening on {row[4]}"))
    refused = []
    for user in ("", "root", args["user"]):
        try:
            pymysql.connect(user=user, password="", **common).close()
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] in (1045, 1698):
                refused.append(user or "anonymous")
                continue
            raise
        out.append(Check("mariadb logins", False, f"{where} let {user or 'an anonymous user'} in without a password",
                         f"DROP USER (or set a password for) {user or 'the anonymous account'!r}"))
    if len(refused) == 3:
        out.append(Check("mariadb logins", True, "anonymous, root and password-less logins refused over TCP"
                                                  + (" (with TLS)" if tls else "")))
    if tls:
        try:
            pymysql.connect(host=host, port=port, user=args["user"], password=args["password"],
                            connect_timeout=5, ssl_disabled=True).close()
            out.append(Check("mariadb tls", False, f"{where} let {args['user']} in without TLS",
                             "set require_secure_transport = ON (guard/stack/assets/mariadb.cnf) and REQUIRE SSL "
                             "on the accounts"))
        except pymysql.err.OperationalError:
            out.append(Check("mariadb tls", True, "TCP logins without TLS refused; the server's certificate "
                                                  "verifies against the CA of GUARD_BRANCH2_DSN"))
    if settings.branch2_cdc_password_file:
        out.append(_check_mariadb_cdc(settings, common))
    return out


def _check_mariadb_cdc(settings: Settings, common: dict[str, object]) -> Check:
    from pathlib import Path

    import pymysql

    path = Path(settings.branch2_cdc_password_file)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        return Check("mariadb cdc account", False, f"cannot read {path} ({exc.strerror})",
                     "set GUARD_BRANCH2_CDC_PASSWORD_FILE to the CDC account's password file")
    if mode & 0o077:
        return Check("mariadb cdc account", False, f"{path} has mode {mode:04o}", f"chmod 600 {path}")
    try:
        conn = pymysql.connect(user="cdc", password=password, **common)
    except pymysql.err.OperationalError as exc:
        return Check("mariadb cdc account", False, f"login refused (error {exc.args[0] if exc.args else '?'})",
                     "re-provision the account (`guard stack up` locally)")
    with conn, conn.cursor() as cur:
        cur.execute("SHOW GRANTS FOR CURRENT_USER()")
        grants = [str(r[0]) for r in cur.fetchall()]
    database = mariadb_connect_args(settings.branch2_dsn).get("database") or ""
    problems, global_privs, objects = cdc_grant_problems(grants, database)
    if problems:
        return Check("mariadb cdc account", False, "; ".join(problems),
                     f"grant exactly RELOAD, REPLICATION SLAVE, BINLOG MONITOR ON *.*, SELECT on `{database}`.* and "
                     f"on {ATTRIBUTION_OBJECT}, no role and no grant option (guard/stack/provision.py)")
    return Check("mariadb cdc account", True, f"password file 0600, least privilege: {', '.join(sorted(global_privs))}"
                                              f" on *.*, SELECT on {', '.join(sorted(objects))}")


#: The one object outside the branch database the CDC account reads: the guard's attribution table.
ATTRIBUTION_OBJECT = f"`{ATTRIBUTION_DATABASE}`.`{ATTRIBUTION_TABLE}`"


def cdc_grant_problems(grants: list[str], database: str) -> tuple[list[str], set[str], set[str]]:
    """What is wrong with the CDC account's `SHOW GRANTS` lines against its least privilege, and (global
    privileges, objects it may SELECT). Least privilege: RELOAD, REPLICATION SLAVE and BINLOG MONITOR on
    `*.*`, SELECT on the branch database and on the attribution table, nothing else: no other database
    (`mysql.*` holds every account's password hash), no grant option, no role (a role's privileges are not
    in these lines), no proxy grant."""
    allowed = {f"`{database}`.*", ATTRIBUTION_OBJECT}
    global_privs: set[str] = set()
    objects: dict[str, str] = {}
    problems: list[str] = []
    for grant in grants:
        if "WITH GRANT OPTION" in grant.upper():
            problems.append(f"may grant its privileges on: {grant.split(' TO ', 1)[0]}")
        m = re.match(r"GRANT (.+?) ON (\S+) TO", grant)
        if m is None:
            problems.append(f"a grant that is not a privilege on an object (a role or a proxy): "
                            f"{grant.split(' TO ', 1)[0]}")
        elif m.group(2) == "*.*":
            global_privs |= {p.strip() for p in m.group(1).split(",")}
        elif m.group(2).upper().startswith("PROXY"):
            problems.append(f"a proxy grant: {m.group(2)}")
        else:
            objects[m.group(2)] = m.group(1)
    extra = global_privs - MARIADB_CDC_GLOBAL - {"USAGE"}
    missing = MARIADB_CDC_GLOBAL - global_privs
    wide = sorted(o for o, privs in objects.items() if privs.strip() != "SELECT")
    elsewhere = sorted(set(objects) - allowed)
    problems += [p for p in (f"extra global privileges {sorted(extra)}" if extra else "",
                             f"missing {sorted(missing)}" if missing else "",
                             f"more than SELECT on {wide}" if wide else "",
                             f"SELECT outside the branch database and the attribution table: {elsewhere}"
                             if elsewhere else "",
                             f"no SELECT on `{database}`.*" if f"`{database}`.*" not in objects else "") if p]
    return problems, global_privs, set(objects)
