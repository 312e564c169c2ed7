#!/usr/bin/env bash
# Captures PostgreSQL 15 wire sessions for the decoder tests.
#
# Run as root from anywhere: ./pg_capture.sh OUTDIR
# It initdbs a throwaway cluster in a temp dir (owned by user capuser-pg),
# starts it on 127.0.0.1:25432, relays clients through relay.py on
# 127.0.0.1:25433, and writes OUTDIR/pg_<name>-<n>.{client,server}.bin.
set -euo pipefail
OUT=$(realpath "${1:?outdir}")
HERE=$(dirname "$(realpath "$0")")
BIN=/usr/lib/postgresql/15/bin
PGPORT=25432
RELAY=25433
USER_OS=capuser-pg
id "$USER_OS" >/dev/null 2>&1 || useradd -m "$USER_OS"
TMP=$(mktemp -d /tmp/pgcap.XXXXXX)
chown "$USER_OS" "$TMP"
run() { runuser -u "$USER_OS" -- "$@"; }
run "$BIN/initdb" -D "$TMP/data" -U postgres --auth-local=trust --auth-host=reject >/dev/null
cat > "$TMP/data/pg_hba.conf" <<HBA
local all postgres trust
host all capture_scram 127.0.0.1/32 scram-sha-256
host all capture_md5 127.0.0.1/32 md5
host all capture_clear 127.0.0.1/32 password
HBA
run "$BIN/pg_ctl" -D "$TMP/data" -l "$TMP/log" -w start \
  -o "-p $PGPORT -k $TMP -c listen_addresses=127.0.0.1 -c ssl=off"
trap 'run "$BIN/pg_ctl" -D "$TMP/data" -m fast stop >/dev/null; kill $RELAY_PID 2>/dev/null || true; rm -rf "$TMP"' EXIT
RELAY_PID=
psql_admin() { run "$BIN/psql" -h "$TMP" -p $PGPORT -U postgres -v ON_ERROR_STOP=1 -q "$@"; }
psql_admin -d postgres <<SQL
SET password_encryption = 'scram-sha-256';
CREATE USER capture_scram PASSWORD 'scram-secret';
CREATE USER capture_clear PASSWORD 'clear-secret';
SET password_encryption = 'md5';
CREATE USER capture_md5 PASSWORD 'md5-secret';
CREATE DATABASE capture OWNER capture_scram;
SQL
# pgbench tables are created directly (not through the relay: the COPY of
# 100,000 rows would make the capture megabytes).
PGPASSWORD=scram-secret run "$BIN/pgbench" -h 127.0.0.1 -p $PGPORT -U capture_scram -i -s 1 -q capture >/dev/null 2>&1

relay() { # name
  python3 "$HERE/relay.py" $RELAY $PGPORT "$OUT/pg_$1" & RELAY_PID=$!
  sleep 0.5
}
stop_relay() { sleep 0.3; kill $RELAY_PID; wait $RELAY_PID 2>/dev/null || true; RELAY_PID=; }

# 1. psql, simple query protocol, SCRAM-SHA-256, sslmode=prefer (SSLRequest answered 'N').
relay psql
PGPASSWORD=scram-secret PGAPPNAME=custody-capture "$BIN/psql" -h 127.0.0.1 -p $RELAY -U capture_scram -d capture -X -q >/dev/null 2>&1 <<'SQL' || true
SELECT 1 AS one, 'two' AS two;
CREATE TABLE people (id int PRIMARY KEY, email text, note text);
INSERT INTO people VALUES (1, 'ada@example.com', NULL), (2, 'bob@example.com', 'x');
UPDATE people SET note = 'y' WHERE id = 2;
SELECT id, email, note FROM people ORDER BY id;
SELECT * FROM no_such_table;
COPY people TO STDOUT;
COPY people FROM STDIN;
3	cy@example.com	\N
4	di@example.com	z
\.
SELECT count(*) FROM people\; DELETE FROM people WHERE id > 2\; SELECT 'done' AS status;
;
SET application_name = 'custody-renamed';
DELETE FROM people;
SQL
stop_relay

# 2. pgbench, extended protocol (unnamed statements), sslmode=disable.
relay pgbench_extended
PGPASSWORD=scram-secret PGSSLMODE=disable PGAPPNAME=bench-ext "$BIN/pgbench" -h 127.0.0.1 -p $RELAY -U capture_scram -n -M extended -c 1 -t 2 capture >/dev/null 2>&1
stop_relay

# 3. pgbench, prepared mode (named statements P_0.. reused across transactions).
relay pgbench_prepared
PGPASSWORD=scram-secret PGSSLMODE=disable PGAPPNAME=bench-prep "$BIN/pgbench" -h 127.0.0.1 -p $RELAY -U capture_scram -n -M prepared -c 1 -t 3 capture >/dev/null 2>&1
stop_relay

# 4. md5 and cleartext password users.
relay md5
PGPASSWORD=md5-secret PGSSLMODE=disable "$BIN/psql" -h 127.0.0.1 -p $RELAY -U capture_md5 -d capture -X -q -c "SELECT current_user" >/dev/null
stop_relay
relay cleartext
PGPASSWORD=clear-secret PGSSLMODE=disable "$BIN/psql" -h 127.0.0.1 -p $RELAY -U capture_clear -d capture -X -q -c "SELECT current_user" >/dev/null
stop_relay

# 5. psycopg 3 with server-side prepared statements (named _pg3_N), if installed.
if python3 -c 'import psycopg' 2>/dev/null; then
  relay psycopg_prepared
  python3 - "$RELAY" <<'PY'
import sys, psycopg
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="capture_scram",
                     password="scram-secret", dbname="capture", sslmode="disable",
                     application_name="psycopg-prep") as conn:
    for i in range(3):
        conn.execute("SELECT aid, abalance FROM pgbench_accounts WHERE aid <= %s ORDER BY aid",
                     (i + 2,), prepare=True).fetchall()
    conn.execute("UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = %s", (1,), prepare=True)
    try:
        conn.execute("SELECT 1/%s::int", (0,), prepare=True)
    except psycopg.errors.DivisionByZero:
        conn.rollback()
PY
  stop_relay
fi
ls -l "$OUT"/pg_*
