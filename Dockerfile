# BranchGuard guard image (used by the `guard` service in docker-compose.yml).
# The local stack (`guard stack up`) does not need Docker; this is for users who prefer containers.

# The compiled hot path (native/, see guard/protect/fastpath.py), built as an abi3 wheel in the Rust image; the
# guard image itself carries no compiler.
FROM rust:1-slim-bookworm AS native
# libssl-dev + pkg-config: the extension seals with OpenSSL (the `openssl` crate links the system's libssl;
# the guard image's Debian base has libssl3).
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/maturin && /opt/maturin/bin/pip install --no-cache-dir 'maturin>=1.8,<2'
WORKDIR /src
COPY native ./native
RUN /opt/maturin/bin/maturin build --release --compatibility linux -i python3 -m native/Cargo.toml -o /wheels

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GUARD_CONNECTORS_DIR=/app/connectors \
    GUARD_SCHEMAS_DIR=/app/schemas \
    GUARD_CATALOG=/app/schemas/catalog.toml

WORKDIR /app
# dependencies first, so code edits don't invalidate the (slow) dependency layer
COPY pyproject.toml README.md ./
RUN mkdir -p guard streams && touch guard/__init__.py streams/__init__.py \
    && pip install . && pip uninstall -y branchguard
COPY guard ./guard
COPY streams ./streams
COPY schemas ./schemas
COPY connectors ./connectors
COPY --from=native /wheels /wheels
RUN pip install --no-deps . /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /app guard \
    && mkdir -p /keys && chown guard /keys
USER guard

# Provision the branch database and register the Debezium connector (idempotent), then run CMD.
ENTRYPOINT ["sh", "-c", "python -m guard.stack provision && exec \"$@\"", "--"]
CMD ["guard", "--help"]
