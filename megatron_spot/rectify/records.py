"""What every stage shares: input record normalisation, reject records, stage statistics, the
progress bar, the cache, and the "every request failed" check."""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Optional

from .cache import RequestCache
from .config import PipelineConfig


def prompt_text(rec: dict) -> Optional[str]:
    for k in ("prompt", "question", "problem"):
        v = rec.get(k)
        if isinstance(v, str) and v.strip():
            return v
        if isinstance(v, list):  # verl/chat style: [{"role": "user", "content": ...}]
            parts = [m.get("content", "") for m in v if isinstance(m, dict) and m.get("role") == "user"]
            if parts:
                return "\n".join(parts)
    return None


def ground_truth(rec: dict) -> Optional[str]:
    for k in ("ground_truth", "solution", "answer"):
        v = rec.get(k)
        if v is not None and str(v).strip():
            return str(v)
    rm = rec.get("reward_model")
    if isinstance(rm, dict) and rm.get("ground_truth") is not None:
        return str(rm["ground_truth"])
    return None


def record_index(rec: dict, lineno: int):
    if rec.get("index") not in (None, ""):
        return rec["index"]
    ei = rec.get("extra_info")
    if isinstance(ei, dict) and ei.get("index") not in (None, ""):
        return ei["index"]
    if rec.get("id") not in (None, ""):
        return rec["id"]
    return lineno


def missing_text_fields(rec: dict, fields: tuple) -> list:
    """The fields of `fields` that `rec` lacks or holds as something other than non-empty text."""
    return [k for k in fields if not isinstance(rec.get(k), str) or not rec[k].strip()]


def refuse_unusable_input(input_path: str, stage: str, n_read: int, n_usable: int, rejects: list, needs: str) -> None:
    """An input none of whose records has the fields `stage` reads is the wrong file (or the wrong types):
    bad input, one line naming the file, not a stage that quietly keeps nothing."""
    if n_read and not n_usable and rejects and all(r["reason"] == "missing_field" for r in rejects):
        detail = rejects[0].get("detail")
        raise ValueError(f"{input_path}: none of its {n_read} records has the fields {stage} reads ({needs}); the first "
                         f"lacks {', '.join(detail) if isinstance(detail, list) else detail} as text (is it the right file?)")


def reject(stage: str, reason: str, item: dict, detail: Any = None, **extra) -> dict:
    r = {"id": item.get("id"), "stage": stage, "reason": reason}
    if detail is not None:
        r["detail"] = detail
    for k in ("problem_id", "sample", "data_source", "prompt", "ground_truth", "model_output",
              "extracted_answer", "oracle_output", "corrected"):
        if k in item and item[k] is not None:
            r[k] = item[k]
    r.update(extra)
    return r


def stage_stats(stage: str, input_path: str, n_in: int, n_out: int, rejects: list, **extra) -> dict:
    return {"stage": stage, "input": os.path.abspath(input_path), "finished_at": time.time(),
            "input_items": n_in, "passed": n_out, "rejected": len(rejects),
            "reasons": dict(Counter(r["reason"] for r in rejects)), **extra}


def progress(iterable, cfg: PipelineConfig, desc: str, total: Optional[int] = None):
    if not cfg.progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="item", dynamic_ncols=True)


def open_cache(cfg: PipelineConfig) -> RequestCache:
    os.makedirs(cfg.output_dir, exist_ok=True)
    return RequestCache(cfg.cache_path or cfg.path("cache.sqlite"))


class AllRequestsFailed(RuntimeError):
    """Every request of a network stage failed: the outputs are written (rejects with reasons), but
    the stage produced nothing and the tool exits non-zero."""


def check_not_all_failed(stage: str, results: dict, client_stats) -> None:
    """Raise AllRequestsFailed when a stage sent requests and not one succeeded (a request budget that
    ran out, or Ctrl-C, is not a failure: rerunning continues)."""
    if not results or any(r.ok for r in results.values()):
        return
    errors = Counter(r.error or "unknown" for r in results.values())
    if set(errors) <= {"budget_exhausted", "interrupted"}:
        return
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(errors.items()))
    capped = f"; {client_stats.capped} answer(s) over max_answer_bytes" if client_stats.capped else ""
    raise AllRequestsFailed(f"{stage}: all {len(results)} requests failed ({reasons}{capped}); check the server, "
                            f"the model name and --max-answer-bytes, then rerun (see {stage} rejects)")
