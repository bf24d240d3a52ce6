#!/usr/bin/env bash
# Side-by-side benchmark: direct Redis, twemproxy (nutcracker) and tallyproxy, with the same
# redis-benchmark workloads, plus tallyproxy's own figures (durability cost, backend economy,
# memory per pending key).
#
#   scripts/bench.sh                 full run (several minutes)
#   scripts/bench.sh --smoke         seconds: proves the script works end to end, numbers mean nothing
#   scripts/bench.sh --cluster-only  only the Redis Cluster run (section 5; with --smoke, tiny)
#
# Environment: ROUNDS (default 5; 1 with --smoke), BENCH_TMPDIR (parent of the temp dir,
# default $TMPDIR or /tmp; the tallyproxy WAL lives there, so put it on the disk you care about),
# and for full runs the request counts N_P1, N_P16, N_MGET_P1, N_MGET_P16, STEADY_N (windows
# steady state, default 10000000), the scale run's key
# counts SCALE_KEYS (default "10000 100000 1000000 10000000"; 10 million keys need about 2 GB of
# proxy memory and 1 GB in the shards), the many-clients run's CONNS_MANY (1000) and N_CONNS,
# CL_N (cluster, -P 16), and TALLY_BIN: a tallyproxy binary to measure instead of building
# target/release (e.g. to check the script with a debug build; its numbers are then not the
# product's).
#
# Everything runs on 127.0.0.1 on its own ports, so it does not disturb scripts/run.sh
# (6380/8080/7070/7071):
#   17070, 17071  redis-server shards (no persistence)
#   17072         twemproxy over both shards (stats on 17222)
#   16380, 18080  tallyproxy over both shards (RESP, HTTP), later over the cluster
#   17170-17172   a 3-primary Redis Cluster (bus 27170-27172), section 5 (scripts/bench-cluster.sh)
# Each process started here is stopped by its PID when the script exits. Results (medians per
# workload and target) are printed and written to bench-results/results-<timestamp>.md.
# Timings are reported, never asserted: the script exits 0 when it ran.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
RUN_MAIN=1 # sections 1-6 (all but the cluster run)
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --cluster-only) RUN_MAIN=0 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "bench.sh: unknown argument $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

# BENCH_PORT_BASE (default 17070) moves every port, so that two runs can share a machine. Keep
# it (and it + 1010) below 32768: above, the kernel hands the ports out as client ports, and a
# busy machine's client connections (or their TIME-WAIT) can hold the one a shard needs.
BASE="${BENCH_PORT_BASE:-17070}"
REDIS_A=$BASE
REDIS_B=$((BASE + 1))
TWEM_PORT=$((BASE + 2))
TWEM_STATS=$((BASE + 152))
TALLY_PORT=$((BASE - 690))
TALLY_HTTP=$((BASE + 1010))
CLIENTS=50
KEYSPACE=10000

if ((SMOKE)); then
  ROUNDS=${ROUNDS:-1}
  N_P1=2000 N_P16=2000 N_MGET_P1=2000 N_MGET_P16=2000
  ECON_N=10000 ECON_KEYS=1000 STEADY_N=10000
  MEM_KEYS=10000
  SCALE_KEYS=${SCALE_KEYS:-10000} CONNS_MANY=1000 N_CONNS=5000
  CL_N=2000 CL_ECON_N=10000
else
  # Runs of a few seconds each: at a million requests a second, a 1 s run is mostly noise.
  ROUNDS=${ROUNDS:-5}
  N_P1=${N_P1:-200000} N_P16=${N_P16:-3000000}
  N_MGET_P1=${N_MGET_P1:-100000} N_MGET_P16=${N_MGET_P16:-400000}
  ECON_N=1000000 ECON_KEYS=10000
  # The steady state needs several 1 s flushes under load: at 2 million INCRs a second a
  # million of them is half a second, one flush.
  STEADY_N=${STEADY_N:-10000000}
  MEM_KEYS=1000000
  SCALE_KEYS=${SCALE_KEYS:-10000 100000 1000000 10000000} CONNS_MANY=${CONNS_MANY:-1000}
  N_CONNS=${N_CONNS:-200000}
  CL_N=${CL_N:-1000000} CL_ECON_N=1000000
fi
for var in ROUNDS N_P1 N_P16 N_MGET_P1 N_MGET_P16 CONNS_MANY N_CONNS CL_N; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || {
    echo "bench.sh: $var must be a positive integer" >&2
    exit 2
  }
done
[[ "$SCALE_KEYS" =~ ^[1-9][0-9]*( [1-9][0-9]*)*$ ]] || {
  echo "bench.sh: SCALE_KEYS must be positive integers separated by spaces" >&2
  exit 2
}
BENCH_TIMEOUT=600 # seconds, per redis-benchmark run
CLI_TIMEOUT=20    # seconds, per redis-cli call

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
cli() { timeout "$CLI_TIMEOUT" redis-cli -h 127.0.0.1 "$@"; }

# ---------------------------------------------------------------------------------------------
# Dependencies and build
# ---------------------------------------------------------------------------------------------
scripts/ensure-deps.sh --bench
for tool in redis-server redis-cli redis-benchmark nutcracker timeout awk curl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done
TALLY_BIN_GIVEN=${TALLY_BIN:-}
if [[ -n "$TALLY_BIN_GIVEN" ]]; then
  TALLY_BIN=$(realpath "$TALLY_BIN")
  log "measuring $TALLY_BIN (TALLY_BIN), not a release build"
else
  log "cargo build --release (may wait for the shared build directory lock)"
  cargo build --release
  TALLY_BIN=$PWD/target/release/tallyproxy
fi
[[ -x "$TALLY_BIN" ]] || die "$TALLY_BIN was not built"

# ---------------------------------------------------------------------------------------------
# Processes: every one started is recorded and stopped by PID on exit
# ---------------------------------------------------------------------------------------------
WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/tallybench.XXXXXX")
declare -A PROC_NAME=() # pid -> name, for the processes still running
FINISHED=0

alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null || true)
  [[ "$state" != "Z" ]]
}

