#!/usr/bin/env bash
# Database benchmark of custody-proxy, all paths in one run, on 127.0.0.1,
# against throwaway servers (custody-testdb from the testkit):
#
#   PostgreSQL 15   pgbench -S (select-only) and pgbench (TPC-B-like),
#                   each in -M simple and -M prepared, through
#                     direct     pgbench -> PostgreSQL
#                     sidecar    pgbench -> custody-proxy (databases: postgres) -> PostgreSQL
#                     pgbouncer  pgbench -> pgbouncer (session pooling) -> PostgreSQL
#   MariaDB 10.11   sysbench oltp_point_select, text protocol and prepared
#                   statements, through
#                     direct     sysbench -> MariaDB
#                     sidecar    sysbench -> custody-proxy (databases: mysql) -> MariaDB
#
# Prints TPS and average latency per run, and both as a ratio of the direct
# run of the same workload (measured right before it), as a markdown table,
# with the proxy's own CPU per transaction (user + system time of the
# sidecar or pgbouncer process over the run, divided by the transactions):
# the figure least disturbed by other load on the machine.
# A path that cannot be set up or fails prints n/a and the run goes on.
# Ports: 18110-18119 (sidecar: 18113 PostgreSQL, 18114 MySQL; 18115
# pgbouncer), checked free first; the databases take free ports.
#
#   proxy/bench/db.sh [seconds per run, default 15]
#   BENCH_CLIENTS (default 8), BENCH_SCALE (pgbench scale and sysbench
#   table size in 10,000 rows, default 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-15}"
clients="${BENCH_CLIENTS:-8}"
scale="${BENCH_SCALE:-10}"
work="$(mktemp -d)"
pgb="$(mktemp -d)" # pgbouncer's files, owned by the user it runs as
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work" "$pgb"
}
trap cleanup EXIT

cargo build --release --quiet --locked -p custody-proxy --bin custody-proxy -p custody-testkit --bin custody-testdb
bin=target/release
SIDECAR_PG=127.0.0.1:18113 SIDECAR_MY=127.0.0.1:18114 PGBOUNCER=127.0.0.1:18115

note() { echo "$*" >&2; }
wait_port() { # addr tries
    for _ in $(seq "${2:-200}"); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.05; done
    return 1
}

# A listener sharing a port (SO_REUSEPORT) would take part of the traffic.
for port in $(seq 18110 18119); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then note "port $port is in use"; exit 1; fi
done

# --- the servers -------------------------------------------------------------
start_db() { # kind variable-prefix [custody-testdb options]
    "$bin/custody-testdb" "$1" --ignore-stdin "${@:3}" > "$work/$1.env" 2> "$work/$1.err" &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 1200); do
        grep -q '^DB_READY=1' "$work/$1.env" && break
        kill -0 "$pid" 2>/dev/null || { cat "$work/$1.err" >&2; exit 1; }
        sleep 0.1
    done
    grep -q '^DB_READY=1' "$work/$1.env" || { note "$1 did not start"; exit 1; }
    eval "$(sed -n "s/^DB_/$2_/p" "$work/$1.env")"
}
start_db postgres PG --setting max_connections=200
start_db mariadb MY
PG_UP="$PG_HOST:$PG_PORT" MY_UP="$MY_HOST:$MY_PORT"
export PGPASSWORD="$PG_PASSWORD"

note "loading pgbench (scale $scale) and sysbench ($((scale * 10000)) rows x 4 tables)"
pgbench -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -i -s "$scale" -q "$PG_NAME" > "$work/pgbench-init.log" 2>&1 ||
    { cat "$work/pgbench-init.log" >&2; exit 1; }
sysbench_args=(--db-driver=mysql --mysql-user="$MY_USER" --mysql-password="$MY_PASSWORD" --mysql-db="$MY_NAME"
               --tables=4 --table-size=$((scale * 10000)))
