# Sourced by scripts/bench.sh (not run by itself): the Redis Cluster run. Uses bench.sh's
# helpers (log, die, cli, bench, stop_pid, wait_ready, port_in_use, med_of, fmt_rps, ratio,
# elapsed, info_field) and its variables (WORK, PROC_NAME, TALLY_BIN, TALLY_PORT, TALLY_HTTP,
# CLIENTS, KEYSPACE, ROUNDS, BASE).
#
# A 3-primary cluster (no replicas: this measures throughput and writes, not failover) on
# ports BASE+100..BASE+102 (cluster bus +10000), created with `redis-cli --cluster create`:
#   - INCR and GET -P 16 through tallyproxy in cluster mode (`[cluster] seeds`), next to
#     `redis-benchmark --cluster` straight at the cluster (keys `counter:{tag}:__rand_int__`,
#     which redis-benchmark spreads over the nodes; through the proxy `counter:__rand_int__`);
#   - the backend economy: CL_ECON_N INCRs through a fresh proxy, then SIGTERM (final flush),
#     and what the nodes ran (INFO commandstats summed over the three), against one INCR per
#     increment for a cluster client.
# Writes its report section to $WORK/cluster.md.

CL_PORTS=($((BASE + 100)) $((BASE + 101)) $((BASE + 102)))
CL_PIDS=()

cluster_ports_free() {
  local p
  for p in "${CL_PORTS[@]}"; do
    port_in_use "$p" && die "port $p on 127.0.0.1 is already in use (cluster node)"
    port_in_use $((p + 10000)) && die "port $((p + 10000)) on 127.0.0.1 is already in use (cluster bus)"
  done
  return 0
}

start_cluster() {
  local port dir pid i ok
  for port in "${CL_PORTS[@]}"; do
    dir="$WORK/cluster-$port"
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly no \
      --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout 2000 \
      --logfile "$dir/redis.log" --daemonize no &
    pid=$!
    PROC_NAME[$pid]="redis-server:$port (cluster)"
    CL_PIDS+=("$pid")
    wait_ready "$pid" "redis-server:$port" "$port" "$dir/redis.log"
  done
  timeout 60 redis-cli --cluster create "${CL_PORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 \
    --cluster-yes >"$WORK/cluster-create.log" 2>&1 ||
    die "redis-cli --cluster create failed: $(tail -n 5 "$WORK/cluster-create.log")"
  for ((i = 0; i < 300; i++)); do
    ok=1
    for port in "${CL_PORTS[@]}"; do
      [[ $(cli -p "$port" CLUSTER INFO 2>/dev/null | tr -d '\r' | awk -F: '$1 == "cluster_state" {print $2}') == ok ]] ||
        ok=0
    done
    ((ok)) && return 0
    sleep 0.1
  done
  die "the cluster did not reach cluster_state:ok within 30 s"
}

# write_tally_cluster_conf NAME: a fresh config (and WAL) in front of the cluster; sets TALLY_CONF.
write_tally_cluster_conf() {
  local name=$1 conf seeds
  TALLY_STARTS=$((TALLY_STARTS + 1))
  conf="$WORK/tallyproxy-$TALLY_STARTS-$name.toml"
  seeds=$(printf '"127.0.0.1:%s", ' "${CL_PORTS[@]}")
  cat >"$conf" <<EOF
# scripts/bench.sh: $name
listen = "127.0.0.1:$TALLY_PORT"
http_listen = "127.0.0.1:$TALLY_HTTP"

[cluster]
seeds = [${seeds%, }]

[counters]
cache_ttl = "5s"
flush_interval = "30s"
max_pending_keys = 100000

[durability]
wal_dir = "$WORK/wal-$TALLY_STARTS"
fsync = "everysec"
EOF
  "$TALLY_BIN" --config "$conf" --check >/dev/null || die "tallyproxy rejects $conf"
  TALLY_CONF=$conf
}

start_tally_cluster() {
  local conf=$1 logf="${1%.toml}.log" i v
  "$TALLY_BIN" --config "$conf" 2>"$logf" &
  TALLY_PID=$!
  PROC_NAME[$TALLY_PID]="tallyproxy (cluster)"
  wait_ready "$TALLY_PID" tallyproxy "$TALLY_PORT" "$logf"
  # Serving every node: an INCR and a GET of keys on each of the three nodes answer.
  for ((i = 0; i < 100; i++)); do
    v=$(cli -p "$TALLY_PORT" INCR counter:bench-sanity:a 2>/dev/null)$(cli -p "$TALLY_PORT" GET counter:bench-sanity:b 2>/dev/null)$(cli -p "$TALLY_PORT" INCR counter:bench-sanity:c 2>/dev/null)
    [[ "$v" =~ ^[0-9]+$ ]] && return 0
    sleep 0.1
  done
  die "tallyproxy in cluster mode does not answer INCR/GET (log: $logf)"
}

