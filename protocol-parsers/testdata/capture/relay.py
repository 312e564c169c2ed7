#!/usr/bin/env python3
"""A TCP relay on 127.0.0.1 that records each connection's two byte streams.

Usage: relay.py LISTEN_PORT UPSTREAM_PORT OUT_PREFIX

Connection N (counting from 0) is written to OUT_PREFIX-N.client.bin (bytes
the client sent) and OUT_PREFIX-N.server.bin (bytes the server sent). Both
ends are on loopback only. Stop it with SIGTERM once the client is done.
"""
import selectors
import socket
import sys


def main() -> None:
    listen_port, upstream_port, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", listen_port))
    lsock.listen(8)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    count = 0
    while True:
        for key, _ in sel.select():
            if key.data is None:
                client, _ = lsock.accept()
                server = socket.create_connection(("127.0.0.1", upstream_port))
                cfile = open(f"{prefix}-{count}.client.bin", "wb")
                sfile = open(f"{prefix}-{count}.server.bin", "wb")
                count += 1
                sel.register(client, selectors.EVENT_READ, (server, cfile))
                sel.register(server, selectors.EVENT_READ, (client, sfile))
                continue
            src = key.fileobj
            dst, out = key.data
            data = src.recv(65536)
            if not data:
                for s in (src, dst):
                    try:
                        sel.unregister(s)
                    except (KeyError, ValueError):
                        pass
                    s.close()
                out.flush()
                continue
            out.write(data)
            out.flush()
            dst.sendall(data)


if __name__ == "__main__":
    main()
