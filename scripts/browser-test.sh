#!/usr/bin/env bash
# The dashboard in a real browser: headless Chromium loads http://<proxy>/ from the built
# binary fronting two real redis-server shards, and we check what a person would see:
# the counts after some POSTs, a chart drawn, then a shard shown as down once it is stopped.
# Screenshots are kept in target/browser-test/ (not committed).
#
# Installs chromium (and python3, curl) from Debian packages when missing. Every process started here is
# stopped by its PID; every wait is bounded; everything listens on 127.0.0.1, free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

scripts/ensure-deps.sh
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v python3 >/dev/null 2>&1 || need+=(python3) # free ports
command -v curl >/dev/null 2>&1 || need+=(curl)
if ((${#need[@]})); then apt_install "${need[@]}"; fi
cargo build --quiet
bin=target/debug/tallyproxy

out=target/browser-test
rm -rf "$out"
mkdir -p "$out"
tmp=$(mktemp -d)
work=$tmp
trap stop_tracked EXIT

fail() {
  echo "browser-test: FAIL: $*" >&2
  exit 1
}

a=$(free_port)
b=$(free_port)
resp=$(free_port)
http=$(free_port)
declare -A shard_pid
for port in "$a" "$b"; do
  start_redis "$port" "$work" || fail "redis-server on $port did not start"
  shard_pid[$port]=$redis_pid
done

cat >"$work/proxy.toml" <<EOF
listen = "127.0.0.1:$resp"
http_listen = "127.0.0.1:$http"
[[shards]]
addr = "127.0.0.1:$a"
[[shards]]
addr = "127.0.0.1:$b"
[backend]
health_interval = "200ms"
health_failures = 2
[counters]
flush_interval = "1s"
[durability]
wal_dir = "$work/wal"
[windows]
match = ["visits:*"]
EOF
"$bin" --config "$work/proxy.toml" >"$out/proxy.log" 2>&1 &
proxy=$!
track "$proxy"
base="http://127.0.0.1:$http"
wait_for 10 curl -fsS "$base/healthz" || fail "the proxy did not start (see $out/proxy.log)"

# Traffic: 40 visits of checkout, 25 of home, 10 of about (HTTP), and a burst over RESP so
# that the sampled top list has something to rank.
post() { curl -fsS -X POST "$base/visits/$1" >/dev/null; }
for _ in $(seq 1 40); do post checkout; done
for _ in $(seq 1 25); do post home; done
for _ in $(seq 1 10); do post about; done
for _ in $(seq 1 600); do echo "INCR visits:checkout"; done | redis-cli -p "$resp" >/dev/null
for _ in $(seq 1 300); do echo "INCR visits:home"; done | redis-cli -p "$resp" >/dev/null
# A page id is user input: one that is HTML must be shown as text, never run.
for _ in $(seq 1 64); do echo "INCR \"visits:<img src=x onerror=document.title='pwned'>\""; done |
  redis-cli -p "$resp" >/dev/null
[[ $(curl -fsS "$base/visits/checkout") == *'"visits":640'* ]] || fail "checkout should have 640 visits"

browser() {
  # browser <url> <name>: the DOM after the page settled (5 s of virtual time), and a
  # screenshot, each in its own fresh profile.
  local url=$1 name=$2 flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync
    --disable-dev-shm-usage --hide-scrollbars)
  timeout 60 chromium "${flags[@]}" --user-data-dir="$work/profile-$name-dom" \
    --virtual-time-budget=5000 --dump-dom "$url" >"$out/$name.html" 2>"$out/$name.chromium.log" ||
    fail "chromium --dump-dom failed for $name (see $out/$name.chromium.log)"
  timeout 60 chromium "${flags[@]}" --user-data-dir="$work/profile-$name-shot" \
    --virtual-time-budget=5000 --window-size=1280,900 --screenshot="$out/$name.png" "$url" \
    >>"$out/$name.chromium.log" 2>&1 || fail "chromium --screenshot failed for $name"
  [[ -s "$out/$name.png" ]] || fail "no screenshot for $name"
}
expect() {
  # expect <name> <fixed string> <what it shows>
  grep -qF -- "$2" "$out/$1.html" || fail "$1: $3 (no '$2' in $out/$1.html)"
  echo "browser-test: $1: $3"
}

browser "$base/#page=checkout" healthy
expect healthy 'data-state="loaded"' "the page loaded its data"
expect healthy 'data-page="checkout" data-visits="640"' "checkout is listed with 640 visits"
expect healthy 'data-page="home" data-visits="325"' "home is listed with 325 visits"
expect healthy 'data-drawn="points=60 total=640"' "the chart of checkout is drawn: 60 minutes, 640 visits"
expect healthy 'id="lookup-visits">640<' "the looked-up page shows 640"
expect healthy "data-shard=\"redis_$a\" data-health=\"up\"" "redis_$a is shown up"
expect healthy "data-shard=\"redis_$b\" data-health=\"up\"" "redis_$b is shown up"
expect healthy '<span id="status" class="badge ok">ready</span>' "the status says ready"
expect healthy '<td>&lt;img src=x onerror=document.title=' "an HTML page id is shown as text"
grep -q '<title>tallyproxy</title>' "$out/healthy.html" || fail "an HTML page id ran as script"
browser "$base/#page=home&step=1" per-second
expect per-second 'data-drawn="points=3600 total=325"' "the per-second chart of home is drawn: 3600 seconds, 325 visits"

# A rebalance: a third shard added over /admin (loopback, no token configured), then the
# page shows its progress (done, with the ring's new version) and the new shard.
c=$(free_port)
start_redis "$c" "$work" || fail "redis-server on $c did not start"
curl -fsS -X POST "$base/admin/shards" -d "{\"addr\": \"127.0.0.1:$c\"}" >/dev/null ||
  fail "adding a shard was refused"
wait_for 20 bash -c "curl -fsS $base/stats/summary | grep -q '\"state\":\"done\"'" ||
  fail "the rebalance did not finish"
browser "$base/" rebalanced
expect rebalanced 'id="rebalance" data-state="done"' "the rebalance is shown done"
expect rebalanced 'ring v1 → v2' "the rebalance went from ring v1 to v2"
expect rebalanced "data-shard=\"redis_$c\" data-health=\"up\"" "the new shard redis_$c is listed"
expect rebalanced 'data-page="checkout" data-visits="640"' "checkout still has 640 visits"

# One shard down: stopped by its PID, then wait for the health checks to say so.
kill "${shard_pid[$b]}"
wait_for 10 bash -c "curl -fsS $base/stats/summary | grep -q '\"health\":\"down\"'" ||
  fail "the summary never showed redis_$b down"
browser "$base/" shard-down
expect shard-down "data-shard=\"redis_$b\" data-health=\"down\"" "redis_$b is shown DOWN"
expect shard-down "data-shard=\"redis_$a\" data-health=\"up\"" "redis_$a is still up"
expect shard-down "Shard redis_$b is DOWN" "a banner says the shard is down"
expect shard-down '1 shard down</span>' "the status badge says 1 shard down"
echo "browser-test: ok (screenshots: $out/healthy.png, $out/per-second.png, $out/rebalanced.png, $out/shard-down.png)"
