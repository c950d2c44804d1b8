"""Stage 3, verify: the corrected solution's final \\boxed{} answer must equal the ground truth
(math-verify), and the rejected one must not. rectified.jsonl -> verified.jsonl, rejects.verify.jsonl."""
from __future__ import annotations

from .config import PipelineConfig
from .grading import answers_match, extract_boxed
from .jsonl import read_records, write_json_atomic, write_jsonl_atomic
from .records import missing_text_fields, progress, refuse_unusable_input, reject, stage_stats
from .report import finalize


def verify(input_path: str, cfg: PipelineConfig) -> dict:
    """Stage 3: the corrected solution's final answer must equal the ground truth (math-verify)."""
    recs = read_records(input_path)
    out, rejects = [], []
    for rec in progress(recs, cfg, "verify", total=len(recs)):
        missing = missing_text_fields(rec, ("corrected",)) + ([] if rec.get("ground_truth") is not None else ["ground_truth"])
        if missing:
            rejects.append(reject("verify", "missing_field", rec, detail=missing))
            continue
        chosen_answer = extract_boxed(rec.get("corrected"))
        rejected_answer = extract_boxed(rec.get("model_output")) or rec.get("extracted_answer")
        if chosen_answer is None:
            rejects.append(reject("verify", "no_boxed_answer", rec))
        elif not answers_match(chosen_answer, str(rec["ground_truth"])):
            rejects.append(reject("verify", "wrong_answer", rec, chosen_answer=chosen_answer))
        elif rejected_answer is not None and answers_match(rejected_answer, str(rec["ground_truth"])):
            rejects.append(reject("verify", "rejected_is_correct", rec, rejected_answer=rejected_answer))
        else:
            out.append({**rec, "chosen_answer": chosen_answer, "rejected_answer": rejected_answer})
    n_missing = sum(r["reason"] == "missing_field" for r in rejects)
    refuse_unusable_input(input_path, "verify", len(recs), len(recs) - n_missing, rejects, "corrected, ground_truth")
    write_jsonl_atomic(cfg.path("verified.jsonl"), out)
    write_jsonl_atomic(cfg.path("rejects.verify.jsonl"), rejects)
    stats = stage_stats("verify", input_path, len(recs), len(out), rejects)
    write_json_atomic(cfg.path("stats.verify.json"), stats)
    finalize(cfg)
    return stats
