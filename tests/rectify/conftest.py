"""Shared fixtures: an OpenAI-compatible server on 127.0.0.1 that wraps the offline endpoint and
injects faults chosen by a tag in the problem text, e.g. ``[fault:500x2]``."""
import hashlib
import json
import re
import threading
import time
from collections import Counter

import pytest

from examples.offline_oracle import OfflineEndpoint

from .loopback import LoopbackServer

TAG_RE = re.compile(r"\[fault:([a-z0-9]+)\]")
SECRET = "sk-test-SECRET-do-not-leak-7f3a9c"


def body_id(payload) -> str:
    return hashlib.sha256(json.dumps(payload.get("messages") or payload.get("prompt"), sort_keys=True).encode()).hexdigest()


class FaultServer:
    """Counts every request per body; answers per the fault tag found in the request text."""

    def __init__(self, endpoint=None, delay: float = 0.0, hang: float = 1.0, status_override=None):
        self.endpoint = endpoint or OfflineEndpoint()
        self.delay, self.hang = delay, hang
        self.status_override = status_override
        self.lock = threading.Lock()
        self.requests = Counter()       # body id -> requests received
        self.ok = Counter()             # body id -> 200s with a valid answer sent
        self.payloads = {}
        self.auth = Counter()
        self.server = LoopbackServer(self.respond)

    @property
    def url(self):
        return self.server.url

    def respond(self, path, headers, payload, raw):
        if payload is None:
            return 400, {}, b"{}"
        bid = body_id(payload)
        with self.lock:
            self.requests[bid] += 1
            n = self.requests[bid]
            self.payloads[bid] = payload
            # header names are case-insensitive (the SDK's httpx sends them lower-case)
            self.auth[{k.lower(): v for k, v in headers.items()}.get("authorization", "")] += 1
        if self.status_override:
            return self.status_override, {}, b'{"error": {"message": "nope"}}'
        text = json.dumps(payload)
        m = TAG_RE.search(text)
        tag = m.group(1) if m else ""
        if self.delay:
            time.sleep(self.delay)
        fm = re.fullmatch(r"(500|429|timeout|malformed|drop)x(\d+|inf)", tag)
        hung = False
        if fm and (fm.group(2) == "inf" or n <= int(fm.group(2))):
            kind = fm.group(1)
            if kind == "500":
                return 500, {}, b'{"error": {"message": "internal"}}'
            if kind == "429":
                return 429, {"Retry-After": "0.05"}, b'{"error": {"message": "slow down"}}'
            if kind == "timeout":
                time.sleep(self.hang)  # longer than the client's timeout: the client has gone
                hung = True
            elif kind == "malformed":
                return 200, {"Content-Type": "application/json"}, b'{"choices": [ {"mess'
            elif kind == "drop":
                return 200, {}, None
        if tag == "400":
            return 400, {}, b'{"error": {"message": "context too long"}}'
        status, obj = self.endpoint.handle(path, payload)
        content = obj["choices"][0]["message"]["content"]
        if tag == "nomarkers":
            content = content.replace("=== CORRECTED STARTED ===", "").replace("=== CORRECTED ENDED ===", "")
        elif tag == "noend":
            content = content.replace("=== CORRECTED ENDED ===", "")
            obj["choices"][0]["finish_reason"] = "length"
        elif tag == "wrong":
            content = re.sub(r"\\boxed\{(\d+)\}", lambda mm: "\\boxed{%d}" % (int(mm.group(1)) + 1), content)
        elif tag == "rewrite":
            content = ("=== CORRECTED STARTED ===\nA completely different write-up: "
                       + " ".join(f"w{i}" for i in range(80)) + "\n\n"
                       + re.search(r"Therefore.*\$\.", content).group(0) + "\n=== CORRECTED ENDED ===")
        obj["choices"][0]["message"]["content"] = content
        if not hung:
            with self.lock:
                self.ok[bid] += 1
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


@pytest.fixture
def serve():
    """``serve(server)`` starts a LoopbackServer, or a test server holding one at ``.server``, and returns
    it; every server started this way is closed when the test ends, passed or failed."""
    started = []

    def start(server):
        loopback = server if isinstance(server, LoopbackServer) else server.server
        loopback.start()
        started.append(loopback)
        return server

    yield start
    for loopback in started:
        loopback.close()


@pytest.fixture
def fault_server(serve):
    """``fault_server(**FaultServer kwargs)``: a started FaultServer, closed after the test."""
    return lambda **kw: serve(FaultServer(**kw))


def scan_for_secret(root, secret=SECRET):
    """Paths under root whose bytes contain the secret."""
    import os

    hits = []
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                if secret.encode() in fh.read():
                    hits.append(p)
    return hits
