#!/usr/bin/env bash
# HTTP benchmark of custody-proxy, all scenarios in one run, on 127.0.0.1:
#
#   direct       wrk -> backend
#   bare         wrk -> bare pingora (no Custody logic) -> backend
#   bare+mint    wrk -> bare pingora minting and signing one Txn-Token per
#                request, nothing else (the floor of a proxy that starts a
#                signed chain per request) -> backend
#   one sidecar  wrk -> server sidecar (inbound: mints a chain per request) -> backend
#   two sidecars wrk -> client sidecar (outbound: mints, egress policy) -> server sidecar
#                (inbound: verifies) -> backend
#   mesh mTLS    the same two sidecars, speaking mesh mTLS to each other (TLS 1.3,
#                client certificates, SPIFFE IDs checked); both run with
#                `mesh_tls` (permissive) in every scenario, so `two` and `mtls`
#                differ only in the hop between the sidecars
#
# For each: latency at a fixed rate (1 KiB responses, ~1,000 req/s: 10
# connections, each pausing 10 ms between requests; p50/p99 from wrk) and
# the maximum throughput (64 connections). Then the sidecars' RSS and CPU at
# ~2,000 req/s through both. Ports 18010-18089 (BENCH_PORT_PREFIX=190: 19010-19089).
#
#   proxy/bench/http.sh [seconds per run, default 15]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-15}"
pp="${BENCH_PORT_PREFIX:-180}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release --quiet -p custody-proxy --bin custody-proxy --example bench_backend --example bare_pingora
bin=target/release
BACKEND=127.0.0.1:${pp}81 BARE=127.0.0.1:${pp}82 MINT=127.0.0.1:${pp}83

sidecar() { # name inbound outbound admin upstreams-yaml
    cat > "$work/$1.yaml" <<YAML
workload: { trust_domain: bench, namespace: bench, service_account: $1, pod: $1-0 }
listeners: { inbound: "$2", outbound: "$3", admin: "$4" }
inbound:
  upstream: "$BACKEND"
  identity_sources: [ { type: edge_header, header: x-custody-user, kind: human } ]
outbound: { mode: explicit, upstreams: { $5 } }
signing: { seed_file: "$work/$1.seed" }
trust: { key_set_file: "$work/keys.json" }
exporter: { jsonl_file: "$work/$1.hops.jsonl" }
shutdown: { grace_period_secs: 0 }
mesh_tls: { cert_file: "$work/$1.crt", key_file: "$work/$1.key", ca_file: "$work/ca.crt" }
YAML
}
# Mesh certificates: a CA, and one certificate per sidecar naming its SPIFFE ID.
ssl() { openssl "$@" >/dev/null 2>&1; }
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
ssl req -x509 "${ec[@]}" -days 1 -subj /CN=bench-mesh -keyout "$work/ca.key" -out "$work/ca.crt"
for name in server client; do
    ssl req "${ec[@]}" -subj "/CN=$name" -keyout "$work/$name.key" -out "$work/$name.csr"
    printf 'extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:spiffe://bench/ns/bench/sa/%s\n' "$name" > "$work/$name.ext"
    ssl x509 -req -in "$work/$name.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
        -days 1 -extfile "$work/$name.ext" -out "$work/$name.crt"
done
# Two seeds and a key set trusting both (the client's key signs what the server verifies).
printf '%064x\n' 1 > "$work/server.seed"
printf '%064x\n' 2 > "$work/client.seed"
echo '{"keys":[]}' > "$work/keys.json"
sidecar server 127.0.0.1:${pp}10 127.0.0.1:${pp}11 127.0.0.1:${pp}12 ""
sidecar client 127.0.0.1:${pp}20 127.0.0.1:${pp}21 127.0.0.1:${pp}22 \
    "\"svc\": \"127.0.0.1:${pp}10\", \"msvc\": { address: \"127.0.0.1:${pp}10\", mesh: true }"
