"""OpenAI-compatible client for the Oracle (and for elicitation through vLLM/SGLang servers).

What it does, per request: POST ``{base_url}/chat/completions`` (or ``/completions``) with a JSON
body; on HTTP 429, 408, 409 and 5xx, on timeouts, connection errors and malformed JSON it retries
with exponential backoff and jitter (``base * 2**attempt``, capped, "equal jitter": half fixed,
half random), honouring ``Retry-After`` / ``retry-after-ms`` when the server sends one. 400 and
other 4xx answers are per-item failures (not retried); 401/403/404 abort the whole stage
(wrong key, URL or model: retrying thousands of items would not help).

Across requests: N in flight (a thread pool; the HTTP work releases the GIL), a request budget
(every HTTP attempt counts, retries included; when it runs out the remaining items fail with
``budget_exhausted`` and are NOT cached, so a rerun with a larger budget continues), token and
cost accounting from the responses' ``usage``, and the SQLite cache (see cache.py): each success
is committed the moment it arrives.

The transport is pluggable: ``HttpTransport`` (requests, one keep-alive session per thread) for
real servers, ``offline.OfflineTransport`` for the built-in calculator oracle. Everything above
the transport (retries, budget, cache, parsing) is the same code path for both.

The API key is read from the environment by ``api_key_from_env`` and only ever placed in the
``Authorization`` header; it is not stored on the client's public attributes, in stats, in the
cache or in any exception message.
"""
from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol

from .cache import RequestCache

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}
FATAL_STATUS = {401, 403, 404}


def api_key_from_env(names: Iterable[str] = ("ORACLE_API_KEY", "OPENAI_API_KEY")) -> Optional[str]:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


@dataclass
class TransportResponse:
    status: int
    headers: dict  # lower-cased names
    body: bytes


class TransportTimeout(Exception):
    pass


class TransportError(Exception):
    pass


class Transport(Protocol):
    def post(self, url: str, headers: dict, body: bytes, timeout: float) -> TransportResponse: ...


