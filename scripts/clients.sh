#!/usr/bin/env bash
# The client compatibility suite (docs/clients.md): the Redis client libraries people install
# today, at their newest versions and on their default settings, against the proxy.
#
#   scripts/clients.sh                 redis-py and node-redis/ioredis against the proxy
#   scripts/clients.sh python          one suite only (python, node)
#   CLIENTS_TARGET=redis scripts/clients.sh
#                                      the same suites against one plain redis-server, to
#                                      check the suites themselves
#   TALLYPROXY_BIN=path scripts/clients.sh
#                                      against that proxy binary (another build) instead of
#                                      this tree's debug build
#
# Installs what is missing: redis-server (scripts/ensure-deps.sh), a venv with the newest
# redis-py and pytest in target/clients-venv, the newest `redis` and `ioredis` packages in
# tests/clients/node/node_modules. Starts two redis-server shards and the proxy (debug build)
# on free loopback ports with a configuration of its own in a temporary directory, runs the
# suites, and stops every process it started. Exits non-zero when anything failed; the last
# line sums the tests of every suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
root=$PWD

target=${CLIENTS_TARGET:-proxy}
case "$target" in
  proxy | redis) ;;
  *) echo "CLIENTS_TARGET must be proxy or redis, not '$target'" >&2; exit 2 ;;
esac
suites=("$@")
((${#suites[@]})) || suites=(python node)
for s in "${suites[@]}"; do
  case "$s" in
    python | node) ;;
    *) echo "unknown suite '$s' (python, node)" >&2; exit 2 ;;
  esac
done
has_suite() { [[ " ${suites[*]} " == *" $1 "* ]]; }


scripts/ensure-deps.sh

# --- client libraries -------------------------------------------------------------------------
venv=target/clients-venv
if has_suite python; then
  if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$venv"
    # Debian's own python3 has venv and ensurepip in a package of their own.
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      apt_install python3-venv
      python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip --version >/dev/null 2>&1 || "$venv/bin/python" -m ensurepip -q
  fi
  timeout 600 "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade redis pytest
fi
if has_suite node; then
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || {
    echo "the node suite needs node and npm" >&2
    exit 1
  }
  # package.json asks for `latest` and no lock file is kept: each run takes the newest release.
  (cd tests/clients/node &&
    timeout 600 npm install --no-package-lock --no-audit --no-fund --loglevel=error)
fi

# --- servers ----------------------------------------------------------------------------------
proxy_bin=${TALLYPROXY_BIN:-}
if [[ "$target" == proxy && -z "$proxy_bin" ]]; then
  cargo build --quiet
  proxy_bin=./target/debug/tallyproxy
fi

tmp=$(mktemp -d)
# The proxy is stopped first (tracked last; SIGTERM: it lands what is pending while the
# shards are still up).
trap stop_tracked EXIT

# Free loopback ports: bound to :0 all at once, so the kernel hands out distinct ones.
read -r port_a port_b port_proxy port_http < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
')

wait_ping() { # port, what: up to 10 s
  for _ in $(seq 1 100); do
    [[ "$(timeout 2 redis-cli -p "$1" ping 2>/dev/null)" == PONG ]] && return 0
    sleep 0.1
  done
  echo "$2 on port $1 did not answer PING within 10 s" >&2
  [[ -f "$tmp/$2.log" ]] && tail -20 "$tmp/$2.log" >&2
  return 1
}


start_redis "$port_a" "$tmp"
if [[ "$target" == proxy ]]; then
  start_redis "$port_b" "$tmp"
  cat >"$tmp/proxy.toml" <<EOF
listen = "127.0.0.1:$port_proxy"
http_listen = "127.0.0.1:$port_http"

[[shards]]
addr = "127.0.0.1:$port_a"

[[shards]]
addr = "127.0.0.1:$port_b"

[counters]
# Short, so that flushes run while the suites count.
flush_interval = "200ms"

[durability]
wal_dir = "$tmp/wal"
EOF
  "$proxy_bin" --config "$tmp/proxy.toml" >"$tmp/proxy.log" 2>&1 &
  track $!
  wait_ping "$port_proxy" proxy
  export CLIENTS_PORT=$port_proxy CLIENTS_SHARD_PORTS=$port_a,$port_b CLIENTS_HTTP_PORT=$port_http
  echo "target: tallyproxy on 127.0.0.1:$port_proxy, shards on $port_a and $port_b"
else
  export CLIENTS_PORT=$port_a
  echo "target: $(redis-server --version | cut -d' ' -f1-3) on 127.0.0.1:$port_a"
fi

# --- suites -----------------------------------------------------------------------------------
passed=0
failed=0
broken=()
count() { # summary line, word: the number before the word, 0 when absent
  grep -oE "[0-9]+ $2" <<<"$1" | head -1 | cut -d' ' -f1 || true
}

if has_suite python; then
  echo "redis-py $("$venv/bin/python" -c 'import redis; print(redis.__version__)')," \
    "pytest $("$venv/bin/python" -c 'import pytest; print(pytest.__version__)')," \
    "$("$venv/bin/python" --version)"
  rc=0
  (cd tests/clients/python &&
    PYTHONDONTWRITEBYTECODE=1 timeout 300 "$root/$venv/bin/python" -m pytest -q \
      -p no:cacheprovider) | tee "$tmp/python.out" || rc=$?
  line=$(grep -E '(passed|failed|error)' "$tmp/python.out" | tail -1)
  p=$(count "$line" passed) f=$(count "$line" failed) e=$(count "$line" error)
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0} + ${e:-0}))
  if ((rc != 0)); then
    broken+=("python (exit $rc)")
    ((${f:-0} + ${e:-0})) || failed=$((failed + 1))
  fi
fi

if has_suite node; then
  (cd tests/clients/node && node -e '
    for (const p of ["redis", "@redis/client", "ioredis"])
      process.stdout.write(`${p} ${require(`./node_modules/${p}/package.json`).version}, `);
    console.log(`node ${process.version}`);')
  rc=0
  (cd tests/clients/node && timeout 300 node --test --test-concurrency=1 --test-reporter=spec) \
    | tee "$tmp/node.out" || rc=$?
  p=$(grep -E '^[^ ]+ pass [0-9]+$' "$tmp/node.out" | grep -oE '[0-9]+$' || true)
  f=$(grep -E '^[^ ]+ fail [0-9]+$' "$tmp/node.out" | grep -oE '[0-9]+$' || true)
  # Tests under a hook that failed (a client that could not connect) are "cancelled".
  x=$(grep -E '^[^ ]+ cancelled [0-9]+$' "$tmp/node.out" | grep -oE '[0-9]+$' || true)
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0} + ${x:-0}))
  if ((rc != 0)); then
    broken+=("node (exit $rc)")
    ((${f:-0} + ${x:-0})) || failed=$((failed + 1))
  fi
fi

if [[ "$target" == proxy ]] && ((${#broken[@]})); then
  echo "--- the proxy's log (last 30 lines)"
  tail -30 "$tmp/proxy.log"
fi
((${#broken[@]})) && echo "failed suites: ${broken[*]}" >&2
echo "clients: $passed passed, $failed failed"
((${#broken[@]} == 0))
