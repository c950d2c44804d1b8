"""Rectification pipeline (the data half of SPoT): elicit -> Oracle -> verify -> filter -> pairs.

Public API (pipeline.py maps the stages to their files):
    PipelineConfig, elicit, rectify, verify, filter_pairs, run_rectify, run_all, finalize
    change_ratio(rejected, chosen, tokenize=None), answers_match(pred, gt), extract_boxed(text)
    build_oracle_messages(...), parse_corrected(text), ChatClient, RequestCache
The demo's offline Oracle (synthetic problems, calculator) lives in examples/offline_oracle.py.
Heavy optional imports (transformers, matplotlib) happen lazily inside the functions that need them.
"""
from .cache import RequestCache, request_key
from .change_ratio import change_ratio, whitespace_tokens
from .client import ChatClient, api_key_from_env
from .grading import answers_match, extract_boxed, grade
from .pipeline import (PipelineConfig, elicit, filter_pairs, finalize, rectify, run_all, run_rectify,
                       verify)
from .prompts import (DEFAULT_PROMPT_VERSION, END_MARKER, START_MARKER, build_oracle_messages,
                      parse_corrected)

__all__ = [
    "RequestCache", "request_key", "change_ratio", "whitespace_tokens", "ChatClient",
    "api_key_from_env", "answers_match", "extract_boxed", "grade", "PipelineConfig", "elicit", "filter_pairs",
    "finalize", "rectify", "run_all", "run_rectify", "verify", "DEFAULT_PROMPT_VERSION",
    "END_MARKER", "START_MARKER", "build_oracle_messages", "parse_corrected",
]
