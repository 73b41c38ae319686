#!/usr/bin/env bash
# The project's static checks, run by `make lint` and first by `make test` (so CI, `.ci/run`, fails on them
# before it starts the stack): ruff and mypy on the Python packages; rustfmt, clippy (warnings are errors) and
# the crate's own unit tests on native/, the compiled hot path.
#
# Usage: scripts/lint.sh VENV
#
# Without cargo (a machine where scripts/build-native.sh also skipped the compiled path) the Rust checks are
# skipped with a line that says so; everything else always runs. Cargo uses build-native.sh's build cache, so
# the crate's dependencies compiled for the extension are not compiled again.
set -euo pipefail
VENV=${1:?usage: scripts/lint.sh VENV}
cd "$(dirname "$0")/.."

"$VENV/bin/ruff" check guard streams tests
"$VENV/bin/mypy"

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
  echo "lint.sh: cargo not found: rustfmt, clippy and the native crate's tests skipped (install Rust, https://rustup.rs)"
  exit 0
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/branchguard/native-target}"
cd native
cargo fmt --check
cargo clippy --quiet --release -- -D warnings
cargo test --quiet --release --lib