# cl_commandstats FILE: every node's INFO commandstats, "port cmdstat_...", into FILE.
cl_commandstats() {
  local port
  : >"$1"
  for port in "${CL_PORTS[@]}"; do
    cli -p "$port" INFO commandstats | tr -d '\r' | grep '^cmdstat_' | sed "s/^/$port /" >>"$1"
  done
}
# cl_calls FILE NAME: calls of NAME summed over the nodes ("*" = every command but INFO and
# the CONFIG RESETSTAT of this script).
cl_calls() {
  awk -v c="$2" '{
    split($2, a, ":"); name = substr(a[1], 9)
    if (name == "info" || name == "config|resetstat") next
    if (c != "*" && name != c) next
    if (match($2, /calls=[0-9]+/)) s += substr($2, RSTART + 6, RLENGTH - 6)
  } END { print s + 0 }' "$1"
}
cl_breakdown() {
  awk '{split($2, a, ":"); name = substr(a[1], 9)
    if (name == "config|resetstat" || name == "info") next
    match($2, /calls=[0-9]+/); s[name] += substr($2, RSTART + 6, RLENGTH - 6)}
  END {for (n in s) printf "%s=%d\n", n, s[n]}' "$1" | sort | paste -sd' ' -
}
# cl_landed PATTERN: the sum of every key matching PATTERN over the nodes.
cl_landed() {
  local port v total=0
  for port in "${CL_PORTS[@]}"; do
    v=$(cli -p "$port" EVAL "local s = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do s = s + tonumber(redis.call('GET', k)) end return s" 0 "$1")
    total=$((total + v))
  done
  echo "$total"
}

# bench_cluster_direct PIPELINE N COMMAND...: redis-benchmark --cluster at the first node.
bench_cluster_direct() {
  local pipeline=$1 n=$2 out line
  shift 2
  out=$(timeout "$BENCH_TIMEOUT" redis-benchmark --cluster -h 127.0.0.1 -p "${CL_PORTS[0]}" \
    -c "$CLIENTS" -r "$KEYSPACE" -n "$n" -P "$pipeline" --csv "$@" 2>>"$WORK/redis-benchmark.stderr") ||
    die "redis-benchmark --cluster -P $pipeline $* failed or timed out: $out"
  line=$(printf '%s\n' "$out" | grep -v '^"test"' | grep '^"' | tail -n 1 || true)
  [[ -n "$line" ]] || die "no CSV result from redis-benchmark --cluster $*: $out"
  printf '%s\n' "$line" | awk -F, '{gsub(/"/, ""); print $2, $5, $7}'
}

