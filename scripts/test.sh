#!/usr/bin/env bash
# The whole test suite: format check, clippy with warnings as errors, the code's documentation
# (private items too: it is written for the engineers) with broken links as errors, every test, then the
# client compatibility suite (scripts/clients.sh: redis-py, node-redis, ioredis against the proxy).
# Installs redis-server when it is missing (the integration tests start real servers).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --quiet
cargo test --all-targets
# Last: the Redis client libraries people install today, against the built proxy
# (docs/clients.md).
scripts/clients.sh
# The dashboard in headless Chromium (installs chromium when missing).
scripts/browser-test.sh
# deploy/: Grafana dashboard and alert rules against a real scrape, promtool, Kubernetes schemas.
scripts/deploy-check.sh
