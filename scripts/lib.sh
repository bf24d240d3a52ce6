# Shared by the scripts in this folder (source it; it changes nothing by itself):
#   apt_install PKG...      installs Debian packages (as root, or with sudo), quietly
#   free_port               prints a loopback port nobody listens on now
#   wait_for SECS CMD...    runs CMD every 0.1 s until it succeeds; fails after SECS
#   start_redis PORT DIR    starts a redis-server on 127.0.0.1:PORT that persists nothing (its
#                           files and log in DIR/redis-PORT), tracks it, waits up to 10 s for
#                           PING; its PID is then in $redis_pid
#   track PID               remembers a process to stop on exit (stop_tracked, in reverse order:
#                           SIGTERM, up to 10 s, then SIGKILL); stop_tracked runs on EXIT once
#                           a script calls `trap stop_tracked EXIT` (after setting `tmp`, which it
#                           removes too, if set)
#   start_pair BIN DIR BASE TOML
#                           two redis-servers (BASE, BASE+1, as start_redis) and BIN as a proxy
#                           in front of them on BASE+10 (HTTP BASE+20), its config DIR/proxy.toml
#                           with TOML after the shards, its log DIR/proxy.log; tracks all three
#                           and waits up to 10 s for the proxy's PING
#   stop_pair               stops what start_pair started (proxy first), each waited for

apt_install() {
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "installing: $*" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_for() {
  local limit=$1
  shift
  for _ in $(seq 1 $((limit * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

start_redis() {
  local port=$1 dir=$2/redis-$1
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly no \
    --logfile "$dir/redis.log" &
  redis_pid=$!
  track "$redis_pid"
  if ! wait_for 10 bash -c "[[ \$(redis-cli -p $port ping) == PONG ]]"; then
    echo "redis-server on port $port did not answer PING within 10 s" >&2
    tail -20 "$dir/redis.log" >&2 || true
    return 1
  fi
}

tracked_pids=()
track() {
  tracked_pids+=("$1")
}

stop_tracked() {
  local i pid
  for ((i = ${#tracked_pids[@]} - 1; i >= 0; i--)); do
    pid=${tracked_pids[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "${tmp:-}" ]]; then rm -rf "$tmp"; fi
}

pair_pids=()
start_pair() {
  local bin=$1 dir=$2 base=$3 extra=$4
  pair_pids=()
  start_redis "$base" "$dir"
  pair_pids+=("$redis_pid")
  start_redis $((base + 1)) "$dir"
  pair_pids+=("$redis_pid")
  cat >"$dir/proxy.toml" <<EOF
listen = "127.0.0.1:$((base + 10))"
http_listen = "127.0.0.1:$((base + 20))"

[[shards]]
addr = "127.0.0.1:$base"

[[shards]]
addr = "127.0.0.1:$((base + 1))"

$extra
EOF
  "$bin" --config "$dir/proxy.toml" 2>"$dir/proxy.log" &
  pair_pids+=("$!")
  track "$!"
  if ! wait_for 10 bash -c "[[ \$(redis-cli -p $((base + 10)) ping 2>/dev/null) == PONG ]]"; then
    echo "the proxy on port $((base + 10)) did not answer PING within 10 s" >&2
    cat "$dir/proxy.log" >&2
    return 1
  fi
}

stop_pair() {
  local i
  for ((i = ${#pair_pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pair_pids[i]}" 2>/dev/null || true
    wait "${pair_pids[i]}" 2>/dev/null || true
  done
  pair_pids=()
}