sysbench oltp_point_select "${sysbench_args[@]}" --mysql-host="$MY_HOST" --mysql-port="$MY_PORT" prepare \
    > "$work/sysbench-prepare.log" 2>&1 || { cat "$work/sysbench-prepare.log" >&2; exit 1; }

# --- pgbouncer, session pooling, SCRAM on both sides --------------------------
declare -A AVAILABLE=([direct]=1)
cat > "$pgb/userlist.txt" <<EOF
"$PG_USER" "$PG_PASSWORD"
EOF
cat > "$pgb/pgbouncer.ini" <<EOF
[databases]
$PG_NAME = host=$PG_HOST port=$PG_PORT dbname=$PG_NAME
[pgbouncer]
listen_addr = ${PGBOUNCER%:*}
listen_port = ${PGBOUNCER#*:}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $pgb/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = $((clients + 4))
logfile = $pgb/pgbouncer.log
ignore_startup_parameters = extra_float_digits
EOF
run_as=()
if [[ $(id -u) == 0 ]]; then # pgbouncer refuses root: run it as the databases' user
    chown -R custody-test "$pgb"
    run_as=(runuser -u custody-test --)
fi
"${run_as[@]}" pgbouncer "$pgb/pgbouncer.ini" > /dev/null 2>&1 &
pids+=($!)
if wait_port "$PGBOUNCER" && psql -h "${PGBOUNCER%:*}" -p "${PGBOUNCER#*:}" -U "$PG_USER" -d "$PG_NAME" -X -q -c 'SELECT 1' > /dev/null 2>&1; then
    AVAILABLE[pgbouncer]=1
else
    note "pgbouncer path unavailable: $(tail -n 2 "$pgb/pgbouncer.log" 2>/dev/null)"
fi

# --- the sidecar, with one database listener per server ------------------------
printf '%064x\n' 3 > "$work/sidecar.seed"
cat > "$work/sidecar.yaml" <<YAML
workload: { trust_domain: bench, namespace: bench, service_account: db-bench, pod: db-bench-0 }
listeners: { inbound: "127.0.0.1:18110", outbound: "127.0.0.1:18111", admin: "127.0.0.1:18112" }
inbound: { upstream: "127.0.0.1:18119" }
outbound: { mode: explicit }
signing: { seed_file: "$work/sidecar.seed" }
exporter: { jsonl_file: "$work/sidecar.hops.jsonl" }
shutdown: { grace_period_secs: 0 }
databases:
  - protocol: postgres
    listen: "$SIDECAR_PG"
    upstream: "$PG_UP"
  - protocol: mysql
    listen: "$SIDECAR_MY"
    upstream: "$MY_UP"
YAML
RUST_LOG=warn "$bin/custody-proxy" --config "$work/sidecar.yaml" > /dev/null 2> "$work/sidecar.err" &
sidecar=$!
pids+=("$sidecar")
if wait_port "$SIDECAR_PG" 100 && wait_port "$SIDECAR_MY" 20 && kill -0 "$sidecar" 2>/dev/null; then
    AVAILABLE[sidecar]=1
else
    note "sidecar path unavailable: $(grep -m1 -iE 'error|unknown' "$work/sidecar.err" || tail -n 1 "$work/sidecar.err")"
fi

# --- runs ------------------------------------------------------------------------
declare -A ADDR=([direct]="$PG_UP" [sidecar]="$SIDECAR_PG" [pgbouncer]="$PGBOUNCER")
declare -A MYADDR=([direct]="$MY_UP" [sidecar]="$SIDECAR_MY")

row() { # database workload protocol path tps latency direct-tps direct-latency [cpu-ticks transactions]
    awk -v d="$1" -v w="$2" -v m="$3" -v p="$4" -v t="$5" -v l="$6" -v dt="$7" -v dl="$8" \
        -v ticks="${9:-}" -v n="${10:-}" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        if (t == "" || l == "") { printf "| %s | %s | %s | %s | n/a | n/a | n/a | n/a | n/a |\n", d, w, m, p; exit }
        rt = (dt > 0) ? sprintf("%.3f", t / dt) : "n/a"
        rl = (dl > 0) ? sprintf("%.3f", l / dl) : "n/a"
        cpu = (ticks != "" && n > 0) ? sprintf("%.1f", ticks / hz / n * 1e6) : ""
        printf "| %s | %s | %s | %s | %.0f | %.3f | %s | %s | %s |\n", d, w, m, p, t, l, rt, rl, cpu
    }'
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
declare -A PROC=([sidecar]="$sidecar")
if [[ -n "${AVAILABLE[pgbouncer]:-}" ]]; then PROC[pgbouncer]=$(pgrep -n -f "pgbouncer $pgb/pgbouncer.ini" || true); fi

echo "| database | workload | protocol | path | TPS | avg latency (ms) | TPS vs direct | latency vs direct | proxy CPU per transaction (µs) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for workload in select-only tpcb-like; do
    flags=()
    [[ $workload == select-only ]] && flags=(-S)
    for mode in simple prepared; do
        dt= dl=
        for path in direct sidecar pgbouncer; do
            tps= lat= used= done=
            if [[ -n "${AVAILABLE[$path]:-}" ]]; then
                a="${ADDR[$path]}"
                out="$work/pg-$workload-$mode-$path.log"
                proc="${PROC[$path]:-}"
                [[ -n $proc ]] && t0=$(ticks "$proc")
                if pgbench -h "${a%:*}" -p "${a#*:}" -U "$PG_USER" "${flags[@]}" -M "$mode" \
                    -c "$clients" -j 2 -T "$secs" "$PG_NAME" > "$out" 2>&1; then
                    tps=$(awk '/^tps = / { print $3; exit }' "$out")
                    lat=$(awk '/^latency average = / { print $4; exit }' "$out")
                    if [[ -n $proc ]]; then
                        used=$(( $(ticks "$proc") - t0 ))
                        done=$(awk -F': ' '/number of transactions actually processed/ { split($2, a, "/"); print a[1]; exit }' "$out")
                    fi
                else
                    note "pgbench $workload $mode via $path failed: $(tail -n 1 "$out")"
                fi
            fi
            [[ $path == direct ]] && { dt=$tps; dl=$lat; }
            row PostgreSQL "pgbench $workload" "$mode" "$path" "$tps" "$lat" "$dt" "$dl" "$used" "$done"
        done
    done
done
for mode in text prepared; do
    ps=disable
    [[ $mode == prepared ]] && ps=auto
    dt= dl=
    for path in direct sidecar; do
        tps= lat= used= done=
        if [[ -n "${AVAILABLE[$path]:-}" ]]; then
            a="${MYADDR[$path]}"
            out="$work/my-$mode-$path.log"
            [[ $path == sidecar ]] && t0=$(ticks "$sidecar")
            if sysbench oltp_point_select "${sysbench_args[@]}" --mysql-host="${a%:*}" --mysql-port="${a#*:}" \
                --db-ps-mode="$ps" --threads="$clients" --time="$secs" --report-interval=0 run > "$out" 2>&1; then
                tps=$(awk '/transactions:/ { gsub(/\(/, "", $3); print $3; exit }' "$out")
                lat=$(awk '$1 == "avg:" { print $2; exit }' "$out")
                if [[ $path == sidecar ]]; then
                    used=$(( $(ticks "$sidecar") - t0 ))
                    done=$(awk '/transactions:/ { print $2; exit }' "$out")
                fi
            else
                note "sysbench $mode via $path failed: $(tail -n 1 "$out")"
            fi
        fi
        [[ $path == direct ]] && { dt=$tps; dl=$lat; }
        row MariaDB "sysbench oltp_point_select" "$mode" "$path" "$tps" "$lat" "$dt" "$dl" "$used" "$done"
    done
done
echo
echo "$clients clients, ${secs} s per run, pgbench scale $scale, sysbench 4 x $((scale * 10000)) rows; one machine, $(nproc) cores."
