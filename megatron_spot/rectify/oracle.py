"""Stage 2, rectify: the Oracle minimally revises each wrong solution (teaching-assistant prompt,
with or without the ground truth); the text between the markers is kept, without them.
errors.jsonl -> rectified.jsonl, rejects.rectify.jsonl. Resumable through the request cache."""
from __future__ import annotations

import os
from typing import Optional

from . import prompts as P
from .cache import request_key
from .client import ChatClient, Job, api_key_from_env
from .config import PipelineConfig
from .jsonl import read_records, write_json_atomic, write_jsonl_atomic
from .records import (check_not_all_failed, ground_truth, open_cache, prompt_text, record_index, refuse_unusable_input,
                      reject, stage_stats)
from .report import finalize


def make_oracle_client(cfg: PipelineConfig) -> ChatClient:
    """The Oracle's client from cfg (URL, model, key from the environment, retries, budget, cap, prices)."""
    if not cfg.oracle_base_url or not cfg.oracle_model:
        raise ValueError("the Oracle needs --oracle-base-url and --oracle-model")
    return ChatClient(cfg.oracle_base_url, cfg.oracle_model, api_key=api_key_from_env(cfg.oracle_api_key_env),
                      timeout=cfg.timeout, max_retries=cfg.max_retries, max_requests=cfg.max_requests,
                      max_answer_bytes=cfg.max_answer_bytes, price_prompt_per_mtok=cfg.price_prompt_per_mtok,
                      price_completion_per_mtok=cfg.price_completion_per_mtok)


def _oracle_sampling(cfg: PipelineConfig) -> dict:
    s: dict = {}
    if cfg.oracle_temperature is not None:
        s["temperature"] = cfg.oracle_temperature
    if cfg.oracle_max_tokens is not None:
        s["max_tokens"] = cfg.oracle_max_tokens
    if cfg.oracle_extra_body:
        s.update(cfg.oracle_extra_body)
    return s


def load_errors(input_path: str, stage: str = "rectify") -> tuple[list, list]:
    """Normalise errors.jsonl records; returns (items, rejects). Exact duplicates are rejected."""
    items, rejects, ids, seen = [], [], set(), {}
    recs = read_records(input_path)
    for lineno, rec in enumerate(recs, 1):
        pid = record_index(rec, lineno)
        sample = rec.get("sample")
        iid = str(pid) if sample is None else f"{pid}:{sample}"
        if iid in ids:
            iid = f"{iid}@{lineno}"
        ids.add(iid)
        item = {"id": iid, "problem_id": pid, "sample": sample, "data_source": rec.get("data_source") or "unknown",
                "prompt": prompt_text(rec), "ground_truth": ground_truth(rec),
                "model_output": rec.get("model_output") or rec.get("original_answer") or rec.get("response"),
                "extracted_answer": rec.get("extracted_answer")}
        missing = [k for k in ("prompt", "ground_truth", "model_output") if not item[k]]
        if missing:
            rejects.append(reject(stage, "missing_field", item, detail=missing))
            continue
        sig = (item["prompt"], item["model_output"])
        if sig in seen:
            rejects.append(reject(stage, "duplicate", item, detail=f"same prompt and model_output as {seen[sig]}"))
            continue
        seen[sig] = iid
        items.append(item)
    refuse_unusable_input(input_path, stage, len(recs), len(items), rejects,
                          "prompt|question|problem, ground_truth|solution|answer, model_output|response")
    return items, rejects


def rectify(input_path: str, cfg: PipelineConfig, client: Optional[ChatClient] = None) -> dict:
    """Stage 2: ask the Oracle for a minimal correction of each wrong solution; parse the markers.

    ``client`` is the Oracle (None: make_oracle_client(cfg))."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    items, rejects = load_errors(input_path)
    client = client or make_oracle_client(cfg)
    version = P.effective_version(cfg.prompt_version, cfg.with_ground_truth)
    sampling = _oracle_sampling(cfg)
    keyed = []
    for it in items:
        msgs = P.build_oracle_messages(it["prompt"], it["model_output"],
                                       it["ground_truth"] if cfg.with_ground_truth else None,
                                       cfg.prompt_version, cfg.start_marker, cfg.end_marker)
        key = request_key(kind="oracle", model=client.model, prompt_version=version, messages=msgs, sampling=sampling)
        keyed.append((it, Job(key, {"messages": msgs, **sampling})))
    cache = open_cache(cfg)
    try:
        results = client.run([j for _, j in keyed], cache, kind="oracle", concurrency=cfg.concurrency,
                             progress=cfg.progress, desc="rectify: oracle")
    finally:
        cache.close()
    out = []
    for it, job in keyed:
        r = results[job.key]
        if not r.ok:
            reason = r.error if r.error in ("budget_exhausted", "interrupted") else "oracle_" + (r.error or "error")
            rejects.append(reject("rectify", reason, it, attempts=r.attempts))
            continue
        corrected, why = P.parse_corrected(r.content, cfg.start_marker, cfg.end_marker)
        if corrected is None:
            if why == "no_end_marker" and r.finish_reason == "length":
                why = "truncated"
            rejects.append(reject("rectify", why, {**it, "oracle_output": r.content}))
            continue
        out.append({**it, "corrected": corrected, "oracle_output": r.content, "oracle_model": client.model,
                    "prompt_version": version, "with_ground_truth": cfg.with_ground_truth,
                    "finish_reason": r.finish_reason, "usage": r.usage, "cached": r.cached})
    write_jsonl_atomic(cfg.path("rectified.jsonl"), out)
    write_jsonl_atomic(cfg.path("rejects.rectify.jsonl"), rejects)
    n_in = len(items) + sum(1 for r in rejects if r["reason"] in ("missing_field", "duplicate"))
    stats = stage_stats("rectify", input_path, n_in, len(out), rejects, oracle_model=client.model,
                         prompt_version=version, client=client.stats.as_dict())
    write_json_atomic(cfg.path("stats.rectify.json"), stats)
    finalize(cfg)
    check_not_all_failed("rectify", results, client.stats)
    return stats
