#!/usr/bin/env bash
# Runs the product: two Redis shards on 127.0.0.1:7070 and :7071 (data in ./data/redis-<port>),
# then the proxy in the foreground with proxy.toml (RESP on :6380, HTTP on :8080).
# Ctrl-C stops the proxy (it flushes first), then the two Redis servers it started.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-deps.sh
cargo build --release

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}
trap cleanup EXIT

for port in 7070 7071; do
  if redis-cli -p "$port" ping >/dev/null 2>&1; then
    echo "port $port already answers PING; using that Redis" >&2
    continue
  fi
  dir="data/redis-$port"
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes \
    --save "" --logfile redis.log &
  pids+=($!)
done
for port in 7070 7071; do
  for _ in $(seq 1 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
done

./target/release/tallyproxy --config proxy.toml &
proxy=$!
# Forward Ctrl-C / TERM to the proxy and wait for its orderly shutdown.
trap 'kill -TERM $proxy 2>/dev/null || true' INT TERM
# `wait` returns early when a trapped signal arrives: keep waiting until the proxy is gone,
# so the shards stay up for its final flush.
while kill -0 "$proxy" 2>/dev/null; do
  wait "$proxy" || true
done
