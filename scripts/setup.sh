#!/usr/bin/env bash
# BranchGuard local-stack prerequisites (Debian 12 / bookworm). Idempotent: re-running is a no-op
# when everything is already installed.
#
# Installs:  PostgreSQL 15 (demo branch database 0101), MariaDB 10.11 (demo branch database 0202),
#            redis-server (durable key store / windows),
#            OpenJDK 17 (Kafka 4.x broker + Connect need Java >= 17), Maven (fetches Kafka/Debezium jars
#            from Maven Central), python3-venv (the guard's virtualenv), gcc and libc6-dev (Rust links
#            the compiled hot path with the C toolchain and builds its allocator, mimalloc, from C),
#            libssl-dev and pkg-config (the compiled hot path seals with OpenSSL's AES-256-GCM through the
#            `openssl` crate, which finds the system's libssl with pkg-config).
# It does NOT start any service system-wide: `guard stack up` runs its own private PostgreSQL cluster,
# MariaDB server and Redis on non-default ports under ${GUARD_STACK_HOME:-~/.local/share/branchguard}; the Debian
# default services are stopped/disabled where systemd is present so they don't hold ports/memory.
#
# Usage: scripts/setup.sh [--with-venv]     (--with-venv also creates .venv and installs '.[test]')
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup.sh: not root and sudo is missing; run as root or install sudo" >&2; exit 1; fi
fi

# acl: setfacl lets the `postgres` and `mysql` OS users traverse a root-owned stack home (e.g. /root is 0700)
# mariadb-server (10.11) + mariadb-client: the second branch database (branch 0202), run privately by the stack
# chromium: the status page's test renders it headless and saves a screenshot (tests/integration/test_anomaly_oncall.py)
PKGS=(postgresql-15 postgresql-client-15 redis-server openjdk-17-jdk-headless maven python3-venv ca-certificates curl acl
      gcc libc6-dev libssl-dev pkg-config mariadb-server mariadb-client chromium)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  # policy-rc.d-free containers may try to start services during install; that's harmless here.
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup.sh: all Debian packages already installed"
fi

# The Debian packages enable system services on default ports (5432, 6379). The stack does not use
# them; stop them if systemd manages them, so they don't compete for the 2 cores / memory.
if [ -d /run/systemd/system ]; then
  for svc in redis-server postgresql mariadb; do
    if systemctl is-enabled --quiet "$svc" 2>/dev/null; then
      $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
fi

# Sanity checks: the binaries the stack calls.
PG_BIN=/usr/lib/postgresql/15/bin
for b in "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$PG_BIN/postgres" /usr/bin/redis-server /usr/sbin/runuser java mvn \
         /usr/sbin/mariadbd /usr/bin/mariadb-install-db /usr/bin/mariadb; do
  command -v "$b" >/dev/null 2>&1 || { echo "setup.sh: missing $b after install" >&2; exit 1; }
done
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
if [ "${java_major:-0}" -lt 17 ]; then
  echo "setup.sh: Java $java_major found; Kafka 4.x needs Java 17+ (update-alternatives --config java)" >&2
  exit 1
fi

if [ "${1:-}" = "--with-venv" ]; then
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  [ -x "$repo/.venv/bin/python" ] || python3 -m venv "$repo/.venv"
  "$repo/.venv/bin/pip" install -q -e "$repo[test]"
fi

echo "setup.sh: OK (next: python -m guard.stack up)"
