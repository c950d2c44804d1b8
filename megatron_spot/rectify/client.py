"""OpenAI-compatible client for the Oracle and for the elicitation / evaluation servers (vLLM, SGLang).

HTTP is the ``openai`` SDK's (``OpenAI.post``, its documented route for arbitrary request bodies, so
vLLM/SGLang extras such as ``chat_template_kwargs`` pass through untouched). What the SDK does, per
request (read from openai 3.51's ``_base_client``):
- retries 408, 409, 429, every 5xx, timeouts and connection errors, at most ``max_retries`` times;
- waits ``0.5 s * 2**retry`` capped at 8 s, minus up to 25 % jitter, unless the answer carries
  ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date) of at most 120 s, which it waits
  instead (a longer Retry-After is not retried: the item fails with its status);
- applies ``timeout`` (connect: at most 30 s).

What this module adds, all of it in one httpx transport wrapped around the SDK's (``_MeteredTransport``),
so it sees every attempt the SDK makes, retries included:
- the request budget (``max_requests``: every attempt counts; when it runs out, the remaining items
  fail with ``budget_exhausted`` and are NOT cached, so a rerun with a larger budget continues them);
- the answer cap: a body larger than ``max_answer_bytes`` is never read past the cap; a 200 that big
  fails with ``answer_too_large`` (counted in ``stats.capped``, not retried, never cached);
- malformed answers: a 200 that is not a completion is raised as an ``httpx2.DecodingError``, so
  the SDK retries it like a dropped connection (same backoff, same attempt count);
- statistics (attempts, retries, failure kinds, tokens, cost) and the stop flag for Ctrl-C.
401/403/404 raise ``FatalRequestError`` (wrong key, URL or model: retrying thousands of items would
not help); any other 4xx is a per-item failure.

Across requests: N in flight (a thread pool), and the SQLite cache (cache.py): each success is
committed the moment it arrives. ``transport=`` takes any ``httpx2.BaseTransport`` in place of the
network (the demo's in-process offline Oracle, tests); everything above it is the same code path.

The API key is read from the environment by ``api_key_from_env`` and passed to the SDK, which sends
it only in the ``Authorization`` header; without a key no ``Authorization`` header is sent (the
SDK would otherwise fall back to ``OPENAI_API_KEY`` and hand the Oracle's key to a model server).
It never appears on this class's attributes, in stats, in the cache or in an exception message.
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterable, Optional
from urllib.parse import urlsplit

import httpx2
import openai

from .cache import RequestCache

FATAL_STATUS = {401, 403, 404}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# Largest HTTP response body accepted (the answer plus its JSON envelope). A 32k-token solution is
# ~130 KB; 4 MiB leaves room for long reasoning while bounding what a misbehaving server can write.
DEFAULT_MAX_ANSWER_BYTES = 4 * 2**20


def api_key_from_env(names: Iterable[str] = ("ORACLE_API_KEY", "OPENAI_API_KEY")) -> Optional[str]:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


class FatalRequestError(RuntimeError):
    """The endpoint refuses every request (auth, URL, model): stop the stage."""


class BudgetExhausted(Exception):
    """Raised by the transport before an attempt the budget does not cover (the SDK does not retry it)."""


class Interrupted(Exception):
    """Raised by the transport once the stop flag is set (Ctrl-C or a fatal error elsewhere)."""


class AnswerTooLarge(Exception):
    """A 200 body over max_answer_bytes: not an httpx error, so the SDK passes it up unretried."""


class MalformedResponse(httpx2.DecodingError):
    """A 200 whose body is not a completion; an httpx RequestError, so the SDK retries it."""


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


def parse_completion(body: bytes, api: str) -> tuple[str, Optional[str], dict]:
    """(content, finish_reason, usage) of a chat or text completion; raises on anything else."""
    obj = json.loads(body.decode("utf-8"))
    choice = obj["choices"][0]
    content = (choice.get("message") or {}).get("content") if api == "chat" else choice.get("text")
    if content is not None and not isinstance(content, str):
        raise ValueError("content is not a string")
    usage = obj.get("usage") or {}
    return content or "", choice.get("finish_reason"), {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }


_MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError)


def _network_transport(base_url: str) -> httpx2.BaseTransport:
    """The real network. Loopback URLs never go through a proxy; others honour the environment's
    HTTP(S)_PROXY / NO_PROXY (an explicit transport turns httpx's own environment lookup off)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if host in _LOOPBACK_HOSTS:
        return httpx2.HTTPTransport(trust_env=False)
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(parts.scheme)
    return httpx2.HTTPTransport(proxy=proxy)


class _MeteredTransport(httpx2.BaseTransport):
    """Every attempt the SDK makes passes here: budget, stop flag, answer cap, malformed check, stats."""

    def __init__(self, inner: httpx2.BaseTransport, client: "ChatClient"):
        self._inner, self._client = inner, client

    def _read_capped(self, response: httpx2.Response) -> tuple[bytes, bool]:
        cap = self._client.max_answer_bytes
        chunks, size = [], 0
        try:
            for chunk in response.iter_bytes():   # decoded (gzip etc.): the cap is on what we would keep
                chunks.append(chunk)
                size += len(chunk)
                if cap is not None and size > cap:
                    return b"", True
        finally:
            response.close()
        return b"".join(chunks), False

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        c = self._client
        if c._stop.is_set():
            raise Interrupted()
        c._take_budget()
        c._local.attempts += 1
        try:
            response = self._inner.handle_request(request)
            body, too_large = self._read_capped(response)
        except httpx2.TimeoutException:
            c._attempt_failed("timeout")
            raise
        except httpx2.RequestError:
            c._attempt_failed("connection_error")
            raise
        status = response.status_code
        if status == 200:
            if too_large:
                with c._lock:
                    c.stats.capped += 1
                c._attempt_failed("answer_too_large")
                raise AnswerTooLarge()
            try:
                parse_completion(body, c.api)
            except _MALFORMED:
                c._attempt_failed("malformed_response")
                raise MalformedResponse("the answer is not a completion", request=request) from None
        else:
            c._attempt_failed(f"http_{status}")
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        return httpx2.Response(status, headers=headers, content=body, request=request)

    def close(self) -> None:
        self._inner.close()


class ChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str] = None,
        transport: Optional[httpx2.BaseTransport] = None,
        api: str = "chat",  # "chat" -> /chat/completions, "completions" -> /completions
        timeout: float = 300.0,
        max_retries: int = 6,
        max_requests: Optional[int] = None,
        price_prompt_per_mtok: float = 0.0,
        price_completion_per_mtok: float = 0.0,
        max_answer_bytes: Optional[int] = DEFAULT_MAX_ANSWER_BYTES,
    ):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        if max_answer_bytes is not None and max_answer_bytes < 1:
            raise ValueError(f"max_answer_bytes must be >= 1 or None, got {max_answer_bytes}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not base_url:
            raise ValueError("the client needs a base URL (e.g. http://localhost:8000/v1)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api = api
        self._path = "/chat/completions" if api == "chat" else "/completions"
        self.url = self.base_url + self._path
        self.max_answer_bytes = max_answer_bytes
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_requests = max_requests
        self.price_prompt = price_prompt_per_mtok
        self.price_completion = price_completion_per_mtok
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._local = threading.local()
        self.stats = ClientStats()
        http = httpx2.Client(transport=_MeteredTransport(transport or _network_transport(self.base_url), self),
                             timeout=httpx2.Timeout(timeout, connect=min(timeout, 30.0)),
                             limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64),
                             follow_redirects=True)  # as the SDK's own default client
        # a placeholder key is never sent: keyless requests omit the Authorization header below
        self._sdk = openai.OpenAI(api_key=api_key or "no-key", base_url=self.base_url, http_client=http,
                                  max_retries=max_retries, timeout=httpx2.Timeout(timeout, connect=min(timeout, 30.0)))
        self._options: dict = {} if api_key else {"headers": {"Authorization": openai.omit}}

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    # --- bookkeeping the transport calls ---------------------------------------------------------
    def _count(self, d: dict, k: str) -> None:
        d[k] = d.get(k, 0) + 1

    def _take_budget(self) -> None:
        with self._lock:
            if self.max_requests is not None and self.stats.http_requests >= self.max_requests:
                raise BudgetExhausted()
            self.stats.http_requests += 1

    def _attempt_failed(self, kind: str) -> None:
        with self._lock:
            self._count(self.stats.attempt_errors, kind)

    # --- one request -------------------------------------------------------------------------
    def request(self, body: dict) -> JobResult:
        """Send one request body (model is filled in); the SDK retries. Never raises except Fatal."""
        payload = dict(body)
        payload.setdefault("model", self.model)
        self._local.attempts = 0
        try:
            response = self._sdk.post(self._path, cast_to=httpx2.Response, body=payload, options=self._options)
            content, finish, usage = parse_completion(response.content, self.api)  # checked by the transport
            return JobResult("", True, content, finish, usage, attempts=self._local.attempts)
        except openai.APIStatusError as e:
            if e.status_code in FATAL_STATUS:
                raise FatalRequestError(f"{self.url} answered HTTP {e.status_code} (check the API key variable, "
                                        f"the base URL and the model name {self.model!r})") from None
            error = f"http_{e.status_code}"
        except openai.APITimeoutError:
            error = "timeout"
        except openai.APIConnectionError as e:
            error = "malformed_response" if isinstance(e.__cause__, MalformedResponse) else "connection_error"
        except BudgetExhausted:
            error = "budget_exhausted"
        except Interrupted:
            error = "interrupted"
        except AnswerTooLarge:
            error = "answer_too_large"
        finally:
            with self._lock:
                self.stats.retries += max(0, self._local.attempts - 1)
        return JobResult("", False, error=error, attempts=self._local.attempts)

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

    def close(self) -> None:
        self._sdk.close()