# stop_pid PID [TENTHS]: SIGTERM, wait up to TENTHS/10 s (default 10 s), then SIGKILL.
# Sets STOP_RC to the exit status and STOP_FORCED to 1 when SIGKILL was needed.
stop_pid() {
  local pid=$1 tenths=${2:-100} i
  STOP_FORCED=0
  STOP_RC=0
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < tenths; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "${PROC_NAME[$pid]:-pid $pid} did not exit after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      STOP_FORCED=1
    fi
  fi
  wait "$pid" 2>/dev/null || STOP_RC=$?
  unset "PROC_NAME[$pid]"
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  # Proxies first (tallyproxy flushes to the shards on SIGTERM), then the shards.
  for pid in "${TALLY_PID:-}" "${TWEM_PID:-}"; do
    [[ -n "$pid" && -n "${PROC_NAME[$pid]:-}" ]] && stop_pid "$pid" 150
  done
  for pid in "${!PROC_NAME[@]}"; do
    stop_pid "$pid" 50
  done
  if ((rc == 0 && FINISHED)); then
    rm -rf "$WORK"
  else
    log "exit status $rc; logs and configs kept in $WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in $REDIS_A $REDIS_B $TWEM_PORT $TWEM_STATS $TALLY_PORT $TALLY_HTTP; do
  port_in_use "$port" && die "port $port on 127.0.0.1 is already in use; stop whatever listens there"
done

# wait_ready PID NAME PORT LOG: until PORT answers PING (at most 10 s), or the process dies.
wait_ready() {
  local pid=$1 name=$2 port=$3 logf=$4 i
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || {
      tail -n 20 "$logf" >&2 || true
      die "$name exited during start-up (log: $logf)"
    }
    [[ "$(cli -p "$port" PING 2>/dev/null || true)" == "PONG" ]] && return 0
    sleep 0.1
  done
  tail -n 20 "$logf" >&2 || true
  die "$name did not answer PING on port $port within 10 s (log: $logf)"
}

start_redis() {
  local port=$1 dir pid
  dir="$WORK/redis-$port"
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly no \
    --logfile "$dir/redis.log" --daemonize no &
  pid=$!
  PROC_NAME[$pid]="redis-server:$port"
  wait_ready "$pid" "redis-server:$port" "$port" "$dir/redis.log"
  REDIS_PIDS+=("$pid")
}

start_twemproxy() {
  local conf="$WORK/twemproxy.yml"
  cat >"$conf" <<EOF
bench:
  listen: 127.0.0.1:$TWEM_PORT
  hash: fnv1a_64
  distribution: ketama
  redis: true
  auto_eject_hosts: false
  preconnect: true
  timeout: 2000
  servers:
   - 127.0.0.1:$REDIS_A:1
   - 127.0.0.1:$REDIS_B:1
EOF
  nutcracker -t -c "$conf" >"$WORK/twemproxy-test.log" 2>&1 ||
    die "nutcracker rejects $conf: $(cat "$WORK/twemproxy-test.log")"
  nutcracker -c "$conf" -s "$TWEM_STATS" -a 127.0.0.1 -o "$WORK/twemproxy.log" \
    -p "$WORK/twemproxy.pid" &
  TWEM_PID=$!
  PROC_NAME[$TWEM_PID]="twemproxy"
  wait_ready "$TWEM_PID" twemproxy "$TWEM_PORT" "$WORK/twemproxy.log"
}

# write_tally_conf NAME FLUSH_INTERVAL DURABILITY(on|off) FSYNC MAX_PENDING_KEYS
# Sets TALLY_CONF. Each config gets a fresh WAL directory (and so a fresh proxy id).
TALLY_STARTS=0
write_tally_conf() {
  local name=$1 flush=$2 wal=$3 fsync=$4 max_pending=$5 conf
  TALLY_STARTS=$((TALLY_STARTS + 1))
  conf="$WORK/tallyproxy-$TALLY_STARTS-$name.toml"
  cat >"$conf" <<EOF
# scripts/bench.sh: $name
listen = "127.0.0.1:$TALLY_PORT"
http_listen = "127.0.0.1:$TALLY_HTTP"

[[shards]]
addr = "127.0.0.1:$REDIS_A"

[[shards]]
addr = "127.0.0.1:$REDIS_B"

[counters]
cache_ttl = "5s"
flush_interval = "$flush"
max_pending_keys = $max_pending

[durability]
enabled = $([[ $wal == on ]] && echo true || echo false)
wal_dir = "$WORK/wal-$TALLY_STARTS"
fsync = "$fsync"
EOF
  "$TALLY_BIN" --config "$conf" --check >/dev/null || die "tallyproxy rejects $conf"
  TALLY_CONF=$conf
}

start_tally() {
  local conf=$1 logf="${1%.toml}.log" i
  "$TALLY_BIN" --config "$conf" 2>"$logf" &
  TALLY_PID=$!
  PROC_NAME[$TALLY_PID]="tallyproxy"
  wait_ready "$TALLY_PID" tallyproxy "$TALLY_PORT" "$logf"
  # Both shards reachable through the proxy before measuring.
  for ((i = 0; i < 50; i++)); do
    [[ $(cli -p "$TALLY_PORT" INFO shards 2>/dev/null | grep -c 'status=up') -ge 2 ]] && return 0
    sleep 0.1
  done
  cli -p "$TALLY_PORT" INFO shards >&2 || true
  die "tallyproxy does not see both shards up (log: $logf)"
}

# stop_tally: SIGTERM and wait for the orderly exit (it flushes); reports a forced kill.
stop_tally() {
  local pid=${TALLY_PID:-}
  [[ -n "$pid" && -n "${PROC_NAME[$pid]:-}" ]] || return 0
  stop_pid "$pid" 300
  TALLY_PID=
  if ((STOP_FORCED)); then
    log "WARNING: tallyproxy needed SIGKILL; its final flush did not complete"
  elif ((STOP_RC != 0)); then
    log "WARNING: tallyproxy exited with status $STOP_RC"
  fi
}

info_field() { # info_field PORT SECTION FIELD
  cli -p "$1" INFO "$2" | tr -d '\r' | awk -F: -v f="$3" '$1 == f {print $2; exit}'
}

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# ---------------------------------------------------------------------------------------------
# redis-benchmark runs
# ---------------------------------------------------------------------------------------------
MGET_ARGS=(MGET)
for _ in 1 2 3 4 5 6 7 8 9 10; do MGET_ARGS+=("counter:__rand_int__"); done

# Workloads, in run order (INCR first so the GET/MGET keys exist): label|pipeline|n|command.
# "-t incr" is redis-benchmark's INCR test: INCR counter:__rand_int__.
WORKLOADS=(
  "INCR -P 1|1|$N_P1|-t incr"
  "GET -P 1|1|$N_P1|GET counter:__rand_int__"
  "MGET x10 -P 1|1|$N_MGET_P1|${MGET_ARGS[*]}"
  "INCR -P 16|16|$N_P16|-t incr"
  "GET -P 16|16|$N_P16|GET counter:__rand_int__"
  "MGET x10 -P 16|16|$N_MGET_P16|${MGET_ARGS[*]}"
)
TARGETS=(redis twemproxy tallyproxy)
declare -A TARGET_PORT=([redis]=$REDIS_A [twemproxy]=$TWEM_PORT [tallyproxy]=$TALLY_PORT)

RAW="$WORK/raw.csv" # round,workload,target,rps,p50,p99
: >"$RAW"

# bench PORT PIPELINE N KEYSPACE COMMAND... -> prints "rps p50 p99"
bench() {
  local port=$1 pipeline=$2 n=$3 keyspace=$4 out line
  shift 4
  out=$(timeout "$BENCH_TIMEOUT" redis-benchmark -h 127.0.0.1 -p "$port" -c "${CLIENTS}" \
    -r "$keyspace" -n "$n" -P "$pipeline" --csv "$@" 2>>"$WORK/redis-benchmark.stderr") ||
    die "redis-benchmark -p $port -P $pipeline $* failed or timed out: $out"
  line=$(printf '%s\n' "$out" | grep -v '^"test"' | grep '^"' | tail -n 1 || true)
  [[ -n "$line" ]] || die "no CSV result from redis-benchmark -p $port $*: $out"
  # "test","rps","avg","min","p50","p95","p99","max" (the test name has no comma)
  printf '%s\n' "$line" | awk -F, '{gsub(/"/, ""); print $2, $5, $7}'
}

sanity_check() { # the three commands answer sensibly through a target
  local name=$1 port=$2 v
  v=$(cli -p "$port" INCR counter:bench-sanity) || die "$name: INCR failed"
  [[ "$v" =~ ^[0-9]+$ ]] || die "$name: INCR answered '$v'"
  v=$(cli -p "$port" GET counter:bench-sanity) || die "$name: GET failed"
  [[ "$v" =~ ^[0-9]+$ ]] || die "$name: GET answered '$v'"
  v=$(cli -p "$port" MGET counter:bench-sanity counter:bench-none | head -n 1) ||
    die "$name: MGET failed"
  [[ "$v" =~ ^[0-9]+$ ]] || die "$name: MGET answered '$v'"
}

median() { # numbers on stdin -> median (mean of the middle two for an even count)
  sort -g | awk '{v[NR] = $1} END {
    if (NR == 0) { print "n/a"; exit }
    if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
med_of() { # med_of FILE WORKLOAD TARGET COLUMN(4=rps,5=p50,6=p99)
  awk -F, -v w="$2" -v t="$3" -v c="$4" '$2 == w && $3 == t {print $c}' "$1" | median
}
fmt_rps() { awk -v x="$1" 'BEGIN { if (x == "n/a") print x; else printf "%.0f", x }'; }
fmt_ms() { awk -v x="$1" 'BEGIN { if (x == "n/a") print x; else printf "%.3f", x }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }

# shellcheck source=scripts/bench-cluster.sh
source scripts/bench-cluster.sh
REDIS_PIDS=()
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "work dir $WORK"

if ((RUN_MAIN)); then
# ---------------------------------------------------------------------------------------------
# 1. Side by side
# ---------------------------------------------------------------------------------------------
start_redis "$REDIS_A"
start_redis "$REDIS_B"
start_twemproxy
write_tally_conf main 30s on everysec 100000
start_tally "$TALLY_CONF"
for t in "${TARGETS[@]}"; do sanity_check "$t" "${TARGET_PORT[$t]}"; done

log "side by side: $ROUNDS round(s) x ${#WORKLOADS[@]} workloads x ${#TARGETS[@]} targets"
for ((round = 1; round <= ROUNDS; round++)); do
  # Rotate the target order each round so none is always first after a given workload switch.
  order=()
  for ((i = 0; i < ${#TARGETS[@]}; i++)); do
    order+=("${TARGETS[$(((i + round - 1) % ${#TARGETS[@]}))]}")
  done
  for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r label pipeline n cmd <<<"$w"
    read -ra cmd_args <<<"$cmd"
    for t in "${order[@]}"; do
      t0=$(date +%s.%N)
      res=$(bench "${TARGET_PORT[$t]}" "$pipeline" "$n" "$KEYSPACE" "${cmd_args[@]}")
      read -r rps p50 p99 <<<"$res"
      echo "$round,$label,$t,$rps,$p50,$p99" >>"$RAW"
      log "round $round  $label  $t: $rps rps, p50 $p50 ms, p99 $p99 ms ($(elapsed "$t0") s)"
    done
  done
done
stop_tally

MAIN_TABLE="$WORK/main.md"
{
  echo "| Workload | Redis rps | twemproxy rps | tallyproxy rps | tallyproxy/Redis | tallyproxy/twemproxy | Redis p50/p99 ms | twemproxy p50/p99 ms | tallyproxy p50/p99 ms |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r label pipeline _ _ <<<"$w"
    r=$(med_of "$RAW" "$label" redis 4)
    tw=$(med_of "$RAW" "$label" twemproxy 4)
    ta=$(med_of "$RAW" "$label" tallyproxy 4)
    lat=()
    for t in "${TARGETS[@]}"; do
      if ((pipeline == 1)); then
        lat+=("$(fmt_ms "$(med_of "$RAW" "$label" "$t" 5)") / $(fmt_ms "$(med_of "$RAW" "$label" "$t" 6)")")
      else
        lat+=("-")
      fi
    done
    echo "| $label | $(fmt_rps "$r") | $(fmt_rps "$tw") | $(fmt_rps "$ta") | $(ratio "$ta" "$r") | $(ratio "$ta" "$tw") | ${lat[0]} | ${lat[1]} | ${lat[2]} |"
  done
} >"$MAIN_TABLE"

# ---------------------------------------------------------------------------------------------
# 2. Durability cost: INCR through tallyproxy with the log off, fsync everysec, fsync always
# ---------------------------------------------------------------------------------------------
DUR_MODES=("off|off|everysec" "everysec|on|everysec" "always|on|always")
DUR_RAW="$WORK/durability.csv" # round,mode,P,rps,p50,p99
: >"$DUR_RAW"
log "durability cost: $ROUNDS round(s) x ${#DUR_MODES[@]} modes (tallyproxy restarted for each)"
for ((round = 1; round <= ROUNDS; round++)); do
  for m in "${DUR_MODES[@]}"; do
    IFS='|' read -r mode wal fsync <<<"$m"
    write_tally_conf "durability-$mode" 30s "$wal" "$fsync" 100000
    start_tally "$TALLY_CONF"
    for p in 16 1; do
      if ((p == 16)); then n=$N_P16; else n=$N_P1; fi
      t0=$(date +%s.%N)
      res=$(bench "$TALLY_PORT" "$p" "$n" "$KEYSPACE" -t incr)
      read -r rps p50 p99 <<<"$res"
      echo "$round,$mode,$p,$rps,$p50,$p99" >>"$DUR_RAW"
      log "round $round  durability $mode  INCR -P $p: $rps rps, p50 $p50 ms, p99 $p99 ms ($(elapsed "$t0") s)"
    done
    stop_tally
  done
done
DUR_TABLE="$WORK/durability.md"
{
  echo "| tallyproxy WAL | INCR -P 16 rps | vs log off | INCR -P 1 rps | INCR -P 1 p50/p99 ms |"
  echo "|---|---:|---:|---:|---:|"
  off16=$(awk -F, '$2 == "off" && $3 == 16 {print $4}' "$DUR_RAW" | median)
  for m in "${DUR_MODES[@]}"; do
    IFS='|' read -r mode _ _ <<<"$m"
    r16=$(awk -F, -v m="$mode" '$2 == m && $3 == 16 {print $4}' "$DUR_RAW" | median)
    r1=$(awk -F, -v m="$mode" '$2 == m && $3 == 1 {print $4}' "$DUR_RAW" | median)
    p50=$(awk -F, -v m="$mode" '$2 == m && $3 == 1 {print $5}' "$DUR_RAW" | median)
    p99=$(awk -F, -v m="$mode" '$2 == m && $3 == 1 {print $6}' "$DUR_RAW" | median)
    case "$mode" in
      off) desc="\`enabled = false\`" ;;
      *) desc="\`fsync = \"$mode\"\`" ;;
    esac
    echo "| $desc | $(fmt_rps "$r16") | $(ratio "$r16" "$off16") | $(fmt_rps "$r1") | $(fmt_ms "$p50") / $(fmt_ms "$p99") |"
  done
} >"$DUR_TABLE"

# ---------------------------------------------------------------------------------------------
# 3. Backend economy: what ECON_N INCRs over ECON_KEYS keys cost the shards
# ---------------------------------------------------------------------------------------------
log "economy: $ECON_N INCRs over $ECON_KEYS keys, default 30 s flush interval, then SIGTERM"
for port in $REDIS_A $REDIS_B; do cli -p "$port" FLUSHALL >/dev/null; done
write_tally_conf economy 30s on everysec 100000
start_tally "$TALLY_CONF"
for port in $REDIS_A $REDIS_B; do cli -p "$port" CONFIG RESETSTAT >/dev/null; done
econ_start=$(date +%s.%N)
res=$(bench "$TALLY_PORT" 16 "$ECON_N" "$ECON_KEYS" -t incr)
read -r econ_rps _ _ <<<"$res"
econ_secs=$(elapsed "$econ_start")
econ_received=$(info_field "$TALLY_PORT" counters increments_received)
econ_flushes_before_stop=$(info_field "$TALLY_PORT" counters flushes)
stop_tally
econ_clean=$((STOP_FORCED == 0 && STOP_RC == 0))
# collect_commandstats FILE: both shards' INFO commandstats into FILE, which cmd_calls reads.
# INFO does not count itself; CONFIG RESETSTAT counts itself once (after the reset).
collect_commandstats() {
  ECON_STATS=$1
  : >"$ECON_STATS"
  for port in $REDIS_A $REDIS_B; do
    cli -p "$port" INFO commandstats | tr -d '\r' | grep '^cmdstat_' |
      sed "s/^/$port /" >>"$ECON_STATS"
  done
}
collect_commandstats "$WORK/commandstats.txt"
cmd_calls() { # cmd_calls NAME -> calls summed over both shards (NAME "*" = all)
  awk -v c="$1" '{
    split($2, a, ":"); name = substr(a[1], 9)
    if (c != "*" && name != c) next
    if (match($2, /calls=[0-9]+/)) s += substr($2, RSTART + 6, RLENGTH - 6)
  } END { print s + 0 }' "$ECON_STATS"
}
# all_calls: every command but the script's own INFO and CONFIG RESETSTAT.
all_calls() { echo $(($(cmd_calls '*') - $(cmd_calls 'config|resetstat') - $(cmd_calls info))); }
# calls_breakdown: "name=calls ..." for those commands.
calls_breakdown() {
  awk '{split($2, a, ":"); name = substr(a[1], 9)
    if (name == "config|resetstat" || name == "info") next
    match($2, /calls=[0-9]+/); s[name] += substr($2, RSTART + 6, RLENGTH - 6)}
  END {for (n in s) printf "%s=%d\n", n, s[n]}' "$ECON_STATS" | sort | paste -sd' ' -
}
econ_total=$(all_calls)
econ_eval=$(cmd_calls eval)
econ_incrby=$(cmd_calls incrby)
econ_breakdown=$(calls_breakdown)
# What landed: the sum of every counter on both shards (read after the stats above).
econ_landed=0
for port in $REDIS_A $REDIS_B; do
  v=$(cli -p "$port" EVAL "local s = 0 for _, k in ipairs(redis.call('KEYS', 'counter:*')) do s = s + tonumber(redis.call('GET', k)) end return s" 0)
  econ_landed=$((econ_landed + v))
done
per() { awk -v n="$1" -v w="$2" 'BEGIN { if (w + 0 == 0) print "n/a"; else printf "%.1f", n / w }'; }
econ_merge=$(per "$ECON_N" "$econ_incrby")
((econ_landed == ECON_N)) || log "WARNING: the shards hold $econ_landed increments, expected $ECON_N"

# ---------------------------------------------------------------------------------------------
# 3b. Time windows: INCR of windowed keys (visits:*, the default [windows] match) next to
#     INCR of plain counter keys, on the same proxy; then the economy run on windowed keys
# ---------------------------------------------------------------------------------------------
WIN_RAW="$WORK/windows.csv" # round,kind,P,rps,p50,p99
: >"$WIN_RAW"
log "time windows: $ROUNDS round(s), INCR counter:* vs INCR visits:* (windowed), -P 16 and -P 1"
for ((round = 1; round <= ROUNDS; round++)); do
  write_tally_conf "windows" 30s on everysec 100000
  start_tally "$TALLY_CONF"
  for p in 16 1; do
    if ((p == 16)); then n=$N_P16; else n=$N_P1; fi
    kinds=(plain windowed)
    ((round % 2 == 0)) && kinds=(windowed plain)
    for kind in "${kinds[@]}"; do
      key="counter:__rand_int__"
      [[ $kind == windowed ]] && key="visits:__rand_int__"
      res=$(bench "$TALLY_PORT" "$p" "$n" "$KEYSPACE" INCR "$key")
      read -r rps p50 p99 <<<"$res"
      echo "$round,$kind,$p,$rps,$p50,$p99" >>"$WIN_RAW"
      log "round $round  windows $kind  INCR -P $p: $rps rps, p50 $p50 ms, p99 $p99 ms"
    done
  done
  stop_tally
done
WIN_TABLE="$WORK/windows.md"
{
  echo "| keys | INCR -P 16 rps | vs plain | INCR -P 1 rps | vs plain | INCR -P 1 p50/p99 ms |"
  echo "|---|---:|---:|---:|---:|---:|"
  plain16=$(awk -F, '$2 == "plain" && $3 == 16 {print $4}' "$WIN_RAW" | median)
  plain1=$(awk -F, '$2 == "plain" && $3 == 1 {print $4}' "$WIN_RAW" | median)
  for kind in plain windowed; do
    r16=$(awk -F, -v k="$kind" '$2 == k && $3 == 16 {print $4}' "$WIN_RAW" | median)
    r1=$(awk -F, -v k="$kind" '$2 == k && $3 == 1 {print $4}' "$WIN_RAW" | median)
    p50=$(awk -F, -v k="$kind" '$2 == k && $3 == 1 {print $5}' "$WIN_RAW" | median)
    p99=$(awk -F, -v k="$kind" '$2 == k && $3 == 1 {print $6}' "$WIN_RAW" | median)
    desc="\`counter:*\` (not windowed)"
    [[ $kind == windowed ]] && desc="\`visits:*\` (windowed)"
    echo "| $desc | $(fmt_rps "$r16") | $(ratio "$r16" "$plain16") | $(fmt_rps "$r1") | $(ratio "$r1" "$plain1") | $(fmt_ms "$p50") / $(fmt_ms "$p99") |"
  done
} >"$WIN_TABLE"

log "windows economy: $ECON_N INCRs over $ECON_KEYS windowed keys, 30 s flush interval, then SIGTERM"
for port in $REDIS_A $REDIS_B; do cli -p "$port" FLUSHALL >/dev/null; done
write_tally_conf windows-economy 30s on everysec 100000
start_tally "$TALLY_CONF"
for port in $REDIS_A $REDIS_B; do cli -p "$port" CONFIG RESETSTAT >/dev/null; done
win_start=$(date +%s.%N)
res=$(bench "$TALLY_PORT" 16 "$ECON_N" "$ECON_KEYS" INCR "visits:__rand_int__")
read -r win_rps _ _ <<<"$res"
win_secs=$(elapsed "$win_start")
win_received=$(info_field "$TALLY_PORT" counters increments_received)
win_flushes_before_stop=$(info_field "$TALLY_PORT" counters flushes)
stop_tally
win_clean=$((STOP_FORCED == 0 && STOP_RC == 0))
collect_commandstats "$WORK/commandstats-windows.txt"
win_total=$(all_calls)
win_eval=$(cmd_calls eval)
win_incrby=$(cmd_calls incrby)
win_hincrby=$(cmd_calls hincrby)
win_hmget=$(cmd_calls hmget)
win_expireat=$(cmd_calls expireat)
win_hdel=$(cmd_calls hdel)
# The flushes' own commands: the writes and the watermark's HGET/HSET per write batch. Each
# lane counts a flush pass, so a flush of both shards is 2; the final flush at SIGTERM is 1
# more per shard.
win_flush_cmds=$((win_incrby + win_hincrby + win_hmget + win_expireat + win_hdel + $(cmd_calls persist) + $(cmd_calls hget) + $(cmd_calls hset)))
win_flushes=$(((win_flushes_before_stop + 2) / 2))
win_breakdown=$(calls_breakdown)
# What landed: the totals, and the per-day buckets (every increment counts into one day).
win_landed=0
win_days=0
for port in $REDIS_A $REDIS_B; do
  v=$(cli -p "$port" EVAL "local s = 0 for _, k in ipairs(redis.call('KEYS', 'visits:*')) do s = s + tonumber(redis.call('GET', k)) end return s" 0)
  d=$(cli -p "$port" EVAL "local s = 0 for _, k in ipairs(redis.call('KEYS', 'tally:win:*')) do local f = redis.call('HGETALL', k) for i = 1, #f, 2 do if string.match(f[i], '^d%d+$') then s = s + tonumber(f[i + 1]) end end end return s" 0)
  win_landed=$((win_landed + v))
  win_days=$((win_days + d))
done
((win_landed == ECON_N)) || log "WARNING: the shards hold $win_landed windowed increments, expected $ECON_N"
((win_days == ECON_N)) || log "WARNING: the day buckets hold $win_days increments, expected $ECON_N"

# Steady state: flushes every second while the load runs, so the keys' window hashes already
# exist (and past seconds get trimmed once a tenth of their retention has piled up).
log "windows economy, steady state: $STEADY_N INCRs over $ECON_KEYS windowed keys, 1 s flush interval"
for port in $REDIS_A $REDIS_B; do cli -p "$port" FLUSHALL >/dev/null; done
write_tally_conf windows-steady 1s on everysec 100000
start_tally "$TALLY_CONF"
# Every key once, so that the measured flushes write existing buckets of existing keys.
bench "$TALLY_PORT" 16 "$ECON_KEYS" "$ECON_KEYS" INCR "visits:__rand_int__" >/dev/null
cli -p "$TALLY_PORT" PING >/dev/null
curl -fsS -m 60 -X POST "http://127.0.0.1:$TALLY_HTTP/admin/flush" >/dev/null ||
  die "POST /admin/flush failed"
for port in $REDIS_A $REDIS_B; do cli -p "$port" CONFIG RESETSTAT >/dev/null; done
steady_before=$(info_field "$TALLY_PORT" counters flushes)
res=$(bench "$TALLY_PORT" 16 "$STEADY_N" "$ECON_KEYS" INCR "visits:__rand_int__")
read -r steady_rps _ _ <<<"$res"
steady_passes=$(($(info_field "$TALLY_PORT" counters flushes) - steady_before))
stop_tally
collect_commandstats "$WORK/commandstats-windows-steady.txt"
steady_incrby=$(cmd_calls incrby)
steady_flush_cmds=$((steady_incrby + $(cmd_calls hincrby) + $(cmd_calls hmget) + $(cmd_calls expireat) + $(cmd_calls hdel) + $(cmd_calls persist) + $(cmd_calls hget) + $(cmd_calls hset)))
steady_breakdown=$(calls_breakdown)
# Distinct keys written per flush, summed over the flushes = the INCRBYs (one per key and flush).
# Three decimals: the target is 3, and the watermark's two commands per batch are a few
# thousandths of a command per key.
per3() { awk -v n="$1" -v w="$2" 'BEGIN { if (w + 0 == 0) print "n/a"; else printf "%.3f", n / w }'; }
steady_per_key=$(per3 "$steady_flush_cmds" "$steady_incrby")
win_per_key=$(per3 "$win_flush_cmds" "$win_incrby")

# ---------------------------------------------------------------------------------------------
# 4. Memory per pending key: MEM_KEYS distinct keys, one INCR each, nothing flushed
# ---------------------------------------------------------------------------------------------
MEM_CONNS=8 # parallel redis-cli --pipe connections, key i on connection i % MEM_CONNS
# load_distinct NAME N FORMAT FIRST: one INCR of each of N distinct keys (awk's sprintf of
# FORMAT with FIRST .. FIRST + N - 1), key i on connection i % MEM_CONNS, through MEM_CONNS
# parallel `redis-cli --pipe` into the running tallyproxy. Sets LOAD_SECS (wall time of the
# pipes) and LOAD_SUMMARY (their errors and replies).
load_distinct() {
  local name=$1 n=$2 format=$3 first=$4 c pid failed=0 t0
  local pids=()
  for ((c = 0; c < MEM_CONNS; c++)); do
    awk -v n="$n" -v c="$c" -v m="$MEM_CONNS" -v f="$format" -v s="$first" 'BEGIN {
      for (i = c; i < n; i += m) { k = sprintf(f, s + i); printf "*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n", length(k), k }
    }' >"$WORK/$name-$c.resp"
  done
  t0=$(date +%s.%N)
  for ((c = 0; c < MEM_CONNS; c++)); do
    timeout "$BENCH_TIMEOUT" redis-cli -h 127.0.0.1 -p "$TALLY_PORT" --pipe \
      <"$WORK/$name-$c.resp" >"$WORK/$name-pipe-$c.out" 2>&1 &
    pids+=($!)
    PROC_NAME[$!]="redis-cli --pipe $c"
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
    unset "PROC_NAME[$pid]"
  done
  ((failed == 0)) || die "redis-cli --pipe failed or timed out: $(cat "$WORK/$name"-pipe-*.out)"
  LOAD_SECS=$(elapsed "$t0")
  LOAD_SUMMARY=$(cat "$WORK/$name"-pipe-*.out | awk '/errors: [0-9]+, replies: [0-9]+/ {
      gsub(/,/, ""); e += $2; r += $4 } END { printf "errors: %d, replies: %d", e, r }')
  rm -f "$WORK/$name"-*.resp
}
log "memory: $MEM_KEYS INCRs on $MEM_KEYS distinct keys over $MEM_CONNS pipes, flush interval 1h"
for port in $REDIS_A $REDIS_B; do cli -p "$port" FLUSHALL >/dev/null; done
write_tally_conf memory 1h on everysec $((MEM_KEYS * 2))
start_tally "$TALLY_CONF"
cli -p "$TALLY_PORT" PING >/dev/null
sleep 1
mem_rss_before=$(rss_kb "$TALLY_PID")
load_distinct memory "$MEM_KEYS" "k:%d" 1
mem_secs=$LOAD_SECS
pipe_summary=$LOAD_SUMMARY
sleep 1
mem_rss_after=$(rss_kb "$TALLY_PID")
mem_pending=$(info_field "$TALLY_PORT" counters pending_keys)
mem_received=$(info_field "$TALLY_PORT" counters increments_received)
mem_flushes=$(info_field "$TALLY_PORT" counters flushes)
stop_tally
mem_per_key=$(awk -v a="$mem_rss_before" -v b="$mem_rss_after" -v n="$MEM_KEYS" 'BEGIN {printf "%.0f", (b - a) * 1024 / n}')
mem_per_pending=$(awk -v a="$mem_rss_before" -v b="$mem_rss_after" -v n="$mem_pending" 'BEGIN { if (n + 0 == 0) print "n/a"; else printf "%.0f", (b - a) * 1024 / n }')
((mem_pending == MEM_KEYS)) || log "WARNING: pending_keys is $mem_pending, expected $MEM_KEYS"

# ---------------------------------------------------------------------------------------------
# 5. Scale: K distinct pending keys (K = 10k .. 10M): RSS per key, the time of one full flush,
#    INCR throughput while that flush runs against the same proxy idle
# ---------------------------------------------------------------------------------------------
SCALE_RAW="$WORK/scale.csv" # keys,rss_before_kb,rss_after_kb,pending,load_s,flush_s,idle_rps,flushing_rps
: >"$SCALE_RAW"
# incr_rate SECONDS: client INCRs per second the proxy received over SECONDS (INFO counters),
# while a background redis-benchmark keeps it busy.
incr_rate() {
  local a b t0
  a=$(info_field "$TALLY_PORT" counters increments_received)
  t0=$(date +%s.%N)
  sleep "$1"
  b=$(info_field "$TALLY_PORT" counters increments_received)
  awk -v a="$a" -v b="$b" -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN {printf "%.0f", (b - a) / (t1 - t0)}'
}
# start_load KEYS: INCR of s:<12 digits> over KEYS keys (redis-benchmark's __rand_int__
# format, so it hits the loaded keys), -P 16, until stop_load.
start_load() {
  timeout "$BENCH_TIMEOUT" redis-benchmark -h 127.0.0.1 -p "$TALLY_PORT" -c "$CLIENTS" -P 16 \
    -r "$1" -n 2000000000 INCR "s:__rand_int__" >/dev/null 2>&1 &
  LOAD_PID=$!
  PROC_NAME[$LOAD_PID]="redis-benchmark load"
}
stop_load() {
  stop_pid "$LOAD_PID" 50
}
for keys in $SCALE_KEYS; do
  log "scale: $keys distinct keys over $MEM_CONNS pipes, then one full flush under INCR load"
  for port in $REDIS_A $REDIS_B; do cli -p "$port" FLUSHALL >/dev/null; done
  write_tally_conf "scale-$keys" 1h on everysec $((keys * 2))
  start_tally "$TALLY_CONF"
  sleep 1
  rss_before=$(rss_kb "$TALLY_PID")
  load_distinct scale "$keys" "s:%012d" 0
  load_s=$LOAD_SECS
  sleep 1
  rss_after=$(rss_kb "$TALLY_PID")
  pending=$(info_field "$TALLY_PORT" counters pending_keys)
  ((pending == keys)) || log "WARNING: pending_keys is $pending, expected $keys"
  start_load "$keys"
  sleep 1
  idle_rps=$(incr_rate 3)
  a=$(info_field "$TALLY_PORT" counters increments_received)
  t0=$(date +%s.%N)
  curl -fsS -m "$BENCH_TIMEOUT" -X POST "http://127.0.0.1:$TALLY_HTTP/admin/flush" >/dev/null ||
    log "WARNING: POST /admin/flush did not report success"
  flush_s=$(awk -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN {printf "%.3f", t1 - t0}')
  b=$(info_field "$TALLY_PORT" counters increments_received)
  flushing_rps=$(awk -v a="$a" -v b="$b" -v s="$flush_s" 'BEGIN {printf "%.0f", (b - a) / s}')
  stop_load
  stop_tally
  echo "$keys,$rss_before,$rss_after,$pending,$load_s,$flush_s,$idle_rps,$flushing_rps" >>"$SCALE_RAW"
  log "scale $keys: rss $rss_before -> $rss_after kB, load ${load_s} s, flush ${flush_s} s, INCR idle $idle_rps / flushing $flushing_rps rps"
done
SCALE_TABLE="$WORK/scale.md"
{
  echo "| pending keys | load (s) | VmRSS before / after (kB) | bytes per key (target <= 150) | one full flush (s) | INCR -P 16 idle (rps) | INCR while flushing (rps) | flushing / idle (target >= 0.8) |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk -F, '{
    per = ($3 - $2) * 1024 / $1
    r = ($7 > 0) ? sprintf("%.2f", $8 / $7) : "n/a"
    note = ($6 < 0.5) ? " (flush under 0.5 s: noise)" : ""
    printf "| %d | %s | %d / %d | %.0f | %s | %d | %d | %s%s |\n", $1, $5, $2, $3, per, $6, $7, $8, r, note
  }' "$SCALE_RAW"
} >"$SCALE_TABLE"

# ---------------------------------------------------------------------------------------------
# 6. Many clients: CONNS_MANY connections at -P 1, direct Redis and tallyproxy interleaved
# ---------------------------------------------------------------------------------------------
CONNS_RAW="$WORK/conns.csv" # round,workload,target,rps,p50,p99
: >"$CONNS_RAW"
write_tally_conf conns 30s on everysec 100000
start_tally "$TALLY_CONF"
log "many clients: $CONNS_MANY connections, $ROUNDS round(s), INCR and GET -P 1"
for ((round = 1; round <= ROUNDS; round++)); do
  for w in "INCR|-t incr" "GET|GET counter:__rand_int__"; do
    IFS='|' read -r label cmd <<<"$w"
    read -ra cmd_args <<<"$cmd"
    order=(redis tallyproxy)
    ((round % 2 == 0)) && order=(tallyproxy redis)
    for t in "${order[@]}"; do
      res=$(CLIENTS=$CONNS_MANY bench "${TARGET_PORT[$t]}" 1 "$N_CONNS" "$KEYSPACE" "${cmd_args[@]}")
      read -r rps p50 p99 <<<"$res"
      echo "$round,$label,$t,$rps,$p50,$p99" >>"$CONNS_RAW"
      log "round $round  $CONNS_MANY clients  $label  $t: $rps rps, p50 $p50 ms, p99 $p99 ms"
    done
  done
done
conns_rss=$(rss_kb "$TALLY_PID")
stop_tally
# The shards of sections 1-6 are done with (the cluster run has its own servers).
for pid in "${REDIS_PIDS[@]}"; do stop_pid "$pid" 50; done
CONNS_TABLE="$WORK/conns.md"
{
  echo "| Workload ($CONNS_MANY clients, -P 1) | Redis rps | tallyproxy rps | tallyproxy/Redis | Redis p50/p99 ms | tallyproxy p50/p99 ms |"
  echo "|---|---:|---:|---:|---:|---:|"
  for label in INCR GET; do
    r=$(med_of "$CONNS_RAW" "$label" redis 4)
    ta=$(med_of "$CONNS_RAW" "$label" tallyproxy 4)
    echo "| $label | $(fmt_rps "$r") | $(fmt_rps "$ta") | $(ratio "$ta" "$r") | $(fmt_ms "$(med_of "$CONNS_RAW" "$label" redis 5)") / $(fmt_ms "$(med_of "$CONNS_RAW" "$label" redis 6)") | $(fmt_ms "$(med_of "$CONNS_RAW" "$label" tallyproxy 5)") / $(fmt_ms "$(med_of "$CONNS_RAW" "$label" tallyproxy 6)") |"
  done
} >"$CONNS_TABLE"

# ---------------------------------------------------------------------------------------------
# Targets of issue 20, each as a ratio next to its target
# ---------------------------------------------------------------------------------------------
TARGETS_TABLE="$WORK/targets.md"
# verdict VALUE OP TARGET -> "met" / "not met" / "n/a"
verdict() {
  awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
    if (v == "n/a" || v == "") { print "n/a"; exit }
    ok = (op == ">=") ? (v + 0 >= t + 0) : (v + 0 <= t + 0)
    print (ok ? "met" : "not met") }'
}
vs_redis() { ratio "$(med_of "$RAW" "$1" tallyproxy "$2")" "$(med_of "$RAW" "$1" redis "$2")"; }
last_scale=$(tail -n 1 "$SCALE_RAW")
IFS=, read -r sk srb sra _ _ _ sidle sflush <<<"$last_scale"
scale_per_key=$(awk -v a="$srb" -v b="$sra" -v n="$sk" 'BEGIN {printf "%.0f", (b - a) * 1024 / n}')
scale_ratio=$(ratio "$sflush" "$sidle")
win16=$(ratio "$(awk -F, '$2 == "windowed" && $3 == 16 {print $4}' "$WIN_RAW" | median)" \
  "$(awk -F, '$2 == "plain" && $3 == 16 {print $4}' "$WIN_RAW" | median)")
{
  echo "| Target | Measured | Target | |"
  echo "|---|---:|---:|---|"
  row() { echo "| $1 | $2 | $3 $4 | $(verdict "$2" "$3" "$4") |"; }
  row "INCR -P 16, tallyproxy / Redis rps" "$(vs_redis "INCR -P 16" 4)" ">=" 1.3
  row "GET -P 16, tallyproxy / Redis rps" "$(vs_redis "GET -P 16" 4)" ">=" 1.3
  row "MGET x10 -P 16, tallyproxy / Redis rps" "$(vs_redis "MGET x10 -P 16" 4)" ">=" 1.0
  row "INCR -P 1, tallyproxy / Redis rps" "$(vs_redis "INCR -P 1" 4)" ">=" 1.0
  row "GET -P 1, tallyproxy / Redis rps" "$(vs_redis "GET -P 1" 4)" ">=" 1.0
  row "INCR -P 1, tallyproxy / Redis p99" "$(vs_redis "INCR -P 1" 6)" "<=" 1.2
  row "GET -P 1, tallyproxy / Redis p99" "$(vs_redis "GET -P 1" 6)" "<=" 1.2
  row "windowed / plain INCR -P 16 rps" "$win16" ">=" 0.9
  row "windows: Redis commands per distinct key, one flush (economy run)" "$win_per_key" "<=" 3
  row "windows: Redis commands per distinct key and flush, steady state" "$steady_per_key" "<=" 3
  row "bytes per pending key at $sk keys" "$scale_per_key" "<=" 150
  row "INCR while one full flush of $sk keys runs / idle" "$scale_ratio" ">=" 0.8
} >"$TARGETS_TABLE"

