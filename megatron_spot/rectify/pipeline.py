"""The rectification pipeline, stage by stage. Each stage reads a file, writes its outputs atomically
into the output folder, and can run alone; network stages are resumable through the SQLite cache.

  stage      module      input                      outputs (in --output DIR)
  elicit     elicit.py   problems (.jsonl/.parquet) samples.jsonl, errors.jsonl, eval.json, rejects.elicit.jsonl
  rectify    oracle.py   errors.jsonl               rectified.jsonl, rejects.rectify.jsonl          (stage 2)
  verify     verify.py   rectified.jsonl            verified.jsonl, rejects.verify.jsonl            (stage 3)
  filter     filter.py   verified.jsonl             pairs.jsonl, rejects.filter.jsonl               (stages 4-5)
  (every stage then refreshes rejects.jsonl, report.json and change_ratio_hist.png: report.py)

Every input item of ``rectify`` ends in exactly one of pairs.jsonl or rejects.jsonl, and the
report checks that (``accounting.balanced``).

The one transport seam is the client: ``elicit`` and ``rectify`` take a ``ChatClient`` (None: built
from the config's URLs); the demo's offline Oracle (examples/offline_oracle.py) passes clients whose
transport answers in-process.
"""
from __future__ import annotations

from typing import Optional

from .client import ChatClient
from .config import STAGES, PipelineConfig
from .elicit import LocalGenerator, elicit, generate_locally, make_model_client
from .filter import filter_pairs
from .jsonl import read_json
from .oracle import load_errors, make_oracle_client, rectify
from .records import AllRequestsFailed, check_not_all_failed
from .report import finalize, print_summary
from .verify import verify


def run_rectify(errors_path: str, cfg: PipelineConfig, oracle: Optional[ChatClient] = None) -> dict:
    """Stages 2-5 on an errors.jsonl; returns the report."""
    rectify(errors_path, cfg, oracle)
    verify(cfg.path("rectified.jsonl"), cfg)
    filter_pairs(cfg.path("verified.jsonl"), cfg)
    return read_json(cfg.path("report.json"))


def run_all(problems_path: str, cfg: PipelineConfig, model: Optional[ChatClient] = None,
            oracle: Optional[ChatClient] = None) -> dict:
    """Stages 1-5 (``model`` samples the problems, ``oracle`` corrects the wrong answers)."""
    elicit(problems_path, cfg, model)
    return run_rectify(cfg.path("errors.jsonl"), cfg, oracle)


__all__ = ["STAGES", "AllRequestsFailed", "LocalGenerator", "PipelineConfig", "check_not_all_failed", "elicit",
           "filter_pairs", "finalize", "generate_locally", "load_errors", "make_model_client",
           "make_oracle_client", "print_summary", "rectify", "run_all", "run_rectify", "verify"]
