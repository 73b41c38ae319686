#!/usr/bin/env bash
# Build and install the guard's compiled hot path (native/, module guard_native) into a virtualenv.
#
# Usage: scripts/build-native.sh VENV
#
# Needs a Rust toolchain (cargo >= 1.85, the oldest the locked crates build with; https://rustup.rs), a C
# compiler, and OpenSSL's headers found by pkg-config (Debian: libssl-dev, pkg-config). Rust crates come from
# crates.io and maturin from PyPI.
# Without cargo or OpenSSL's headers (or with NATIVE=0) it says so in one line, removes any earlier build
# so a stale one can't run, and succeeds: the guard then runs its pure-Python path (GUARD_HOT_PATH=auto; same output,
# 2-3x slower per event; see docs/benchmark.md).
set -euo pipefail
VENV=${1:?usage: scripts/build-native.sh VENV}
cd "$(dirname "$0")/.."

if [ "${NATIVE:-1}" = "0" ]; then
  echo "build-native.sh: NATIVE=0, skipping the compiled hot path (the guard uses its Python path)"
  "$VENV/bin/pip" uninstall --quiet -y branchguard-native 2>/dev/null || true
  exit 0
fi
VENV=$(cd "$VENV" && pwd)
# maturin's build backend runs the `maturin` program it installs into the venv, so the venv's bin goes
# on PATH (make calls this without an activated venv), and rustup's cargo after it.
export PATH="$VENV/bin:$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
  echo "build-native.sh: cargo not found: the guard runs its pure-Python path (same output, slower); install Rust (https://rustup.rs) and run \`bash scripts/build-native.sh $VENV\` for the compiled one"
  "$VENV/bin/pip" uninstall --quiet -y branchguard-native 2>/dev/null || true
  exit 0
fi
# Sealing in the compiled path uses OpenSSL through the `openssl` crate, which finds the system's libssl with
# pkg-config (Debian: libssl-dev, pkg-config; scripts/setup.sh installs both).
if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists openssl; then
  echo "build-native.sh: OpenSSL's headers not found (pkg-config openssl): the guard runs its pure-Python path (same output, slower); install libssl-dev and pkg-config (scripts/setup.sh does) and run \`bash scripts/build-native.sh $VENV\` for the compiled one"
  "$VENV/bin/pip" uninstall --quiet -y branchguard-native 2>/dev/null || true
  exit 0
fi
# Compiled crates are kept next to the stack's other downloads (as pip keeps its wheels), so a fresh
# clone rebuilds only the extension itself, not pyo3 and the other dependencies (~2 min on a slow machine).
# Cargo's fingerprints decide what is stale; CARGO_TARGET_DIR set by the caller wins.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/branchguard/native-target}"
echo "build-native.sh: building native/ with $(cargo --version) (build cache $CARGO_TARGET_DIR)"
"$VENV/bin/pip" install --quiet 'maturin>=1.8,<2'
"$VENV/bin/pip" install --quiet --no-build-isolation ./native
"$VENV/bin/python" -c "import guard_native; print('build-native.sh: guard_native installed')"
