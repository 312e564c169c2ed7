#!/usr/bin/env python3
"""A one-connection TCP relay on 127.0.0.1 that records both byte streams.

    mysql_relay.py LISTEN_PORT UPSTREAM_PORT OUT_PREFIX

Accepts a single connection on 127.0.0.1:LISTEN_PORT, relays it to
127.0.0.1:UPSTREAM_PORT and writes what the client sent to
OUT_PREFIX.client.bin and what the server sent to OUT_PREFIX.server.bin.
Exits when both sides have closed.
"""
import socket
import sys
import threading


def pump(src, dst, out):
    with open(out, "wb") as f:
        while True:
            data = src.recv(65536)
            if not data:
                break
            f.write(data)
            try:
                dst.sendall(data)
            except OSError:
                break
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main():
    listen_port, upstream_port, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(1)
    print("ready", flush=True)
    client, _ = srv.accept()
    upstream = socket.create_connection(("127.0.0.1", upstream_port))
    threads = [
        threading.Thread(target=pump, args=(client, upstream, prefix + ".client.bin")),
        threading.Thread(target=pump, args=(upstream, client, prefix + ".server.bin")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