# Learn each sidecar's public key from its admin /keys, then trust both.
"$bin/examples/bench_backend" "$BACKEND" & pids+=($!)
"$bin/examples/bare_pingora" "$BARE" "$BACKEND" >/dev/null 2>&1 & pids+=($!)
"$bin/examples/bare_pingora" "$MINT" "$BACKEND" mint >/dev/null 2>&1 & pids+=($!)
start_sidecar() { RUST_LOG=warn "$bin/custody-proxy" --config "$work/$1.yaml" >/dev/null 2>&1 & echo $!; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
spid=$(start_sidecar server); cpid=$(start_sidecar client); pids+=("$spid" "$cpid")
wait_port 127.0.0.1:${pp}12; wait_port 127.0.0.1:${pp}22
python3 - "$work" "$pp" <<'PY'
import json, sys, urllib.request
work, pp = sys.argv[1], sys.argv[2]
keys = []
for port in (f"{pp}12", f"{pp}22"):
    keys += json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/keys"))["keys"]
json.dump({"keys": keys}, open(f"{work}/keys.json", "w"))
PY
kill "$spid" "$cpid"; wait "$spid" "$cpid" 2>/dev/null || true
spid=$(start_sidecar server); cpid=$(start_sidecar client); pids+=("$spid" "$cpid")
for p in $BACKEND $BARE $MINT 127.0.0.1:${pp}10 127.0.0.1:${pp}21; do wait_port "$p"; done

cat > "$work/paced.lua" <<'LUA'
function delay() return 10 end
LUA

declare -A URL HDR
URL[direct]="http://$BACKEND/"; HDR[direct]="x-custody-user: bench"
URL[bare]="http://$BARE/"; HDR[bare]="x-custody-user: bench"
URL[bare+mint]="http://$MINT/"; HDR[bare+mint]="x-custody-user: bench"
URL[one]="http://127.0.0.1:${pp}10/"; HDR[one]="x-custody-user: bench"
URL[two]="http://127.0.0.1:${pp}21/"; HDR[two]="Host: svc"
URL[mtls]="http://127.0.0.1:${pp}21/"; HDR[mtls]="Host: msvc"

# Sanity: the two-sidecar paths carry a verified chain end to end.
for s in two mtls; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "${HDR[$s]}" "${URL[$s]}")
    [[ "$code" == 200 ]] || { echo "$s path answered $code" >&2; exit 1; }
done
sleep 0.5
grep -q '"transport_security":"TRANSPORT_SECURITY_MESH_MTLS"' "$work/server.hops.jsonl" \
    || { echo "no mesh mTLS hop at the server sidecar" >&2; exit 1; }

field() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/, "", v); print v/1000 } else if (v ~ /ms$/) { sub(/ms/, "", v); print v } else { sub(/s/, "", v); print v*1000 } }'; }

echo "| scenario | rate (req/s) | p50 (ms) | p99 (ms) | max throughput (req/s) |"
echo "| --- | --- | --- | --- | --- |"
declare -A P50 P99 MAX
for s in direct bare bare+mint one two mtls; do
    wrk -t1 -c10 -d"${secs}s" --latency -s "$work/paced.lua" -H "${HDR[$s]}" "${URL[$s]}" > "$work/$s.paced"
    wrk -t2 -c64 -d"${secs}s" -H "${HDR[$s]}" "${URL[$s]}" > "$work/$s.max"
    P50[$s]=$(to_ms "$(field 50% "$work/$s.paced")")
    P99[$s]=$(to_ms "$(field 99% "$work/$s.paced")")
    MAX[$s]=$(field Requests/sec: "$work/$s.max")
    echo "| $s | $(field Requests/sec: "$work/$s.paced") | ${P50[$s]} | ${P99[$s]} | ${MAX[$s]} |"
done
echo
awk -v a="${P50[two]}" -v b="${P99[two]}" -v c="${P50[direct]}" -v d="${P99[direct]}" -v t="${MAX[two]}" -v f="${MAX[bare]}" \
    -v o="${MAX[one]}" -v m="${MAX[bare+mint]}" \
    'BEGIN { printf "two sidecars add p50 %.3f ms, p99 %.3f ms; throughput %.2f x bare pingora\n", a-c, b-d, t/f;
             printf "one sidecar: %.2f x bare pingora, %.2f x bare pingora minting a token per request\n", o/f, o/m }'
awk -v a="${P50[mtls]}" -v b="${P99[mtls]}" -v c="${P50[two]}" -v d="${P99[two]}" -v t="${MAX[mtls]}" -v f="${MAX[two]}" \
    'BEGIN { printf "mesh mTLS between them adds p50 %.3f ms, p99 %.3f ms; throughput %.2f x plaintext\n", a-c, b-d, t/f }'

# Resources at ~2,000 req/s through both sidecars (20 connections, 10 ms pauses).
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
s0=$(ticks "$spid"); c0=$(ticks "$cpid")
wrk -t1 -c20 -d"${secs}s" -s "$work/paced.lua" -H "${HDR[two]}" "${URL[two]}" > "$work/rss.run"
s1=$(ticks "$spid"); c1=$(ticks "$cpid")
rate=$(field Requests/sec: "$work/rss.run")
for side in server client; do
    pid=$spid; t0=$s0; t1=$s1
    [[ $side == client ]] && { pid=$cpid; t0=$c0; t1=$c1; }
    rss=$(awk '/VmRSS/ { printf "%.1f", $2/1024 }' "/proc/$pid/status")
    awk -v s="$side" -v r="$rss" -v t0="$t0" -v t1="$t1" -v hz="$hz" -v secs="$secs" -v rate="$rate" \
        'BEGIN { cores = (t1 - t0) / hz / secs; printf "%s sidecar at %.0f req/s: RSS %s MiB, CPU %.3f cores (%.3f per 1,000 req/s)\n", s, rate, r, cores, cores / rate * 1000 }'
done
