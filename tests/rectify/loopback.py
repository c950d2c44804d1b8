"""A tiny OpenAI-compatible HTTP server on 127.0.0.1 (tests, demos, `tools/rectify.py serve-offline`).

``LoopbackServer(respond)`` serves POST ``.../chat/completions`` and ``.../completions``;
``respond(path, headers, payload_or_None, raw_body) -> (status, headers, body_bytes)`` decides the
answer, so tests can inject faults (500, 429 + Retry-After, slow answers, malformed JSON) around
the offline endpoint. It binds loopback only.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


def endpoint_responder(endpoint) -> Callable:
    """Adapt an ``OfflineEndpoint`` to the responder signature."""

    def respond(path, headers, payload, raw):
        if payload is None:
            return 400, {}, b'{"error": {"message": "invalid JSON"}}'
        status, obj = endpoint.handle(path, payload)
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()

    return respond


def chat_reply(content: str) -> tuple[int, dict, bytes]:
    """A responder's 200 answer: one assistant message `content` with OpenAI's chat-completion shape."""
    body = {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


class LoopbackServer:
    def __init__(self, respond: Callable, host: str = "127.0.0.1", port: int = 0):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("LoopbackServer binds loopback addresses only")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                try:
                    payload = json.loads(raw.decode("utf-8"))
                except Exception:
                    payload = None
                try:
                    status, hdrs, body = outer.respond(self.path, dict(self.headers), payload, raw)
                except Exception as e:  # a responder bug becomes a 500, like a real server
                    status, hdrs, body = 500, {}, json.dumps({"error": {"message": repr(e)}}).encode()
                if body is None:  # responder wants the connection dropped
                    self.close_connection = True
                    return
                try:
                    self.send_response(status)
                    for k, v in hdrs.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.respond = respond
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "LoopbackServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="loopback", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
