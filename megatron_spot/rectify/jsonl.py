"""Small, crash-safe file helpers shared by the rectification stages.

Every stage output is published atomically (megatron_spot.utils.atomic: temp sibling, fsync, rename),
so a crash or Ctrl-C never leaves a half-written stage file behind: it exists completely or not at all.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

from megatron_spot.utils.atomic import atomic_file


def read_jsonl(path: str) -> Iterator[dict]:
    """Yield one dict per non-empty line; a malformed line raises ValueError naming the line."""
    for _, obj in _read_jsonl_lines(path):
        yield obj


def read_records_located(path: str) -> list[tuple[str, Any]]:
    """Like read_records, each record with where it is: 'PATH:LINE' (.jsonl, the file's own line number,
    blank lines counted), 'PATH: item N' (.json list) or 'PATH: row N' (.parquet), N from 1."""
    if path.endswith(".parquet") or path.endswith(".json"):
        unit = "row" if path.endswith(".parquet") else "item"
        return [(f"{path}: {unit} {i}", rec) for i, rec in enumerate(read_records(path), 1)]
    return list(_read_jsonl_lines(path))


def _read_jsonl_lines(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield f"{path}:{lineno}", obj


def read_records(path: str) -> list[dict]:
    """Read .jsonl/.json (a list of objects) or .parquet into a list of dicts."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # lazy: only for parquet inputs

        return pq.read_table(path).to_pylist()
    if path.endswith(".json"):
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return data
    return list(read_jsonl(path))


def has_records(path: str) -> bool:
    """Whether an input holds at least one record (without reading it all; a missing file raises OSError)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows > 0
    if path.endswith(".json"):
        return bool(read_records(path))
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return any(line.strip() for line in f)


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> int:
    """Write records as JSON lines via a temp file + rename; returns the number written."""
    n = 0
    with atomic_file(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json_atomic(path: str, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def read_json(path: str, default: Any = None) -> Any:
    if not os.path.exists(path):
        return default
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)
