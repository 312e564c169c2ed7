#!/usr/bin/env bash
# Re-creates the MySQL/MariaDB captures in protocol-parsers/testdata.
# Needs: mariadb-server 10.11 (mariadbd, mariadb-install-db, mariadb client),
# python3 with mysql-connector-python. Uses only 127.0.0.1:23306 (server)
# and 127.0.0.1:23307 (recording relay).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/.."
tmp="$(mktemp -d /tmp/mysql-cap.XXXXXX)"
chown mysql:mysql "$tmp"
mariadb-install-db --datadir="$tmp/data" --user=mysql --auth-root-authentication-method=socket >/dev/null
runuser -u mysql -- mariadbd --no-defaults --datadir="$tmp/data" --port=23306 \
  --bind-address=127.0.0.1 --socket="$tmp/sock" --pid-file="$tmp/pid" \
  --log-error="$tmp/err.log" &
server=$!
trap 'kill $server; wait $server || true; rm -rf "$tmp"' EXIT
for _ in $(seq 50); do [ -S "$tmp/sock" ] && break; sleep 0.2; done
mariadb --socket="$tmp/sock" -u root <<'SQL'
CREATE USER 'cap'@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('cappw');
CREATE USER 'cap'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('cappw');
GRANT ALL ON *.* TO 'cap'@'127.0.0.1';
GRANT ALL ON *.* TO 'cap'@'localhost';
CREATE DATABASE shop;
CREATE TABLE shop.customers (id INT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(64),
  email VARCHAR(128), phone VARCHAR(32), note TEXT NULL);
INSERT INTO shop.customers (name, email, phone, note) VALUES
  ('Alice Example', 'alice@example.com', '+1 555 0100', NULL),
  ('Bob Example', 'bob@example.org', '+1 555 0101', 'vip');
DELIMITER //
CREATE PROCEDURE shop.two_results()
BEGIN
  SELECT id, name FROM shop.customers ORDER BY id;
  SELECT COUNT(*) AS n FROM shop.customers;
END//
DELIMITER ;
SQL

record() { # name, then the client command
  local name="$1"; shift
  python3 "$here/mysql_relay.py" 23307 23306 "$out/mysql_$name" > "$tmp/relay.log" &
  local relay=$!
  for _ in $(seq 50); do grep -q ready "$tmp/relay.log" 2>/dev/null && break; sleep 0.1; done
  "$@" > /dev/null || true
  wait $relay
}

# The mariadb CLI: queries, an error, USE (COM_INIT_DB), multi-results, writes.
cat > "$tmp/cli.sql" <<'SQL'
SELECT id, name, email FROM customers ORDER BY id;
SELECT * FROM no_such_table;
USE mysql;
SELECT DATABASE();
USE shop;
INSERT INTO customers (name, email, phone) VALUES ('Carol Example', 'carol@example.net', '+1 555 0102');
UPDATE customers SET note = 'new' WHERE id = 3;
CALL two_results();
DELETE FROM customers WHERE id = 3;
SQL
record cli sh -c "mariadb -h127.0.0.1 -P23307 -ucap -pcappw --skip-ssl --force shop < '$tmp/cli.sql'"
# A few thousand rows from the sequence engine.
record rows mariadb -h127.0.0.1 -P23307 -ucap -pcappw --skip-ssl shop -e "SELECT seq, seq * 2 FROM seq_1_to_3000"
# Server-side prepared statements (COM_STMT_PREPARE/EXECUTE/CLOSE, binary rows), attributes, auth switch.
record prepared python3 "$here/mysql_prepared.py" 23307
