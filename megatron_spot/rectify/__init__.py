"""Rectification pipeline (the data half of SPoT): elicit -> Oracle -> verify -> filter -> pairs.

Public API (see pipeline.py for the stage files):
    PipelineConfig, elicit, rectify, verify, filter_pairs, run_rectify, run_all, finalize
    run_offline_demo(output_dir, num_problems=256, seed=0, samples=2) -> path to pairs.jsonl
    write_errors_jsonl(path, num_problems, seed=0, samples=1)   # authors' errors.jsonl form
    change_ratio(rejected, chosen, tokenize=None), answers_match(pred, gt), extract_boxed(text)
    build_oracle_messages(...), parse_corrected(text), ChatClient, RequestCache
Heavy optional imports (transformers, matplotlib) happen lazily inside the functions that need them.
"""
from .cache import RequestCache, request_key
from .change_ratio import change_ratio, whitespace_tokens
from .client import ChatClient, api_key_from_env
from .grading import answers_match, extract_boxed, grade
from .offline import run_offline_demo, write_errors_jsonl, write_problems_jsonl
from .pipeline import (PipelineConfig, elicit, filter_pairs, finalize, rectify, run_all, run_rectify,
                       verify)
from .prompts import (DEFAULT_PROMPT_VERSION, END_MARKER, START_MARKER, build_oracle_messages,
                      parse_corrected)

__all__ = [
    "RequestCache", "request_key", "change_ratio", "whitespace_tokens", "ChatClient",
    "api_key_from_env", "answers_match", "extract_boxed", "grade", "run_offline_demo",
    "write_errors_jsonl", "write_problems_jsonl", "PipelineConfig", "elicit", "filter_pairs",
    "finalize", "rectify", "run_all", "run_rectify", "verify", "DEFAULT_PROMPT_VERSION",
    "END_MARKER", "START_MARKER", "build_oracle_messages", "parse_corrected",
]
