"""Stages 4-5, filter and write pairs: R = 1 - LCS(rejected, chosen) / len(chosen) over tokens
(whitespace words, or a Hugging Face tokenizer); pairs with R > gamma are dropped.
verified.jsonl -> pairs.jsonl (the packer's `rectify` preset), rejects.filter.jsonl."""
from __future__ import annotations

import statistics

from .change_ratio import change_ratio, hf_tokenizer, whitespace_tokens
from .config import PipelineConfig
from .jsonl import read_records, write_json_atomic, write_jsonl_atomic
from .records import missing_text_fields, progress, refuse_unusable_input, reject, stage_stats
from .report import finalize


NEEDS = ("prompt", "corrected", "model_output")  # what verify writes


def filter_pairs(input_path: str, cfg: PipelineConfig) -> dict:
    """Stage 4: R = 1 - LCS(rejected, chosen)/len(chosen) over tokens; drop R > gamma. Stage 5: pairs."""
    recs = read_records(input_path)
    tokenize = hf_tokenizer(cfg.tokenizer) if cfg.tokenizer else whitespace_tokens
    pairs, rejects, ratios = [], [], []
    for rec in progress(recs, cfg, "filter", total=len(recs)):
        missing = missing_text_fields(rec, NEEDS)
        if missing:
            rejects.append(reject("filter", "missing_field", rec, detail=missing))
            continue
        chosen, rejected = rec["corrected"], rec["model_output"]
        if chosen.strip() == rejected.strip():
            rejects.append(reject("filter", "identical_to_rejected", rec))
            continue
        R = round(change_ratio(rejected, chosen, tokenize), 6)
        ratios.append(R)
        if R > cfg.gamma:
            rejects.append(reject("filter", "change_ratio_above_gamma", rec, change_ratio=R, gamma=cfg.gamma))
            continue
        pairs.append({"prompt": rec["prompt"], "chosen": chosen, "rejected": rejected, "metadata": {
            "id": rec.get("id"), "problem_id": rec.get("problem_id"), "sample": rec.get("sample"),
            "ground_truth": rec.get("ground_truth"), "rejected_answer": rec.get("rejected_answer"),
            "chosen_answer": rec.get("chosen_answer"), "change_ratio": R, "oracle_model": rec.get("oracle_model"),
            "prompt_version": rec.get("prompt_version"), "data_source": rec.get("data_source")}})
    n_missing = sum(r["reason"] == "missing_field" for r in rejects)
    refuse_unusable_input(input_path, "filter", len(recs), len(recs) - n_missing, rejects, ", ".join(NEEDS))
    write_jsonl_atomic(cfg.path("pairs.jsonl"), pairs)
    write_jsonl_atomic(cfg.path("rejects.filter.jsonl"), rejects)
    stats = stage_stats("filter", input_path, len(recs), len(pairs), rejects, gamma=cfg.gamma,
                         tokenization=("hf:" + cfg.tokenizer) if cfg.tokenizer else "whitespace",
                         change_ratio=_summary(ratios), change_ratios=ratios)
    write_json_atomic(cfg.path("stats.filter.json"), stats)
    finalize(cfg, plot=True)
    return stats


def _summary(xs: list) -> dict:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    return {"n": len(s), "mean": round(statistics.fmean(s), 6), "median": round(statistics.median(s), 6),
            "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "min": s[0], "max": s[-1]}
