"""Local HTTP servers for http and llm steps: flaky, slow, large or any status, recording every request."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web


class Upstream:
    """A local HTTP server that fails a given number of times per path, recording every request.

    ``/hold/<name>`` answers once :meth:`release` is called with that name (at most after 30 s).
    Misbehaving answers, for clients that must not trust them: ``/redirect?to=<url>`` (302 there),
    ``/loop/<n>`` (302 to ``/loop/<n+1>``, for ever), ``/html`` (an HTML page), ``/badjson``
    (``application/json`` that is not JSON), ``/endless`` (a body that never ends), ``/trickle``
    (a byte every 200 ms, for up to 30 s) and ``/template`` (JSON holding template expressions).
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.failures: dict[str, int] = {}
        self.holds: dict[str, threading.Event] = {}
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
                        "authorization": self.headers.get("Authorization"),
                        "traceparent": self.headers.get("traceparent"),
                        "body": body.decode(),
                    }
                )
                path = self.path.split("?")[0]
                if self._misbehave(path):
                    return
                if path == "/big":
                    self._send(200, {"blob": "x" * (2 * 1024 * 1024)})
                elif path.startswith("/sleep/"):
                    time.sleep(int(path.rsplit("/", 1)[1]) / 1000)
                    self._send(200, {"slept": True})
                elif path.startswith("/hold/"):
                    upstream.holds.setdefault(path.rsplit("/", 1)[1], threading.Event()).wait(30)
                    self._send(200, {"held": True})
                elif path.startswith("/status/"):
                    self._send(int(path.rsplit("/", 1)[1]), {"status": "as asked"})
                elif upstream.failures.get(path, 0) > 0:
                    upstream.failures[path] -= 1
                    self._send(503, {"error": "try again"})
                else:
                    self._send(200, {"id": 7, "path": self.path, "echo": body.decode() or None})

            def _misbehave(self, path: str) -> bool:
                if path == "/redirect":
                    to = parse_qs(urlsplit(self.path).query)["to"][0]
                    return self._raw(302, b"", "text/plain", {"Location": to})
                if path.startswith("/loop/"):
                    n = int(path.rsplit("/", 1)[1])
                    return self._raw(302, b"", "text/plain", {"Location": f"/loop/{n + 1}"})
                if path == "/html":
                    return self._raw(200, b"<html><body>not an API</body></html>", "text/html")
                if path == "/badjson":
                    return self._raw(200, b'{"truncated": [1, 2', "application/json")
                if path == "/template":
                    text = "{{ secrets.DB_PASSWORD }} {{ input.v }} {{ 6 * 7 }}"
                    return self._raw(200, json.dumps({"text": text}).encode(), "application/json")
                if path == "/endless":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    return self._stream(b"x" * 65536, 0, 800)  # 50 MiB at most
                if path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    return self._stream(b" ", 0.2, 150)
                return False

            def _stream(self, chunk: bytes, pause: float, times: int) -> bool:
                try:
                    for _ in range(times):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        time.sleep(pause)
                except OSError:
                    pass  # the client gave up, as it should
                return True

            def _raw(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> bool:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                return True

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

    def release(self, name: str) -> None:
        """Answer the requests held under ``name``, and those to come."""
        self.holds.setdefault(name, threading.Event()).set()

    def close(self) -> None:
        for hold in self.holds.values():
            hold.set()
        self.server.shutdown()
        self.server.server_close()


class LlmUpstream:
    """A local OpenAI-compatible chat completions API (aiohttp, on a thread of its own), recording requests.

    ``POST {base}/chat/completions`` answers by the request's ``model``, so concurrent tests do not
    interfere: statuses queued with :meth:`fail` come first; then ``status-<code>`` always answers
    that status with an OpenAI error body, ``no-choices`` a completion without choices, ``not-json``
    a text body, ``big`` a body over 1 MiB, ``sleep-<ms>`` sleeps first, ``echo-key`` repeats the
    ``Authorization`` header in its text; any other model answers ``"echo: <last message>"``.
    Usage counts are words: ``prompt_tokens`` of every message, ``completion_tokens`` of the answer.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.failures: dict[str, list[int]] = {}
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the llm upstream did not start")
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def fail(self, model: str, *statuses: int) -> None:
        """Answer the next requests for ``model`` with these statuses, in order (then normally)."""
        self.failures.setdefault(model, []).extend(statuses)

    def of(self, model: str) -> list[dict[str, Any]]:
        """The requests received for ``model``: ``{path, authorization, body}``."""
        return [r for r in self.requests if isinstance(r["body"], dict) and r["body"].get("model") == model]

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port: int = runner.addresses[0][1]
        self._stop = asyncio.Event()
        ready.set()
        self._loop.run_until_complete(self._stop.wait())
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        self.requests.append(
            {
                "path": request.path,
                "authorization": request.headers.get("Authorization"),
                "traceparent": request.headers.get("traceparent"),
                "body": body,
            }
        )
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        messages = body.get("messages", []) if isinstance(body, dict) else []
        queued = self.failures.get(model)
        if queued:
            return _llm_error(queued.pop(0))
        if model.startswith("status-"):
            return _llm_error(int(model.removeprefix("status-")))
        if model.startswith("sleep-"):
            await asyncio.sleep(int(model.removeprefix("sleep-")) / 1000)
        if model == "not-json":
            return web.Response(text="<html>gateway says hi</html>", content_type="text/html")
        if model == "big":
            return web.json_response({"choices": [{"message": {"content": "x" * (2 * 1024 * 1024)}}]})
        prompt = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
        if model == "echo-key":
            text = f"you sent {request.headers.get('Authorization')}"
        else:
            text = "echo: " + (str(messages[-1].get("content", "")) if messages else "")
        usage = {"prompt_tokens": prompt, "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if model == "no-choices":
            return web.json_response({"id": "chatcmpl-0", "object": "chat.completion", "choices": [], "usage": usage})
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    def close(self) -> None:
        stop = self._stop
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)


def _llm_error(status: int) -> web.Response:
    """An error as OpenAI words it."""
    error = {"message": f"upstream says {status}", "type": "server_error" if status >= 500 else "invalid_request_error"}
    return web.json_response({"error": {**error, "code": None}}, status=status)
