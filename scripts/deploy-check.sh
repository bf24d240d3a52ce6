#!/usr/bin/env bash
# Checks the operator's kit in deploy/:
#   - deploy/grafana/tallyproxy.json parses, and every tallyproxy_* metric it queries is in a
#     real /metrics scrape of the built proxy (two real redis-server shards, some traffic);
#   - deploy/prometheus/alerts.yml passes `promtool check rules` and the unit tests in
#     alerts.test.yml (`promtool test rules`), and the same metric check;
#   - deploy/k8s/*.yaml validate against the Kubernetes schemas (kubernetes-validate, with
#     its bundled schemas: no network needed once installed), kustomization.yaml lists them
#     all, and the ConfigMap's proxy.toml passes `tallyproxy --check`;
#   - docker-compose.yml validates against the Compose Specification's JSON schema
#     (deploy/compose-spec.json: schema/compose-spec.json of the compose-spec/compose-spec
#     repository, Apache-2.0; no Compose CLI needed), and per profile (none, `ha`, `cluster`)
#     every dependency is started by that profile, addresses are unique and in the subnet,
#     ports are published on 127.0.0.1 only and once, volumes are declared, mounted files
#     exist; the cluster profile's six nodes are cluster-enabled, the one-shot create joins
#     exactly them, the cluster proxy's seeds are among them; each mounted proxy config passes
#     `tallyproxy --check`.
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

# 3. docker-compose.yml: the Compose schema, then what the schema cannot see, per profile.
"$py" - <<'EOF'
import ipaddress, json, os, re, sys, tomllib, yaml
import jsonschema

compose = yaml.safe_load(open("docker-compose.yml"))
jsonschema.validate(compose, json.load(open("deploy/compose-spec.json")))
services = compose["services"]
subnets = [ipaddress.ip_network(c["subnet"]) for c in compose["networks"]["tally"]["ipam"]["config"]]
declared = set(compose.get("volumes") or {})
profiles = sorted({p for s in services.values() for p in s.get("profiles", [])})
assert profiles == ["cluster", "ha"], f"profiles {profiles}"
hosts = {}
for name, svc in services.items():
    for port in svc.get("ports", []):
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond 127.0.0.1"
        host = port.split(":")[1]
        assert host not in hosts, f"{name} and {hosts[host]} both publish host port {host}"
        hosts[host] = name
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith("./"):
            assert os.path.isfile(src), f"{name} mounts {src}, which does not exist"
        else:
            assert src in declared, f"{name} uses volume {src}, not declared"
for profile in [None] + profiles:
    on = {n: s for n, s in services.items() if not s.get("profiles") or profile in s["profiles"]}
    addrs = {}
    for name, svc in on.items():
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in on, f"profile {profile}: {name} depends on {dep}, which it does not start"
        ip = ipaddress.ip_address(svc["networks"]["tally"]["ipv4_address"])
        assert any(ip in n for n in subnets), f"{name}: {ip} is outside the subnet"
        assert ip not in addrs, f"profile {profile}: {name} and {addrs[ip]} share {ip}"
        addrs[ip] = name
    print(f"deploy-check: compose profile {profile or '(default)'}: {len(on)} services")

# The cluster profile: six cluster-enabled nodes, all joined by cluster-create, seeds among them.
nodes = {n: s for n, s in services.items() if re.fullmatch(r"cluster-\d", n)}
assert len(nodes) == 6, f"cluster nodes: {sorted(nodes)}"
addrs = set()
for name, svc in nodes.items():
    cmd = svc["command"]
    assert cmd[cmd.index("--cluster-enabled") + 1] == "yes", f"{name} is not cluster-enabled"
    assert "--appendonly" in cmd, f"{name} persists nothing"
    addrs.add(f'{svc["networks"]["tally"]["ipv4_address"]}:{cmd[cmd.index("--port") + 1]}')
create = " ".join(services["cluster-create"]["command"])
named = set(re.findall(r"--cluster create ((?:[\d.]+:\d+ )+)", create)[0].split())
assert named == addrs, f"cluster-create joins {sorted(named)}, the nodes are {sorted(addrs)}"
assert "--cluster-replicas 1" in create
assert services["cluster-create"]["restart"] == "no"
dep = services["tallyproxy-cluster"]["depends_on"]["cluster-create"]["condition"]
assert dep == "service_completed_successfully", dep
conf = tomllib.load(open("deploy/docker/proxy-cluster.toml", "rb"))
assert "shards" not in conf, "the cluster proxy has [[shards]]"
assert set(conf["cluster"]["seeds"]) <= addrs, f"seeds {conf['cluster']['seeds']} are not nodes"
print(f"deploy-check: compose cluster profile: {len(nodes)} nodes, create names them all, {len(conf['cluster']['seeds'])} seeds among them")
EOF
for f in deploy/docker/proxy.toml deploy/docker/proxy-ha.toml deploy/docker/proxy-cluster.toml; do
  "$bin" --check --config "$f" >/dev/null || fail "$f does not pass tallyproxy --check"
done
echo "deploy-check: docker-compose.yml valid (Compose schema, every profile); its proxy configs pass tallyproxy --check"

# 4. A real scrape: two shards, the proxy, traffic that gives every histogram a sample.
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
