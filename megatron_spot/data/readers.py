"""Input readers: JSONL, JSON, Parquet and `datasets.save_to_disk` folders, one or more of them.

Readers yield chunks `(source_index, [(where, raw), ...])`. For JSONL `raw` is the line's bytes, parsed
in the worker processes (so parsing runs in parallel and a malformed line is reported as `file:line`);
for the other formats `raw` is already a dict and `where` is `file[row N]`.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator, List, Optional, Tuple

Chunk = Tuple[int, List[Tuple[str, object]]]
FORMATS = ("jsonl", "json", "parquet", "hf_disk")


class InputError(ValueError):
    """An input that cannot be read at all (missing file, unknown format, unreadable container)."""


def expand_inputs(paths: List[str]) -> List[str]:
    """Expand globs and plain folders (not `datasets` folders) into a sorted list of files."""
    out: List[str] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise InputError(f"no input matches {p!r}")
        for m in matches:
            if os.path.isdir(m) and not _is_hf_disk(m):
                files = sorted(f for f in glob.glob(os.path.join(m, "*"))
                               if detect_format(f, quiet=True) in ("jsonl", "json", "parquet"))
                if not files:
                    raise InputError(f"folder {m!r} holds no .jsonl/.json/.parquet files and is not a "
                                     f"`datasets` save_to_disk folder")
                out.extend(files)
            elif not os.path.exists(m):
                raise InputError(f"input not found: {m!r}")
            else:
                out.append(m)
    return out


def _is_hf_disk(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def detect_format(path: str, quiet: bool = False) -> Optional[str]:
    if _is_hf_disk(path):
        return "hf_disk"
    low = path.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if low.endswith(ext):
            return fmt
    if quiet:
        return None
    raise InputError(f"cannot tell the format of {path!r}: use .jsonl, .json, .parquet or a "
                     f"`datasets` save_to_disk folder")


def _load_hf(path: str, split: str):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{path}: no split {split!r} (has {sorted(ds)}); pass --split")
        ds = ds[split]
    return ds


def _load_json(path: str):
    """A .json file: a list of records, or an object with exactly one list value. None = it is JSONL."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":   # several JSON values: JSON Lines under a .json name
            return None
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e})") from None
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        return [obj]
    raise InputError(f"{path}: expected a JSON list of records")


def count_records(path: str, split: str = "train") -> Optional[int]:
    """Cheap record count for the progress bar (None when unknown)."""
    try:
        fmt = detect_format(path)
        if fmt == "jsonl":
            n = 0
            with open(path, "rb") as f:
                for line in f:
                    n += bool(line.strip())
            return n
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if fmt == "hf_disk":
            return len(_load_hf(path, split))
    except Exception:
        return None
    return None


def iter_chunks(paths: List[str], chunk_size: int = 512, split: str = "train") -> Iterator[Chunk]:
    """Yield chunks of (where, raw) items from every input in order."""
    for si, path in enumerate(paths):
        fmt = detect_format(path)
        if fmt == "json":
            records = _load_json(path)
            if records is None:
                fmt = "jsonl"
            else:
                for s in range(0, len(records), chunk_size):
                    yield si, [(f"{path}[record {s + k}]", r) for k, r in enumerate(records[s:s + chunk_size])]
                continue
        if fmt == "jsonl":
            buf: List[Tuple[str, object]] = []
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    buf.append((f"{path}:{lineno}", line))
                    if len(buf) >= chunk_size:
                        yield si, buf
                        buf = []
            if buf:
                yield si, buf
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
            except Exception as e:
                raise InputError(f"{path}: unreadable Parquet file ({e})") from None
            row = 0
            for batch in pf.iter_batches(batch_size=chunk_size):
                rows = batch.to_pylist()
                yield si, [(f"{path}[row {row + k}]", r) for k, r in enumerate(rows)]
                row += len(rows)
        elif fmt == "hf_disk":
            ds = _load_hf(path, split)
            for s in range(0, len(ds), chunk_size):
                cols = ds[s:s + chunk_size]
                names = list(cols)
                n = len(cols[names[0]]) if names else 0
                yield si, [(f"{path}[row {s + k}]", {c: cols[c][k] for c in names}) for k in range(n)]
