#!/usr/bin/env python3
"""Prepared-statement client for the MySQL captures (mysql-connector-python, pure Python).

    mysql_prepared.py PORT
"""
import sys

import mysql.connector

conn = mysql.connector.connect(
    host="127.0.0.1",
    port=int(sys.argv[1]),
    user="cap",
    password="cappw",
    database="shop",
    use_pure=True,
    ssl_disabled=True,
    auth_plugin="mysql_native_password",
    conn_attrs={"app": "billing", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
)
cur = conn.cursor(prepared=True)
cur.execute("SELECT id, name, email, note, CAST(id AS DOUBLE) AS d, CAST('2024-01-02 03:04:05' AS DATETIME) AS t FROM customers WHERE id >= ?", (1,))
cur.fetchall()
cur.execute("SELECT id, name, email, note, CAST(id AS DOUBLE) AS d, CAST('2024-01-02 03:04:05' AS DATETIME) AS t FROM customers WHERE id >= ?", (2,))
cur.fetchall()
cur2 = conn.cursor(prepared=True)
cur2.execute("UPDATE customers SET note = ? WHERE id = ?", ("gold", 2))
try:
    cur2.execute("SELECT nope FROM customers WHERE id = ?", (1,))
except mysql.connector.Error:
    pass
cur.close()
cur2.close()
conn.close()
