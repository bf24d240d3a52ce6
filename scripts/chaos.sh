#!/usr/bin/env bash
# Chaos run: tallyproxy under concurrent INCR load while processes are killed, paused and cut
# off; then every key is read on the shards and compared with what the clients were told.
#
#   scripts/chaos.sh [--seconds N] [--clients N] [--only kill|stop-shard|relay]
#
#   --seconds N   load duration of each scenario (default 20)
#   --clients N   concurrent clients, each INCRing a key of its own (default 64)
#   --only NAME   run one scenario
#
# Scenarios, each in its own temp dir with two fresh redis-servers on free ports (127.0.0.1):
#   kill        the proxy binary is killed with -9 under load (about every 4 s, at least once)
#               and restarted on the same wal_dir; the clients reconnect and go on.
#   stop-shard  one shard is paused (SIGSTOP) for several seconds under load, then resumed.
#   relay       one shard is reached through a lossy TCP relay (examples/chaos.rs) that, about
#               every 500 ms, forwards a flush batch, swallows the shard's reply and drops the
#               connection.
# Each ends with SIGTERM to the proxy (its orderly stop lands what is pending; it must exit 0).
# The proxy runs with fsync = "always", flush_interval = "200ms", cache_ttl = "1s" and small
# log segments (1 MiB, so checkpoints happen under load).
#
# Output: one line per scenario on stdout, e.g.
#   kill        acknowledged=123456 in_redis=123460 lost=0 doubled=0 unknown_outcome=4
# where, summed over keys, lost = max(0, acknowledged - in Redis), doubled = max(0, in Redis -
# attempted), unknown_outcome = in Redis - acknowledged (increments whose reply was lost).
# Progress and details go to stderr. Exit status 1 when anything was lost or doubled, a key
# is not on exactly its ring owner, or a fault was not injected; the temp dirs of a failed run
# (logs, configs, counts) are kept and named. Every process started here is stopped by its
# PID when the script exits. CHAOS_KEEP=1 keeps the temp dirs of a passing run too.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=20
CLIENTS=64
ONLY=""
while (($#)); do
  case "$1" in
    --seconds)
      DURATION=${2:?--seconds needs a value}
      shift 2
      ;;
    --clients)
      CLIENTS=${2:?--clients needs a value}
      shift 2
      ;;
    --only)
      ONLY=${2:?--only needs a value}
      shift 2
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "chaos.sh: unknown argument $1 (try --help)" >&2
      exit 2
      ;;
  esac
done
[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || {
  echo "chaos.sh: --seconds must be a positive integer" >&2
  exit 2
}
[[ "$CLIENTS" =~ ^[1-9][0-9]*$ ]] || {
  echo "chaos.sh: --clients must be a positive integer" >&2
  exit 2
}
case "$ONLY" in "" | kill | stop-shard | relay) ;; *)
  echo "chaos.sh: --only takes kill, stop-shard or relay" >&2
  exit 2
  ;;
esac

log() { printf '[chaos %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Processes: every PID started here is in PIDS until it has been reaped.
# ---------------------------------------------------------------------------------------------
PIDS=()
TMPDIRS=()
KEEP_TMP=${CHAOS_KEEP:-0}
[[ "$KEEP_TMP" == 1 ]] || KEEP_TMP=0

forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

# True while the process exists and is not a zombie.
alive() {
  local state
  state=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n "$state" && "$state" != Z ]]
}

# Waits up to $2 tenths of a second for PID $1 to end; true if it did.
wait_gone() {
  local i
  for ((i = 0; i < $2; i++)); do
    alive "$1" || return 0
    sleep 0.1
  done
  ! alive "$1"
}

