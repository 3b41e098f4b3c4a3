"""An origin that answers every request with a body sent in one-byte chunks.

What a hostile origin (or, southbound, a hostile agent) does to make a relay work once
per byte rather than once per read: ``1\\r\\nx\\r\\n`` over and over, all sent at once.
Run as its own process, so that its CPU is never counted as the relay's:

    python bench/chunky.py PORT CHUNKS
"""

from __future__ import annotations

import socketserver
import sys


def answer(chunks: int) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
            + b"1\r\nx\r\n" * chunks + b"0\r\n\r\n")


def serve(port: int, chunks: int) -> None:
    whole = answer(chunks)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:  # keep-alive: one answer per request head, until the client closes
                line = self.rfile.readline(65537)
                while line not in (b"\r\n", b"\n", b""):
                    line = self.rfile.readline(65537)
                if not line:
                    return
                self.wfile.write(whole)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server(("127.0.0.1", port), Handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
