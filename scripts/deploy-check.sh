#!/usr/bin/env bash
# Checks the operator's kit in deploy/:
#   - deploy/grafana/tallyproxy.json parses, and every tallyproxy_* metric it queries is in a
#     real /metrics scrape of the built proxy (two real redis-server shards, some traffic);
#   - deploy/prometheus/alerts.yml passes `promtool check rules` and the unit tests in
#     alerts.test.yml (`promtool test rules`), and the same metric check;
#   - deploy/k8s/*.yaml validate against the Kubernetes schemas (kubernetes-validate, with
#     its bundled schemas: no network needed once installed), kustomization.yaml lists them
#     all, and the ConfigMap's proxy.toml passes `tallyproxy --check`.
# Installs promtool (Debian package prometheus), curl and python3-venv when missing, and
# kubernetes-validate from PyPI into a venv under target/ (once; validation is offline).
# Every process started here is stopped by its PID; only 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

scripts/ensure-deps.sh
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v curl >/dev/null 2>&1 || need+=(curl)
# python3 with venv and pip, for kubernetes-validate (and free ports).
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv python3-pip)
if ((${#need[@]})); then apt_install "${need[@]}"; fi
venv=target/deploy-venv
if [[ ! -x $venv/bin/kubernetes-validate ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate
fi
py=$venv/bin/python # has PyYAML (a dependency of kubernetes-validate)
cargo build --quiet
bin=target/debug/tallyproxy

out=target/deploy-check
rm -rf "$out"
mkdir -p "$out"
tmp=$(mktemp -d)
work=$tmp
trap stop_tracked EXIT
fail() {
  echo "deploy-check: FAIL: $*" >&2
  exit 1
}

# 1. Alert rules, and their unit tests (a shard down, a failed log, increments not landing,
# a stuck rebalance: each fires when it should and not before).
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml

# 2. Kubernetes manifests.
manifests=()
for f in deploy/k8s/*.yaml; do
  [[ $(basename "$f") == kustomization.yaml ]] || manifests+=("$f")
done
"$venv/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
echo "deploy-check: ${#manifests[@]} manifests valid against the Kubernetes schemas (strict)"
"$py" - "${manifests[@]}" <<'EOF'
import sys, yaml
listed = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))["resources"]
files = sorted(f.split("/")[-1] for f in sys.argv[1:])
assert sorted(listed) == files, f"kustomization.yaml lists {sorted(listed)}, the directory has {files}"
EOF
"$py" -c '
import sys, yaml
doc = yaml.safe_load(open("deploy/k8s/configmap.yaml"))
print(doc["data"]["proxy.toml"])
' >"$work/k8s-proxy.toml"
TALLY_ADMIN_TOKEN=0123456789abcdef-check TALLY_SHARD_PASSWORD=check "$bin" --check --config "$work/k8s-proxy.toml" >/dev/null ||
  fail "the ConfigMap's proxy.toml does not pass tallyproxy --check"
echo "deploy-check: the ConfigMap's proxy.toml passes tallyproxy --check"

# 3. A real scrape: two shards, the proxy, traffic that gives every histogram a sample.
a=$(free_port)
b=$(free_port)
resp=$(free_port)
http=$(free_port)
for port in "$a" "$b"; do
  start_redis "$port" "$work" || fail "redis-server on $port did not start"
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
[counters]
flush_interval = "1h"
[[counters.match]]
pattern = "visits:*"
mode = "batched"
[durability]
wal_dir = "$work/wal"
fsync = "everysec"
EOF
"$bin" --config "$work/proxy.toml" >"$out/proxy.log" 2>&1 &
track $!
base="http://127.0.0.1:$http"
wait_for 10 curl -fsS "$base/healthz" || fail "the proxy did not start (see $out/proxy.log)"
{
  for i in $(seq 1 50); do echo "INCR visits:p$((i % 7))"; done
  echo "SET plain x"
  echo "GET plain"
  echo "NOSUCHCOMMAND"
} | redis-cli -p "$resp" >/dev/null
curl -fsS -X POST "$base/visits/home" >/dev/null
curl -fsS "$base/visits/home?last=60s" >/dev/null
curl -fsS -X POST "$base/admin/flush" >/dev/null
sleep 1.5 # one everysec fsync
curl -fsS "$base/metrics" >"$out/metrics.txt"

"$py" - "$out/metrics.txt" <<'EOF'
import json, re, sys, yaml

scrape = open(sys.argv[1]).read()
present = set()
for line in scrape.splitlines():
    if line and not line.startswith("#"):
        present.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
NAME = re.compile(r"\btallyproxy_[a-zA-Z0-9_]+")

def exprs(node):
    """Every PromQL string in a Grafana dashboard: targets' expr and query variables."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                yield v
            elif k == "query" and isinstance(v, str):
                yield v
            else:
                yield from exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from exprs(v)

def check(what, strings):
    used = set()
    for s in strings:
        used.update(NAME.findall(s))
    missing = sorted(used - present)
    assert not missing, f"{what} queries metrics missing from /metrics: {missing}"
    return used

dash = json.load(open("deploy/grafana/tallyproxy.json"))
assert dash["panels"], "no panels"
ids = [p["id"] for p in dash["panels"]]
assert len(ids) == len(set(ids)), "panel ids repeat"
cells = {}
for p in dash["panels"]:
    g = p["gridPos"]
    assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
    for x in range(g["x"], g["x"] + g["w"]):
        for y in range(g["y"], g["y"] + g["h"]):
            assert (x, y) not in cells, f"panels {cells[(x, y)]!r} and {p['title']!r} overlap"
            cells[(x, y)] = p["title"]
    if p["type"] != "row":
        assert p["targets"] and all(t["expr"] for t in p["targets"]), f"panel {p['title']!r} queries nothing"
used = check("deploy/grafana/tallyproxy.json", list(exprs(dash)))
for must in ["tallyproxy_commands_total", "tallyproxy_command_duration_seconds_bucket",
             "tallyproxy_counter_increments_total", "tallyproxy_counter_backend_writes_total",
             "tallyproxy_counter_pending_keys", "tallyproxy_counter_oldest_pending_seconds",
             "tallyproxy_counter_flush_failures_total", "tallyproxy_shard_up",
             "tallyproxy_rebalance_running", "tallyproxy_wal_failed"]:
    assert must in used, f"the Grafana dashboard does not show {must}"
print(f"deploy-check: Grafana dashboard: {len(dash['panels'])} panels, {len(used)} metrics, all in a real scrape")

rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
strings = [r["expr"] for g in rules["groups"] for r in g["rules"]]
used = check("deploy/prometheus/alerts.yml", strings)
print(f"deploy-check: alert rules: {len(strings)} rules, {len(used)} metrics, all in a real scrape")
EOF
echo "deploy-check: ok"
