#!/usr/bin/env bash
# INCR throughput around periodic flushes, paced (`flush_spread`) and not, side by side,
# alternating within each round (issue 20, ninth round).
#
#   scripts/bench-flush.sh                                   1 million keys, spreads 0.5 and 0
#   SPREADS="0.5 0" KEYS=1000000 CLIENTS=8 PIPELINE=1 scripts/bench-flush.sh
#
# Per run: two shards and the proxy (`flush_interval` INTERVAL s, the log on), KEYS distinct
# INCRs through `redis-cli --pipe`, then `redis-benchmark -c CLIENTS -P PIPELINE -r KEYS INCR`
# in the background while INFO counters are read every 100 ms for CYCLES + 1 flush intervals.
# A flush is where `backend_writes` grows. Per flush: INCR/s in the stretch before it (since the
# previous flush ended) and while it ran, their ratio, and how long it ran; then the mean INCR/s
# from the end of the first flush to the start of the last (whole cycles, pacing's cost or gain
# included). The first stretch follows the load, whose reads left every base fresh: it is the
# same for every setting, a check of the run rather than a figure of the flush.
# BIN (target/release/tallyproxy), ROUNDS (2), KEYS (1000000), INTERVAL (20), CYCLES (3),
# CLIENTS (50), PIPELINE (16), PORT_BASE (25370; the shards on PORT_BASE and +1, the proxy on
# +10, its HTTP on +20). Timings are reported, never asserted. Every process started is
# stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

BIN=${BIN:-target/release/tallyproxy}
ROUNDS=${ROUNDS:-2}
KEYS=${KEYS:-1000000}
INTERVAL=${INTERVAL:-20}
CYCLES=${CYCLES:-3}
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-16}
SPREADS=${SPREADS:-"0.5 0"}
BASE=${PORT_BASE:-25370}
PORT=$((BASE + 10))

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-flush.XXXXXX")
trap stop_tracked EXIT

awk -v n="$KEYS" 'BEGIN { for (i = 0; i < n; i++) { k = sprintf("s:%012d", i);
  printf "*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n", length(k), k } }' >"$tmp/load.resp"

# one SPREAD ROUND: one run, its report on stdout
one() {
  local spread=$1 round=$2 run="$tmp/$1-$2" load
  mkdir -p "$run"
  start_pair "$BIN" "$run" "$BASE" "[counters]
flush_interval = \"${INTERVAL}s\"
flush_spread = $spread
max_pending_keys = $((KEYS * 2))

[durability]
enabled = true
wal_dir = \"$run/wal\"
fsync = \"everysec\""
  timeout 600 redis-cli -p "$PORT" --pipe <"$tmp/load.resp" >/dev/null
  redis-benchmark -p "$PORT" -c "$CLIENTS" -P "$PIPELINE" -r "$KEYS" -n 2000000000 \
    INCR "s:__rand_int__" >/dev/null 2>&1 &
  load=$!
  track "$load"
  # INFO every 100 ms for CYCLES + 1 intervals (bounded by count).
  local n=$(((CYCLES + 1) * INTERVAL * 10))
  for _ in $(seq 1 "$n"); do
    echo "$(date +%s.%N) $(redis-cli -p "$PORT" INFO counters | tr -d '\r' |
      awk -F: '$1 == "increments_received" {i = $2} $1 == "backend_writes" {w = $2} END {print i, w}')"
    sleep 0.1
  done >"$run/samples"
  kill "$load" 2>/dev/null || true
  wait "$load" 2>/dev/null || true
  awk -v spread="$spread" -v round="$round" '
    function rate(a, b) { return (inc[b] - inc[a]) / (t[b] - t[a]) }
    NF == 3 { n++; t[n] = $1; inc[n] = $2; w[n] = $3 }
    END {
      for (i = 2; i <= n; i++) {
        if (w[i] > w[i - 1]) { if (!open) { s[++k] = i - 1; open = 1 } e[k] = i }
        else if (open && t[i] - t[e[k]] > 0.5) open = 0
      }
      prev = 1
      for (j = 1; j <= k; j++) {
        before = rate(prev, s[j]); during = rate(s[j], e[j])
        printf "spread %s round %s flush %d: before %.0f INCR/s, while flushing %.0f (%.2f), %.1f s, %d keys written\n",
          spread, round, j, before, during, during / before, t[e[j]] - t[s[j]], w[e[j]] - w[s[j]]
        prev = e[j]
      }
      if (k >= 3) printf "spread %s round %s: mean %.0f INCR/s from the end of flush 1 to the start of flush %d\n",
        spread, round, rate(e[1], s[k]), k
    }' "$run/samples"
  stop_pair
  rm -rf "$run"
}

echo "# $KEYS keys, flush_interval ${INTERVAL}s, redis-benchmark -c $CLIENTS -P $PIPELINE; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  for s in $SPREADS; do
    one "$s" "$round"
  done
done
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
