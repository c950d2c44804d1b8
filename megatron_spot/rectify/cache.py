"""On-disk request cache (SQLite) that makes every network stage resumable.

Key: sha256 over a canonical JSON of everything that determines an answer: the kind of request,
the model, the prompt version, the exact messages (which contain the problem, the student's
solution and, in the "+gt" variant, the ground truth) and the sampling settings (temperature,
top-p, max tokens, seed, extra body, sample index). API keys, URLs and headers are never part
of a key and are never stored.

Only successful responses are stored, one committed row per response, written the moment it
arrives (WAL journal, synchronous=NORMAL). So after a crash, SIGKILL or Ctrl-C, a rerun finds
every finished request here and sends only the unfinished ones; failures are not cached and are
retried by the rerun. INSERT OR IGNORE keeps exactly one row per key.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from typing import Any, Optional


def request_key(**parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT, content TEXT,"
            " finish_reason TEXT, usage TEXT, created REAL NOT NULL)"
        )

    def __len__(self) -> int:
        """Responses stored."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute(
                "SELECT content, finish_reason, usage, model FROM responses WHERE key=?", (key,)
            ).fetchone()
        if row is None:
            return None
        return {
            "content": row[0],
            "finish_reason": row[1],
            "usage": json.loads(row[2]) if row[2] else {},
            "model": row[3],
        }

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        out = {}
        for k in keys:
            v = self.get(k)
            if v is not None:
                out[k] = v
        return out

    def put(self, key: str, kind: str, model: str, content: str, finish_reason: Optional[str],
            usage: Optional[dict]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO responses VALUES (?,?,?,?,?,?,?)",
                (key, kind, model, content, finish_reason, json.dumps(usage or {}), time.time()),
            )

    def count(self, kind: Optional[str] = None) -> int:
        with self._lock:
            if kind is None:
                return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM responses WHERE kind=?", (kind,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
