#!/usr/bin/env bash
# The cost of the write-ahead log on the hot path, and -P 1 latency (issue 20), side by side:
# direct Redis and one or more tallyproxy builds, alternating within each round.
#
#   scripts/bench-log.sh                       target/release against itself with the log off
#   TARGETS="main=/path/a:on new=target/release/tallyproxy:on" scripts/bench-log.sh
#
# TARGETS: space-separated NAME=BINARY:LOG[:THREADS] (LOG on = `[durability] enabled = true,
# fsync = "everysec"`, off = disabled; THREADS: `worker_threads`, default 0 = automatic).
# Direct Redis is always measured too (one of the two shards).
# ROUNDS (3), N16 (3000000, -P 16), N1 (200000, -P 1), PORT_BASE (25170; uses PORT_BASE,
# +1 for the shards and +10.. for the proxies' RESP, +20.. for their HTTP), WORKLOADS
# ("incr16 get16 incr1 get1").
#
# Per run it records rps, p50 and p99 (redis-benchmark --csv) and the CPU time of the process
# behind the port (user + system ticks of /proc/<pid>/stat) divided by the requests. Prints
# every run, then medians per workload and target, and each proxy's ratio to Redis computed
# per round (then the median of those). The order of the targets rotates each round.
# Timings are reported, never asserted. Every process started is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ROUNDS=${ROUNDS:-3}
N16=${N16:-3000000}
N1=${N1:-200000}
BASE=${PORT_BASE:-25170}
WORKLOADS=${WORKLOADS:-"incr16 get16 incr1 get1"}
TARGETS=${TARGETS:-"log=target/release/tallyproxy:on nolog=target/release/tallyproxy:off"}
TCK=$(getconf CLK_TCK)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-log.XXXXXX")
trap stop_tracked EXIT

start_redis "$BASE" "$tmp"
REDIS_PID=$redis_pid
start_redis $((BASE + 1)) "$tmp"

declare -A PORT PID
NAMES=(redis)
PORT[redis]=$BASE
PID[redis]=$REDIS_PID
i=0
for t in $TARGETS; do
  name=${t%%=*}
  IFS=: read -r bin log threads <<<"${t#*=}"
  port=$((BASE + 10 + i))
  http=$((BASE + 20 + i))
  i=$((i + 1))
  conf="$tmp/$name.toml"
  cat >"$conf" <<EOF
listen = "127.0.0.1:$port"
http_listen = "127.0.0.1:$http"
worker_threads = ${threads:-0}

[[shards]]
addr = "127.0.0.1:$BASE"

[[shards]]
addr = "127.0.0.1:$((BASE + 1))"

[counters]
cache_ttl = "5s"
flush_interval = "30s"

[durability]
enabled = $([[ $log == on ]] && echo true || echo false)
wal_dir = "$tmp/wal-$name"
fsync = "everysec"
EOF
  "$bin" --config "$conf" 2>"$tmp/$name.log" &
  PID[$name]=$!
  track "${PID[$name]}"
  PORT[$name]=$port
  NAMES+=("$name")
  wait_for 10 bash -c "[[ \$(redis-cli -p $port ping 2>/dev/null) == PONG ]]" ||
    { cat "$tmp/$name.log" >&2; exit 1; }
  wait_for 10 bash -c "[[ \$(redis-cli -p $port INFO shards | grep -c status=up) -ge 2 ]]" ||
    { echo "$name does not see both shards" >&2; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run NAME PIPELINE N COMMAND... -> "rps p50 p99 cpu_ns_per_request"
run() {
  local name=$1 p=$2 n=$3 before after out line
  shift 3
  before=$(cpu_ticks "${PID[$name]}")
  out=$(timeout 300 redis-benchmark -h 127.0.0.1 -p "${PORT[$name]}" -c 50 -r 10000 -n "$n" \
    -P "$p" --csv "$@" 2>/dev/null)
  after=$(cpu_ticks "${PID[$name]}")
  line=$(printf '%s\n' "$out" | grep -v '^"test"' | grep '^"' | tail -n 1)
  printf '%s\n' "$line" | awk -F, -v t=$((after - before)) -v hz="$TCK" -v n="$n" \
    '{gsub(/"/, ""); printf "%s %s %s %.0f\n", $2, $5, $7, t / hz * 1e9 / n}'
}

workload() { # workload NAME -> "PIPELINE N COMMAND..."
  case $1 in
    incr16) echo "16 $N16 INCR counter:__rand_int__" ;;
    get16) echo "16 $N16 GET counter:__rand_int__" ;;
    incr1) echo "1 $N1 INCR counter:__rand_int__" ;;
    get1) echo "1 $N1 GET counter:__rand_int__" ;;
  esac
}

RAW="$tmp/raw.csv"
: >"$RAW"
echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "round,workload,target,rps,p50_ms,p99_ms,cpu_ns_per_req"
for ((r = 1; r <= ROUNDS; r++)); do
  # Every key exists in Redis and is cached in each proxy before the GETs.
  for name in "${NAMES[@]}"; do
    redis-benchmark -h 127.0.0.1 -p "${PORT[$name]}" -c 50 -r 10000 -n 200000 -P 16 -q \
      INCR counter:__rand_int__ >/dev/null 2>&1
  done
  for w in $WORKLOADS; do
    read -r -a spec <<<"$(workload "$w")"
    k=${#NAMES[@]}
    for ((j = 0; j < k; j++)); do
      name=${NAMES[$(((j + r) % k))]}
      res=$(run "$name" "${spec[@]}")
      echo "$r,$w,$name,${res// /,}" | tee -a "$RAW"
    done
  done
done
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

median() { sort -g | awk '{v[NR] = $1} END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
echo "| workload | target | rps | p50 ms | p99 ms | CPU ns/req | rps / Redis (per-round median) | p99 / Redis p99 |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
for w in $WORKLOADS; do
  for name in "${NAMES[@]}"; do
    col() { awk -F, -v w="$w" -v t="$name" -v c="$1" '$2 == w && $3 == t {print $c}' "$RAW" | median; }
    rr=$(awk -F, -v w="$w" -v t="$name" '
      $2 == w && $3 == "redis" {base[$1] = $4; p[$1] = $6}
      $2 == w && $3 == t {mine[$1] = $4; q[$1] = $6}
      END {for (r in mine) if (base[r] > 0) print mine[r] / base[r], q[r] / p[r]}' "$RAW")
    ratio=$(printf '%s\n' "$rr" | awk '{print $1}' | median)
    pratio=$(printf '%s\n' "$rr" | awk '{print $2}' | median)
    printf '| %s | %s | %.0f | %s | %s | %s | %.2f | %.2f |\n' "$w" "$name" "$(col 4)" "$(col 5)" \
      "$(col 6)" "$(col 7)" "$ratio" "$pratio"
  done
done
