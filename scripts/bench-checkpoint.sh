#!/usr/bin/env bash
# How long a write-ahead log checkpoint holds the proxy at millions of pending keys (issue 20,
# eighth round), one or more builds side by side, alternating within each round.
#
#   scripts/bench-checkpoint.sh                           target/release, 12 million keys
#   TARGETS="old=/path/a new=target/release/tallyproxy" KEYS=12000000 scripts/bench-checkpoint.sh
#
# Per run: two shards and the proxy (no periodic flush, the log on with fsync = "everysec"),
# then KEYS distinct INCRs through `redis-cli --pipe` (a checkpoint comes at ~4 M and ~10 M
# pending keys with the default segment_bytes) while INFO is read every 100 ms. Reports the
# error replies the load got (a key's first INCR reads its base, and a read that waits past
# `backend.timeout` answers TRYAGAIN), the longest gap between two INFO answers (how long the
# proxy answered nothing), and the
# checkpoints' own log lines (`keys`, `bytes`, `held_ms`, `total_ms` in builds that have them).
# ROUNDS (2), KEYS (12000000), PORT_BASE (25270; the shards on PORT_BASE and +1, the proxy
# on +10, its HTTP on +20). Timings are reported, never asserted. Every process started is
# stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ROUNDS=${ROUNDS:-2}
KEYS=${KEYS:-12000000}
BASE=${PORT_BASE:-25270}
TARGETS=${TARGETS:-"current=target/release/tallyproxy"}
PORT=$((BASE + 10))

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-checkpoint.XXXXXX")
trap stop_tracked EXIT

echo "# writing $KEYS INCRs"
awk -v n="$KEYS" 'BEGIN { for (i = 0; i < n; i++) { k = sprintf("s:%012d", i);
  printf "*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n", length(k), k } }' >"$tmp/load.resp"

# one NAME BINARY ROUND: one run, its report on stdout
one() {
  local name=$1 bin=$2 round=$3 run="$tmp/$1-$3" sampler
  mkdir -p "$run"
  start_pair "$bin" "$run" "$BASE" "[counters]
flush_interval = \"1h\"
max_pending_keys = $((KEYS * 2))

[durability]
enabled = true
wal_dir = \"$run/wal\"
fsync = \"everysec\""
  # INFO every 100 ms, bounded: ten minutes at most.
  (for _ in $(seq 1 6000); do
    echo "$(date +%s.%N) $(redis-cli -p "$PORT" INFO counters | tr -d '\r' |
      awk -F: '$1 == "increments_received" {print $2}')"
    sleep 0.1
  done) >"$run/samples" &
  sampler=$!
  track "$sampler"
  local t0 t1
  t0=$(date +%s.%N)
  timeout 600 redis-cli -p "$PORT" --pipe <"$tmp/load.resp" >"$run/pipe.out" 2>&1 || true
  t1=$(date +%s.%N)
  local errors
  errors=$(grep -o 'errors: [0-9]*' "$run/pipe.out" | tail -n 1 | cut -d' ' -f2 || true)
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  awk -v name="$name" -v round="$round" -v t0="$t0" -v t1="$t1" -v keys="$KEYS" -v errors="${errors:-0}" '
    NR > 1 && $1 - p > gap { gap = $1 - p; at = $2 }
    { p = $1 }
    END { printf "%s round %s: %d keys loaded in %.1f s (%.0f INCR/s), %d error replies; longest gap between INFO answers %.2f s (at %s increments)\n",
          name, round, keys, t1 - t0, keys / (t1 - t0), errors, gap, at }' "$run/samples"
  grep -v -e '^All data transferred' -e '^Last reply received' -e '^errors: ' "$run/pipe.out" |
    sort | uniq -c | sort -rn | head -3 | sed 's/^/  /' || true
  sed 's/\x1b\[[0-9;]*m//g' "$run/proxy.log" | grep -a "write-ahead log checkpoint" |
    sed 's/^.*checkpoint[^ ]* /  checkpoint /' || true
  stop_pair
  rm -rf "$run"
}

echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  for t in $TARGETS; do
    one "${t%%=*}" "${t#*=}" "$round"
  done
done
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