run_cluster_bench() {
  local round label cmd_direct cmd_tally res rps p50 p99 t n
  cluster_ports_free
  log "cluster: 3 primaries on ${CL_PORTS[*]}, INCR/GET -P 16 direct (--cluster) and through tallyproxy"
  start_cluster
  local raw="$WORK/cluster.csv" # round,workload,target,rps,p50,p99
  : >"$raw"
  write_tally_cluster_conf cluster
  start_tally_cluster "$TALLY_CONF"
  # label|direct command|through the proxy
  local workloads=(
    "INCR -P 16|INCR counter:{tag}:__rand_int__|INCR counter:__rand_int__"
    "GET -P 16|GET counter:{tag}:__rand_int__|GET counter:__rand_int__"
  )
  for ((round = 1; round <= ROUNDS; round++)); do
    for w in "${workloads[@]}"; do
      IFS='|' read -r label cmd_direct cmd_tally <<<"$w"
      local order=(cluster tallyproxy)
      ((round % 2 == 0)) && order=(tallyproxy cluster)
      for t in "${order[@]}"; do
        if [[ $t == cluster ]]; then
          read -ra args <<<"$cmd_direct"
          res=$(bench_cluster_direct 16 "$CL_N" "${args[@]}")
        else
          read -ra args <<<"$cmd_tally"
          res=$(bench "$TALLY_PORT" 16 "$CL_N" "$KEYSPACE" "${args[@]}")
        fi
        read -r rps p50 p99 <<<"$res"
        echo "$round,$label,$t,$rps,$p50,$p99" >>"$raw"
        log "round $round  cluster  $label  $t: $rps rps"
      done
    done
  done
  stop_tally

  log "cluster economy: $CL_ECON_N INCRs over $ECON_KEYS keys through tallyproxy, 30 s flush interval, then SIGTERM"
  for port in "${CL_PORTS[@]}"; do cli -p "$port" FLUSHALL >/dev/null; done
  write_tally_cluster_conf cluster-economy
  start_tally_cluster "$TALLY_CONF"
  cli -p "$TALLY_PORT" DEL counter:bench-sanity:a counter:bench-sanity:c >/dev/null
  for port in "${CL_PORTS[@]}"; do cli -p "$port" CONFIG RESETSTAT >/dev/null; done
  local t0 secs received clean stats total evals incrby landed
  t0=$(date +%s.%N)
  res=$(bench "$TALLY_PORT" 16 "$CL_ECON_N" "$ECON_KEYS" -t incr)
  read -r rps _ _ <<<"$res"
  secs=$(elapsed "$t0")
  received=$(info_field "$TALLY_PORT" counters increments_received)
  stop_tally
  clean=$((STOP_FORCED == 0 && STOP_RC == 0))
  stats="$WORK/commandstats-cluster.txt"
  cl_commandstats "$stats"
  total=$(cl_calls "$stats" '*')
  evals=$(cl_calls "$stats" eval)
  incrby=$(cl_calls "$stats" incrby)
  landed=$(cl_landed 'counter:*')
  ((landed == CL_ECON_N)) || log "WARNING: the cluster holds $landed increments, expected $CL_ECON_N"

  {
    echo "## Redis Cluster"
    echo
    echo "Three primaries (no replicas, \`--cluster-node-timeout 2000\`, no persistence), made with \`redis-cli --cluster create\`. Direct: \`redis-benchmark --cluster -c $CLIENTS -r $KEYSPACE -n $CL_N -P 16\` on \`counter:{tag}:__rand_int__\` (redis-benchmark spreads \`{tag}\` over the nodes). tallyproxy: \`[cluster] seeds\` = the three nodes, defaults otherwise (flush 30 s, cache_ttl 5 s, fsync everysec), \`redis-benchmark\` on \`counter:__rand_int__\`. Medians of $ROUNDS round(s), order alternated per round."
    echo
    echo "| Workload | cluster rps (redis-benchmark --cluster) | tallyproxy rps | tallyproxy/cluster |"
    echo "|---|---:|---:|---:|"
    for w in "${workloads[@]}"; do
      IFS='|' read -r label _ _ <<<"$w"
      local c ta
      c=$(med_of "$raw" "$label" cluster 4)
      ta=$(med_of "$raw" "$label" tallyproxy 4)
      echo "| $label | $(fmt_rps "$c") | $(fmt_rps "$ta") | $(ratio "$ta" "$c") |"
    done
    echo
    echo "Backend economy: $CL_ECON_N INCRs (\`-t incr -r $ECON_KEYS -c $CLIENTS -P 16\`, $rps rps, ${secs} s) through a fresh tallyproxy, then SIGTERM (final flush)$( ((clean)) || echo ' **which did not end cleanly**'); INFO commandstats summed over the three nodes."
    echo
    echo "| Figure | Value |"
    echo "|---|---:|"
    echo "| increments received by the proxy | $received |"
    echo "| Redis commands on the nodes (incl. inside scripts) | $total |"
    echo "| of which EVAL round trips | $evals |"
    echo "| of which INCRBY (the writes) | $incrby |"
    echo "| **Redis writes per client increment** (INCRBY / $CL_ECON_N) | **$(awk -v w="$incrby" -v n="$CL_ECON_N" 'BEGIN { printf "%.4f", w / n }')** |"
    echo "| Redis commands per client increment | $(awk -v w="$total" -v n="$CL_ECON_N" 'BEGIN { printf "%.4f", w / n }') |"
    echo "| client INCRs per EVAL round trip | $(awk -v n="$CL_ECON_N" -v e="$evals" 'BEGIN { if (e + 0 == 0) print "n/a"; else printf "%.1f", n / e }') |"
    echo "| increments landed (sum of \`counter:*\` over the nodes) | $landed |"
    echo
    echo "Per command: $(cl_breakdown "$stats"). (A cluster client straight at the nodes: $CL_ECON_N INCR, one write per increment.)"
  } >"$WORK/cluster.md"
  for pid in "${CL_PIDS[@]}"; do stop_pid "$pid" 50; done
  CL_PIDS=()
}