# Stops PID $1: resumed if paused, SIGTERM, then SIGKILL after 10 s; reaped.
stop_pid() {
  local pid=$1
  if alive "$pid"; then
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" 100 || kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

cleanup() {
  local rc=$? i d
  # Resume everything first: a proxy's final flush must not wait on a paused shard.
  for d in "${PIDS[@]+"${PIDS[@]}"}"; do kill -CONT "$d" 2>/dev/null || true; done
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  for d in "${TMPDIRS[@]+"${TMPDIRS[@]}"}"; do
    if ((KEEP_TMP)); then
      log "kept $d"
    else
      rm -rf "$d"
    fi
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
  log "ERROR: $*"
  KEEP_TMP=1
  exit 1
}

# Sleeps $1 ms; in the background and waited for, so that a signal's trap runs at once.
sleep_ms() {
  sleep "$(($1 / 1000)).$(printf '%03d' $(($1 % 1000)))" &
  wait $!
}

# Waits up to $2 tenths of a second for 127.0.0.1:$1 to answer PING.
wait_ping() {
  local i
  for ((i = 0; i < $2; i++)); do
    [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]] && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
scripts/ensure-deps.sh
for tool in redis-server redis-cli timeout; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
log "building (release)"
cargo build --release --bin tallyproxy --example chaos
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROXY_BIN=$TARGET_DIR/release/tallyproxy
CHAOS_BIN=$TARGET_DIR/release/examples/chaos
[[ -x "$PROXY_BIN" && -x "$CHAOS_BIN" ]] || die "built binaries not found in $TARGET_DIR/release"

# ---------------------------------------------------------------------------------------------
# Scenario plumbing (globals: DIR, ports, A_PID, B_PID, REDIS_PID, PROXY_PID, LOAD_PID)
# ---------------------------------------------------------------------------------------------
setup() {
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/tallyproxy-chaos-$1.XXXXXX")
  TMPDIRS+=("$DIR")
  read -r A_PORT B_PORT LISTEN HTTP RELAY_PORT < <("$CHAOS_BIN" free-ports 5)
  [[ -n "${RELAY_PORT:-}" ]] || die "no free ports"
  start_redis "$A_PORT"
  A_PID=$REDIS_PID
  start_redis "$B_PORT"
  B_PID=$REDIS_PID
  wait_ping "$A_PORT" 100 || die "redis-server on $A_PORT did not start ($DIR)"
  wait_ping "$B_PORT" 100 || die "redis-server on $B_PORT did not start ($DIR)"
}

# Starts a redis-server on port $1 (no persistence; its files in $DIR); its PID in REDIS_PID.
start_redis() {
  mkdir -p "$DIR/redis-$1"
  redis-server --port "$1" --bind 127.0.0.1 --dir "$DIR/redis-$1" --save "" \
    --appendonly no --logfile "$DIR/redis-$1.log" >/dev/null 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
}

# Writes $DIR/proxy.toml; shard_b's address is $1 (the shard itself, or the relay).
write_config() {
  cat >"$DIR/proxy.toml" <<EOF
listen = "127.0.0.1:$LISTEN"
http_listen = "127.0.0.1:$HTTP"
shutdown_timeout = "20s"

[[shards]]
name = "shard_a"
addr = "127.0.0.1:$A_PORT"

[[shards]]
name = "shard_b"
addr = "127.0.0.1:$1"

[backend]
timeout = "500ms"
health_interval = "200ms"

[counters]
flush_interval = "200ms"
cache_ttl = "1s"

[durability]
wal_dir = "$DIR/wal"
fsync = "always"
segment_bytes = 1048576

[log]
level = "info"
EOF
}

start_proxy() {
  NO_COLOR=1 "$PROXY_BIN" --config "$DIR/proxy.toml" >>"$DIR/proxy.log" 2>&1 &
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  if ! wait_ping "$LISTEN" 150; then
    tail -n 20 "$DIR/proxy.log" >&2 || true
    die "the proxy did not start on $LISTEN ($DIR)"
  fi
}

# SIGTERM to the proxy; it must land what is pending and exit 0.
term_proxy() {
  local rc=0
  kill -TERM "$PROXY_PID"
  if ! wait_gone "$PROXY_PID" 400; then
    tail -n 20 "$DIR/proxy.log" >&2 || true
    die "the proxy did not stop within 40 s of SIGTERM ($DIR)"
  fi
  wait "$PROXY_PID" || rc=$?
  forget "$PROXY_PID"
  if ((rc != 0)); then
    tail -n 20 "$DIR/proxy.log" >&2 || true
    die "the proxy exited with status $rc after SIGTERM ($DIR)"
  fi
}

# Starts the load in the background (LOAD_PID) against the proxy; keys <prefix>:<i>.
start_load() {
  "$CHAOS_BIN" load --addr "127.0.0.1:$LISTEN" --clients "$CLIENTS" --seconds "$DURATION" \
    --prefix "chaos:$1" --out "$DIR/counts.json" 2>>"$DIR/load.log" &
  LOAD_PID=$!
  PIDS+=("$LOAD_PID")
}

wait_load() {
  local rc=0
  # The load ends by itself after $DURATION s (plus at most one reply timeout).
  if ! wait_gone "$LOAD_PID" $(((DURATION + 30) * 10)); then
    die "the load did not end ($DIR)"
  fi
  wait "$LOAD_PID" || rc=$?
  forget "$LOAD_PID"
  ((rc == 0)) || die "the load failed with status $rc ($DIR/load.log)"
  sed 's/^/  /' "$DIR/load.log" >&2
}

FAILED=()

# Compares the shards with the counts and prints the scenario's line.
check() {
  local rc=0
  "$CHAOS_BIN" check --shards "shard_a=127.0.0.1:$A_PORT,shard_b=127.0.0.1:$B_PORT" \
    --counts "$DIR/counts.json" --scenario "$1" --min-acked $((DURATION * 100)) || rc=$?
  if ((rc != 0)); then
    FAILED+=("$1")
    KEEP_TMP=1
    log "$1: FAILED; logs, config and counts in $DIR"
  fi
}

teardown() {
  stop_pid "$A_PID"
  stop_pid "$B_PID"
}

# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------
scenario_kill() {
  setup kill
  write_config "$B_PORT"
  start_proxy
  local kills=$((DURATION / 4)) j
  ((kills >= 1)) || kills=1
  # Evenly spaced, each moved by up to a quarter of the gap either way, so that runs hit
  # different moments (a flush, a checkpoint, a replay).
  local gap_ms=$((DURATION * 1000 / (kills + 1)))
  log "kill: $CLIENTS clients for ${DURATION}s; kill -9 of the proxy $kills time(s), about every ${gap_ms} ms ($DIR)"
  start_load kill
  local jitter=0 next
  for ((j = 1; j <= kills; j++)); do
    next=$((RANDOM % (gap_ms / 2 + 1) - gap_ms / 4))
    sleep_ms $((gap_ms - jitter + next))
    jitter=$next
    kill -KILL "$PROXY_PID"
    wait "$PROXY_PID" 2>/dev/null || true
    forget "$PROXY_PID"
    log "kill: killed the proxy (-9), restarting it on the same wal_dir"
    sleep 0.3
    start_proxy
  done
  wait_load
  log "kill: SIGTERM to the proxy"
  term_proxy
  check kill
  teardown
}

scenario_stop_shard() {
  setup stop-shard
  write_config "$B_PORT"
  start_proxy
  local lead_ms=$((DURATION * 1000 / 5)) pause_ms=$((DURATION * 1000 * 2 / 5))
  ((lead_ms >= 500)) || lead_ms=500
  ((pause_ms >= 3000)) || pause_ms=3000
  log "stop-shard: $CLIENTS clients for ${DURATION}s; shard_b paused for ${pause_ms} ms after ${lead_ms} ms ($DIR)"
  start_load stop-shard
  sleep_ms "$lead_ms"
  kill -STOP "$B_PID"
  log "stop-shard: shard_b (pid $B_PID) stopped"
  sleep_ms "$pause_ms"
  kill -CONT "$B_PID"
  log "stop-shard: shard_b resumed"
  wait_load
  log "stop-shard: SIGTERM to the proxy"
  term_proxy
  check stop-shard
  teardown
}

scenario_relay() {
  setup relay
  "$CHAOS_BIN" relay --listen "$RELAY_PORT" --target "$B_PORT" --seconds "$DURATION" \
    --every-ms 500 --stats "$DIR/relay.json" 2>>"$DIR/relay.log" &
  local relay_pid=$!
  PIDS+=("$relay_pid")
  wait_ping "$RELAY_PORT" 100 || die "the relay did not start on $RELAY_PORT ($DIR)"
  write_config "$RELAY_PORT"
  start_proxy
  log "relay: $CLIENTS clients for ${DURATION}s; shard_b behind a relay that drops a flush reply every 500 ms ($DIR)"
  start_load relay
  wait_load
  log "relay: SIGTERM to the proxy"
  term_proxy
  stop_pid "$relay_pid"
  sed 's/^/  /' "$DIR/relay.log" >&2
  local drops
  drops=$(sed -n 's/.*"drops":\([0-9]*\).*/\1/p' "$DIR/relay.json" 2>/dev/null)
  check relay
  if [[ "${drops:-0}" -eq 0 ]]; then
    log "relay: FAILED: the relay never dropped a connection after a flush batch"
    FAILED+=("relay(no fault)")
    KEEP_TMP=1
  fi
  teardown
}

for s in kill stop-shard relay; do
  [[ -z "$ONLY" || "$ONLY" == "$s" ]] || continue
  case "$s" in
    kill) scenario_kill ;;
    stop-shard) scenario_stop_shard ;;
    relay) scenario_relay ;;
  esac
done

if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]}"
  exit 1
fi
log "all scenarios: nothing lost, nothing doubled"
