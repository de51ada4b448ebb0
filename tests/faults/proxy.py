"""A loopback HTTP proxy that injects tracker faults in front of a real server.

Each request is forwarded to ``upstream`` unless the ``policy`` picks a fault for it:

- ``"500-before"``: answer 500 without forwarding (the server did nothing);
- ``"500-after"``: forward, let the server do the work, then answer 500 (the answer is lost);
- ``"reset-before"`` / ``"reset-after"``: close the connection without an answer, before or
  after the server did the work;
- ``("delay", seconds)``: wait, then forward;
- ``"corrupt-body"``: forward the request with one byte of its body flipped (a store that
  verifies the checksums a client sends must refuse it).

``keep_host=True`` forwards the ``Host`` header unchanged (S3 clients sign it).

The policy draws from its own seeded ``random.Random``, never the global generator.  Every
request and fault is counted in ``log``, so a test can assert the faults really happened.
Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Fault = Any  # None | str | tuple[str, float]


def random_policy(seed: int, *, p500_before: float = 0.0, p500_after: float = 0.0, preset: float = 0.0,
                  pdelay: float = 0.0, delay: float = 3.0) -> Callable[[str, str], Fault]:
    """Faults drawn independently per request with the given probabilities."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def policy(method: str, path: str) -> Fault:
        if path.startswith("/health"):
            return None
        with lock:
            x = rng.random()
            after = rng.random() < 0.5
        for p, fault in ((p500_before, "500-before"), (p500_after, "500-after"),
                         (preset, "reset-after" if after else "reset-before"), (pdelay, ("delay", delay))):
            if x < p:
                return fault
            x -= p
        return None

    return policy


class FaultProxy:
    def __init__(self, upstream_port: int, policy: Callable[[str, str], Fault] | None = None, *,
                 keep_host: bool = False) -> None:
        self.upstream_port = upstream_port
        self.keep_host = keep_host
        self.policy = policy or (lambda method, path: None)
        self.log: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.policy(self.command, self.path)
                proxy._count("requests")
                if fault == "500-before":
                    proxy._count(fault)
                    return self._reply(500, b'{"error_code": "INTERNAL_ERROR", "message": "injected"}')
                if fault == "reset-before":
                    proxy._count(fault)
                    return self._reset()
                if fault == "corrupt-body" and body:
                    proxy._count(fault)
                    body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) + body[len(body) // 2 + 1:]
                if isinstance(fault, tuple) and fault[0] == "delay":
                    proxy._count("delay")
                    time.sleep(fault[1])
                try:
                    status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                except OSError:
                    proxy._count("upstream-down")
                    return self._reset()
                if fault == "500-after":
                    proxy._count(fault)
                    return self._reply(500, b'{"error_code": "INTERNAL_ERROR", "message": "injected after"}')
                if fault == "reset-after":
                    proxy._count(fault)
                    return self._reset()
                self._reply(status, data, headers)

            def _reply(self, status: int, data: bytes, headers: list[tuple[str, str]] | None = None) -> None:
                self.send_response(status)
                length = str(len(data))
                for k, v in headers or [("Content-Type", "application/json")]:
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v  # a HEAD answer tells the size of what a GET would send
                    elif k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self.close_connection = True

            def _reset(self) -> None:
                try:  # RST instead of FIN: the client sees a connection reset
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                except OSError:
                    pass
                self.close_connection = True
                self.connection.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _count(self, what: str) -> None:
        with self._lock:
            self.log[what] += 1

    def _forward(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            dropped = ("connection", "transfer-encoding", "content-length", *(() if self.keep_host else ("host",)))
            fwd = {k: v for k, v in headers.items() if k.lower() not in dropped}
            fwd["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=fwd)
            resp = conn.getresponse()
            return resp.status, list(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
