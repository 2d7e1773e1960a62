"""A local HTTP server for http steps: flaky, slow, large or any status, recording every request."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Upstream:
    """A local HTTP server that fails a given number of times per path, recording every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.failures: dict[str, int] = {}
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.requests.append(
                    {
                        "path": self.path,
                        "method": self.command,
                        "key": self.headers.get("Idempotency-Key"),
                        "body": body.decode(),
                    }
                )
                path = self.path.split("?")[0]
                if path == "/big":
                    self._send(200, {"blob": "x" * (2 * 1024 * 1024)})
                elif path.startswith("/sleep/"):
                    time.sleep(int(path.rsplit("/", 1)[1]) / 1000)
                    self._send(200, {"slept": True})
                elif path.startswith("/status/"):
                    self._send(int(path.rsplit("/", 1)[1]), {"status": "as asked"})
                elif upstream.failures.get(path, 0) > 0:
                    upstream.failures[path] -= 1
                    self._send(503, {"error": "try again"})
                else:
                    self._send(200, {"id": 7, "path": self.path, "echo": body.decode() or None})

            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
