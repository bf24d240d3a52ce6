# tallyproxy container image: a release build on Debian bookworm, run as an unprivileged user.
#
#   docker build -t tallyproxy .
#   docker compose up -d          # with the two Redis shards; see docker-compose.yml
#
# Operations (config, metrics, shutdown, sizing): docs/operations.md.

# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# 1. Dependencies only, against a dummy crate, so that this (slow) layer is reused for as long
#    as Cargo.toml and Cargo.lock do not change. The crate has a library (src/lib.rs) and a
#    binary (src/main.rs); both are stubbed.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# 2. The real sources. Docker keeps the files' modification times from the build context,
#    which can be older than the stub build above; touch the crate roots so that cargo's
#    mtime-based fingerprint always rebuilds tallyproxy itself.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && ./target/release/tallyproxy --version

# ---------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: nothing in tallyproxy speaks TLS today; kept so the image is ready for it
# and for debugging tools that do. Not version-pinned: bookworm's security updates should win.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid so that volume ownership is predictable across rebuilds and hosts.
RUN groupadd --system --gid 10001 tallyproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/tallyproxy --shell /usr/sbin/nologin tallyproxy \
 && mkdir -p /etc/tallyproxy /var/lib/tallyproxy/wal \
 && chown -R tallyproxy:tallyproxy /var/lib/tallyproxy \
 && chmod 0750 /var/lib/tallyproxy

COPY --from=builder /build/target/release/tallyproxy /usr/local/bin/tallyproxy

# The write-ahead log lives here (durability.wal_dir = "/var/lib/tallyproxy/wal" in
# deploy/docker/proxy.toml). Mount a volume: the log and its proxy-id must survive the
# container. An empty named volume is initialised from this directory, owner included.
VOLUME ["/var/lib/tallyproxy"]
WORKDIR /var/lib/tallyproxy

# Numeric, so that runtimes checking for non-root (runAsNonRoot) can verify it.
USER 10001:10001

# 6380: RESP (listen), 8080: HTTP sidecar (http_listen). The config must bind them to
# 0.0.0.0 inside the container: the image's defaults (127.0.0.1) are unreachable from outside.
EXPOSE 6380 8080

# tallyproxy handles SIGTERM (orderly shutdown with a final flush). Give it longer than
# shutdown_timeout (10 s by default) before SIGKILL: `docker stop -t 15`, or
# stop_grace_period in compose.
STOPSIGNAL SIGTERM

# Liveness only (GET /healthz); readiness, which depends on the shards, is GET /readyz.
# The slim image has no curl: bash's /dev/tcp does the request. Assumes http_listen is on
# port 8080 and bound to 0.0.0.0 or 127.0.0.1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["tallyproxy"]
CMD ["--config", "/etc/tallyproxy/proxy.toml"]