class HttpTransport:
    """requests-based transport; one Session (connection pool) per worker thread. Loopback URLs
    never go through an HTTP(S)_PROXY from the environment."""

    _LOOPBACK = ("127.0.0.1", "localhost", "[::1]")

    def __init__(self, max_response_bytes: Optional[int] = None):
        self._local = threading.local()
        self.max_response_bytes = max_response_bytes

    def _session(self, loopback: bool):
        name = "loopback" if loopback else "remote"
        s = getattr(self._local, name, None)
        if s is None:
            import requests

            s = requests.Session()
            s.trust_env = not loopback
            setattr(self._local, name, s)
        return s

    def post(self, url, headers, body, timeout):
        import requests
        from urllib.parse import urlsplit

        host = urlsplit(url).netloc.rsplit("@", 1)[-1]
        loopback = host.split(":")[0] in self._LOOPBACK or host.startswith("[::1]")
        try:
            r = self._session(loopback).post(url, data=body, headers=headers, timeout=(min(timeout, 30.0), timeout),
                                             stream=True)
            try:
                # read at most one byte past the cap: an oversized answer never sits whole in memory
                limit = None if self.max_response_bytes is None else self.max_response_bytes + 1
                chunks, size = [], 0
                for chunk in r.iter_content(chunk_size=1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if limit is not None and size >= limit:
                        break
                content = b"".join(chunks)
            finally:
                r.close()
        except requests.exceptions.Timeout:
            raise TransportTimeout("request timed out") from None
        except requests.exceptions.RequestException as e:
            # the exception type only: messages can echo request details
            raise TransportError(type(e).__name__) from None
        return TransportResponse(r.status_code, {k.lower(): v for k, v in r.headers.items()}, content)


# Largest HTTP response body accepted (the answer plus its JSON envelope). A 32k-token solution is
# ~130 KB; 4 MiB leaves room for long reasoning while bounding what a misbehaving server can write.
DEFAULT_MAX_ANSWER_BYTES = 4 * 2**20


class FatalRequestError(RuntimeError):
    """The endpoint refuses every request (auth, URL, model): stop the stage."""


class BudgetExhausted(Exception):
    pass


class Interrupted(Exception):
    pass


@dataclass
class RetryPolicy:
    max_retries: int = 6          # attempts = 1 + max_retries
    base_delay: float = 1.0       # seconds; backoff = base * 2**attempt, equal jitter
    max_delay: float = 60.0
    max_retry_after: float = 300.0  # cap on a server's Retry-After


@dataclass
class Job:
    key: str
    body: dict


@dataclass
class JobResult:
    key: str
    ok: bool
    content: Optional[str] = None
    finish_reason: Optional[str] = None
    usage: dict = field(default_factory=dict)
    cached: bool = False
    error: Optional[str] = None
    attempts: int = 0


@dataclass
class ClientStats:
    http_requests: int = 0          # HTTP attempts sent this run (retries included)
    succeeded: int = 0              # fresh successes this run
    cache_hits: int = 0
    retries: int = 0
    capped: int = 0                 # answers refused for exceeding max_answer_bytes (never stored)
    failed: dict = field(default_factory=dict)        # final failure reason -> count
    attempt_errors: dict = field(default_factory=dict)  # every failed attempt's kind -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cost_usd: float = 0.0
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _retry_after_seconds(headers: dict) -> Optional[float]:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            dt = email.utils.parsedate_to_datetime(ra)
            return max(0.0, dt.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class ChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str] = None,
        transport: Optional[Transport] = None,
        api: str = "chat",  # "chat" -> /chat/completions, "completions" -> /completions
        timeout: float = 300.0,
        retry: Optional[RetryPolicy] = None,
        max_requests: Optional[int] = None,
        price_prompt_per_mtok: float = 0.0,
        price_completion_per_mtok: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        seed: Optional[int] = None,
        max_answer_bytes: Optional[int] = DEFAULT_MAX_ANSWER_BYTES,
    ):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api = api
        self.url = self.base_url + ("/chat/completions" if api == "chat" else "/completions")
        if max_answer_bytes is not None and max_answer_bytes < 1:
            raise ValueError(f"max_answer_bytes must be >= 1 or None, got {max_answer_bytes}")
        self.max_answer_bytes = max_answer_bytes
        self.transport = transport or HttpTransport(max_response_bytes=max_answer_bytes)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_requests = max_requests
        self.price_prompt = price_prompt_per_mtok
        self.price_completion = price_completion_per_mtok
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = "Bearer " + api_key
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stats = ClientStats()

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    # --- one request -------------------------------------------------------------------------
    def _count(self, d: dict, k: str) -> None:
        d[k] = d.get(k, 0) + 1

    def _take_budget(self) -> None:
        with self._lock:
            if self.max_requests is not None and self.stats.http_requests >= self.max_requests:
                raise BudgetExhausted()
            self.stats.http_requests += 1

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        p = self.retry
        if retry_after is not None:
            return min(retry_after, p.max_retry_after) + self._rng.uniform(0, p.base_delay * 0.25)
        d = min(p.max_delay, p.base_delay * (2 ** attempt))
        return d / 2 + self._rng.uniform(0, d / 2)

    def _parse_ok(self, body: bytes) -> tuple[str, Optional[str], dict]:
        obj = json.loads(body.decode("utf-8"))
        ch = obj["choices"][0]
        if self.api == "chat":
            content = (ch.get("message") or {}).get("content")
        else:
            content = ch.get("text")
        if content is not None and not isinstance(content, str):
            raise ValueError("content is not a string")
        usage = obj.get("usage") or {}
        return content or "", ch.get("finish_reason"), {
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
        }

    def request(self, body: dict) -> JobResult:
        """Send one request body (model is filled in) with retries; never raises except Fatal."""
        payload = dict(body)
        payload.setdefault("model", self.model)
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last = "unknown"
        for attempt in range(self.retry.max_retries + 1):
            if self._stop.is_set():
                return JobResult("", False, error="interrupted", attempts=attempt)
            try:
                self._take_budget()
            except BudgetExhausted:
                return JobResult("", False, error="budget_exhausted", attempts=attempt)
            retry_after = None
            try:
                resp = self.transport.post(self.url, self._headers, data, self.timeout)
            except TransportTimeout:
                last = "timeout"
            except TransportError:
                last = "connection_error"
            else:
                if resp.status == 200 and self.max_answer_bytes is not None and len(resp.body) > self.max_answer_bytes:
                    # a runaway answer (an Oracle can fill a disk): refused, counted, not retried or cached
                    with self._lock:
                        self.stats.capped += 1
                        self._count(self.stats.attempt_errors, "answer_too_large")
                    return JobResult("", False, error="answer_too_large", attempts=attempt + 1)
                if resp.status == 200:
                    try:
                        content, finish, usage = self._parse_ok(resp.body)
                    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
                        last = "malformed_response"
                    else:
                        return JobResult("", True, content, finish, usage, attempts=attempt + 1)
                elif resp.status in FATAL_STATUS:
                    raise FatalRequestError(
                        f"{self.url} answered HTTP {resp.status} (check the API key variable, "
                        f"the base URL and the model name {self.model!r})"
                    )
                elif resp.status in RETRYABLE_STATUS:
                    last = f"http_{resp.status}"
                    retry_after = _retry_after_seconds(resp.headers)
                else:
                    with self._lock:
                        self._count(self.stats.attempt_errors, f"http_{resp.status}")
                    return JobResult("", False, error=f"http_{resp.status}", attempts=attempt + 1)
            with self._lock:
                self._count(self.stats.attempt_errors, last)
            if attempt < self.retry.max_retries:
                with self._lock:
                    self.stats.retries += 1
                self._sleep(self._backoff(attempt, retry_after))
        return JobResult("", False, error=last, attempts=self.retry.max_retries + 1)

    # --- many requests -----------------------------------------------------------------------
    def _account(self, res: JobResult) -> None:
        pt, ct = res.usage.get("prompt_tokens", 0), res.usage.get("completion_tokens", 0)
        with self._lock:
            if res.cached:
                self.stats.cache_hits += 1
                self.stats.cached_prompt_tokens += pt
                self.stats.cached_completion_tokens += ct
            elif res.ok:
                self.stats.succeeded += 1
                self.stats.prompt_tokens += pt
                self.stats.completion_tokens += ct
                self.stats.cost_usd += (pt * self.price_prompt + ct * self.price_completion) / 1e6
            else:
                self._count(self.stats.failed, res.error or "unknown")

    def run(
        self,
        jobs: list[Job],
        cache: Optional[RequestCache] = None,
        kind: str = "chat",
        concurrency: int = 8,
        progress: bool = True,
        desc: str = "requests",
    ) -> dict[str, JobResult]:
        """Run jobs (deduplicated by key) with ``concurrency`` in flight; returns key -> result.

        Cached keys are answered from the cache without any request. Each fresh success is
        committed to the cache by the worker thread that received it.
        """
        t0 = time.time()
        results: dict[str, JobResult] = {}
        todo: list[Job] = []
        seen = set()
        for j in jobs:
            if j.key in seen:
                continue
            seen.add(j.key)
            hit = cache.get(j.key) if cache is not None else None
            if hit is not None:
                r = JobResult(j.key, True, hit["content"], hit["finish_reason"], hit["usage"], cached=True)
                results[j.key] = r
                self._account(r)
            else:
                todo.append(j)

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seen), initial=len(results), desc=desc, unit="req", dynamic_ncols=True)

        def work(job: Job) -> JobResult:
            r = self.request(job.body)
            r.key = job.key
            if r.ok and cache is not None:
                cache.put(job.key, kind, self.model, r.content, r.finish_reason, r.usage)
            return r

        self._stop.clear()
        ex = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="oracle")
        try:
            futures = [ex.submit(work, j) for j in todo]
            for fut in as_completed(futures):
                r = fut.result()  # FatalRequestError propagates
                results[r.key] = r
                self._account(r)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(fail=sum(self.stats.failed.values()), retry=self.stats.retries, refresh=False)
        except BaseException:
            # Ctrl-C / fatal error: stop starting new attempts, drop queued jobs, let in-flight ones
            # finish (their successes are cached), then re-raise.
            self._stop.set()
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            ex.shutdown(wait=True)
            if bar is not None:
                bar.close()
            self.stats.wall_s += time.time() - t0
        return results