fi # RUN_MAIN

# ---------------------------------------------------------------------------------------------
# 7. Redis Cluster: through tallyproxy next to redis-benchmark --cluster, and the economy
# ---------------------------------------------------------------------------------------------
run_cluster_bench

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
mkdir -p bench-results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
RESULT="bench-results/results-$stamp.md"
((SMOKE)) && RESULT="bench-results/results-$stamp-smoke.md"
wal_fs=$(df -T "$WORK" | awk 'NR == 2 {print $2}')
{
  echo "# tallyproxy side-by-side benchmark ($stamp)"
  echo
  if ((SMOKE)); then
    echo "**Smoke run** (\`--smoke\`): tiny runs that only prove the script works; the numbers mean nothing."
    echo
  fi
  echo "- Load average at start / end: $LOAD_START / $(cut -d' ' -f1-3 /proc/loadavg) (anything else running on the machine shares its CPUs with this benchmark)."
  echo "- Machine: $(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), Linux $(uname -r); everything on 127.0.0.1, client and servers sharing the CPUs."
  echo "- $(redis-server --version | awk '{print $1, $2, $3}'), $(redis-benchmark --version), $(nutcracker -V 2>&1 | head -n 1 | sed 's/^This is //'), tallyproxy $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (with uncommitted changes in src/)')."
  [[ -z "$TALLY_BIN_GIVEN" ]] || echo "- **tallyproxy binary given by TALLY_BIN** ($TALLY_BIN_GIVEN), not a release build of this checkout."
  if ((RUN_MAIN)); then
  echo "- Shards: two redis-server, no persistence (\`--save \"\" --appendonly no\`). Direct Redis = one shard; twemproxy (fnv1a_64, ketama) and tallyproxy (defaults: flush 30 s, cache_ttl 5 s, WAL fsync everysec on $wal_fs) over both."
  echo "- redis-benchmark \`-c $CLIENTS -r $KEYSPACE\`; n = $N_P1 (-P 1), $N_P16 (-P 16), MGET: $N_MGET_P1 (-P 1), $N_MGET_P16 (-P 16). MGET x10 = \`MGET counter:__rand_int__\` x10, GET = \`GET counter:__rand_int__\` (the INCR test's keys)."
  fi
  echo "- Medians of $ROUNDS round(s); in each round every workload runs against each target in turn (target order rotated per round). Latencies are redis-benchmark's own, in ms."
  echo
  if ((RUN_MAIN)); then
  echo "## Targets of issue 20 (medians; met when the ratio is on the right side of the target)"
  echo
  cat "$TARGETS_TABLE"
  echo
  echo "## Side by side (medians)"
  echo
  cat "$MAIN_TABLE"
  echo
  echo "## Durability cost (tallyproxy, medians of $ROUNDS, restarted per mode)"
  echo
  cat "$DUR_TABLE"
  echo
  echo "## Backend economy"
  echo
  echo "$ECON_N INCRs (\`redis-benchmark -t incr -n $ECON_N -r $ECON_KEYS -c $CLIENTS -P 16\`, $econ_rps rps, ${econ_secs} s) on a fresh tallyproxy (flush_interval 30 s), then SIGTERM (final flush)$( ((econ_clean)) || echo ' **which did not end cleanly**')."
  echo
  echo "| Figure | Value |"
  echo "|---|---:|"
  echo "| increments received by the proxy | $econ_received |"
  echo "| periodic flushes before SIGTERM | $econ_flushes_before_stop |"
  echo "| Redis commands on both shards (all \`cmdstat_\` calls, incl. those inside scripts, minus the script's CONFIG RESETSTAT) | $econ_total |"
  echo "| of which EVAL round trips | $econ_eval |"
  echo "| of which INCRBY (inside EVAL) | $econ_incrby |"
  echo "| **increments merged per backend write** ($ECON_N / INCRBY) | **$econ_merge** |"
  echo "| client INCRs per Redis command ($ECON_N / all commands) | $(per "$ECON_N" "$econ_total") |"
  echo "| client INCRs per EVAL round trip | $(per "$ECON_N" "$econ_eval") |"
  echo "| increments landed on the shards (sum of all counters) | $econ_landed |"
  echo
  echo "Per command: $econ_breakdown. (Direct Redis or twemproxy: $ECON_N INCR commands.)"
  echo
  echo "## Time windows"
  echo
  echo "INCR through one tallyproxy (defaults, \`[windows] match = [\"visits:*\"]\`), windowed and plain keys alternating, restarted per round; medians of $ROUNDS:"
  echo
  cat "$WIN_TABLE"
  echo
  echo "Economy with windows: $ECON_N INCRs of \`visits:__rand_int__\` (\`-r $ECON_KEYS -c $CLIENTS -P 16\`, $win_rps rps, ${win_secs} s), 30 s flush interval, then SIGTERM$( ((win_clean)) || echo ' **which did not end cleanly**')."
  echo
  echo "| Figure | Value |"
  echo "|---|---:|"
  echo "| increments received by the proxy | $win_received |"
  echo "| Redis commands on both shards | $win_total |"
  echo "| of which EVAL round trips | $win_eval |"
  echo "| of which INCRBY (totals) | $win_incrby |"
  echo "| of which HINCRBY (bucket sums past 15 digits) | $win_hincrby |"
  echo "| of which HMGET (one per window hash, with one HSET) | $win_hmget |"
  echo "| of which HDEL (trims of fields past retention) | $win_hdel |"
  echo "| of which EXPIREAT | $win_expireat |"
  echo "| **Redis commands per EVAL batch** | **$(per "$win_total" "$win_eval")** |"
  echo "| flushes (periodic, plus the final one at SIGTERM) | $win_flushes |"
  echo "| **Redis commands of the flushes, per flush** (INCRBY, HINCRBY, HMGET, HSET, HDEL, EXPIREAT, PERSIST, watermark HGET/HSET) | **$(per "$win_flush_cmds" "$win_flushes")** |"
  echo "| **Redis commands of the flushes per distinct key flushed** (target <= 3) | **$win_per_key** |"
  echo "| client INCRs per Redis command | $(per "$ECON_N" "$win_total") |"
  echo "| increments landed (sum of the totals / of the day buckets) | $win_landed / $win_days |"
  echo
  echo "Per command: $win_breakdown."
  echo
  echo "Steady state: a warm-up of $ECON_KEYS INCRs and a flush, stats reset, then $STEADY_N INCRs (\`-r $ECON_KEYS -P 16\`, $steady_rps rps) with \`flush_interval = \"1s\"\` ($steady_passes lane flush passes, two per flush), then SIGTERM: every flush writes to buckets and hashes that mostly exist."
  echo
  echo "| Figure | Value |"
  echo "|---|---:|"
  echo "| Redis commands of the flushes (INCRBY, HINCRBY, HMGET, HSET, HDEL, HGET, EXPIREAT, PERSIST) | $steady_flush_cmds |"
  echo "| distinct keys written, summed over the flushes (INCRBY) | $steady_incrby |"
  echo "| **Redis commands per distinct key and flush** (target <= 3) | **$steady_per_key** |"
  echo
  echo "Per command: $steady_breakdown."
  echo
  echo "## Scale"
  echo
  echo "Per row: a fresh tallyproxy (flush_interval 1 h), K INCRs of K distinct keys \`s:<12 digits>\` through $MEM_CONNS parallel \`redis-cli --pipe\`; then \`redis-benchmark -c $CLIENTS -P 16 INCR s:__rand_int__ -r K\` runs in the background: its rate idle (3 s) and during one \`POST /admin/flush\` of all K keys (increments received per second, INFO counters)."
  echo
  cat "$SCALE_TABLE"
  echo
  echo "## $CONNS_MANY client connections"
  echo
  echo "\`redis-benchmark -c $CONNS_MANY -P 1 -n $N_CONNS -r $KEYSPACE\`, direct Redis and tallyproxy alternating, medians of $ROUNDS; tallyproxy VmRSS at the end: $conns_rss kB."
  echo
  cat "$CONNS_TABLE"
  echo
  echo "## Memory per pending key"
  echo
  echo "$MEM_KEYS INCRs on $MEM_KEYS distinct keys (\`k:1\`..\`k:$MEM_KEYS\`, RESP files through $MEM_CONNS parallel \`redis-cli --pipe\`, ${mem_secs} s) into a fresh tallyproxy with flush_interval 1 h and max_pending_keys $((MEM_KEYS * 2))."
  echo
  echo "| Figure | Value |"
  echo "|---|---:|"
  echo "| redis-cli --pipe | ${pipe_summary:-?} |"
  echo "| pending_keys (INFO counters) | $mem_pending |"
  echo "| increments_received | $mem_received |"
  echo "| flushes during the load | $mem_flushes |"
  echo "| VmRSS before / after | $mem_rss_before kB / $mem_rss_after kB |"
  echo "| **bytes per pending key** ((after - before) / $MEM_KEYS) | **$mem_per_key** |"
  echo "| bytes per key by pending_keys | $mem_per_pending |"
  echo
  fi # RUN_MAIN
  cat "$WORK/cluster.md"
} >"$RESULT"

echo
cat "$RESULT"
echo
echo "Results written to $RESULT"
if [[ -s "$WORK/redis-benchmark.stderr" ]]; then
  log "redis-benchmark stderr (\"Could not fetch server CONFIG\" is twemproxy, which has no CONFIG):"
  sort "$WORK/redis-benchmark.stderr" | uniq -c | sort -rn | head -n 5 >&2
fi
FINISHED=1
