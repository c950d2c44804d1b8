"""SPoT rectification pipeline: turn math problems with ground-truth answers into rectified
(chosen, rejected) pairs for the packer's `rectify` preset.

Stages (each runnable alone, each resumable; outputs land in --output DIR):
  1 elicit   sample K solutions per problem from the model being trained (OpenAI-compatible
             server such as vLLM/SGLang, or --local-model with transformers), grade them with
             math-verify, keep the wrong ones -> errors.jsonl (authors' form). Also writes
             eval.json: accuracy (mean over K samples) per data_source, so the same command is
             the before/after-training evaluation.
  2 rectify  send each wrong solution to the Oracle with the minimal-edit teaching-assistant
             prompt (with or without the ground truth); keep the text between
             "=== CORRECTED STARTED ===" and "=== CORRECTED ENDED ===" -> rectified.jsonl
  3 verify   the corrected final \\boxed{} answer must equal the ground truth (math-verify)
             -> verified.jsonl
  4 filter   change ratio R = 1 - LCS(rejected, chosen) / len(chosen) over tokens (whitespace
             words by default, or --tokenizer); drop R > --gamma
  5 write    pairs.jsonl {"prompt","chosen","rejected","metadata":{...}}, rejects.jsonl (a reason
             for every dropped item), report.json (counts per stage and reason, tokens, cost),
             change_ratio_hist.png

Subcommands: elicit | rectify (stages 2-5; --only for stage 2 alone) | verify | filter | run (1-5).
Offline (synthetic problems, calculator Oracle, no server): python examples/offline_oracle.py demo|synth.

Resuming: every successful model/Oracle answer is committed to DIR/cache.sqlite the moment it
arrives, keyed by a hash of (problem, solution, prompt version, model, sampling settings). After
a crash or Ctrl-C, rerun the same command: finished requests are never sent again.

The Oracle's API key is read from the environment only: ORACLE_API_KEY, else OPENAI_API_KEY
(the elicitation server's, if it needs one: MODEL_API_KEY). Keys are never written anywhere.

Exit codes: 0 ok, 1 failure (every request of a stage failed), 2 bad arguments or input (including an
endpoint that refuses the key, URL or model: HTTP 401/403/404), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_spot.cli import BAD_INPUT, FAILURE, INTERRUPTED, OK
from megatron_spot.cli.args import (non_negative_float, non_negative_int, positive_float, positive_int,
                                    unit_fraction)


def _common(p: argparse.ArgumentParser, input_help: str, input_required: bool = True) -> None:
    g = p.add_argument_group("files")
    g.add_argument("--input", required=input_required, help=input_help)
    g.add_argument("--output", required=True, metavar="DIR", help="output folder (created); also holds cache.sqlite")
    g.add_argument("--cache", default=None, metavar="PATH", help="SQLite cache file (default DIR/cache.sqlite)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _network(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("requests (all network stages)")
    g.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (default 8)")
    g.add_argument("--timeout", type=positive_float, default=300.0, help="seconds per HTTP request (default 300)")
    g.add_argument("--max-retries", type=non_negative_int, default=6,
                   help="retries on 408/409/429/5xx/timeouts/malformed JSON (the openai SDK's backoff: 0.5 s doubling to 8 s, "
                        "Retry-After up to 120 s honoured; default 6)")
    g.add_argument("--max-requests", type=positive_int, default=None,
                   help="request budget per network stage for this invocation (HTTP attempts incl. retries); items left over are "
                        "rejected as budget_exhausted and NOT cached, so a rerun continues them")
    g.add_argument("--max-answer-bytes", type=positive_int, default=4 * 2**20, metavar="BYTES",
                   help="largest response accepted (default 4 MiB); larger answers are rejected as "
                        "answer_too_large, counted as 'capped', and never written or cached")


def _oracle(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Oracle (stage 2)")
    g.add_argument("--oracle-base-url", default=os.environ.get("ORACLE_BASE_URL"),
                   help="OpenAI-compatible base URL, e.g. https://generativelanguage.googleapis.com/v1beta/openai "
                        "(env ORACLE_BASE_URL)")
    g.add_argument("--oracle-model", default=os.environ.get("ORACLE_MODEL"),
                   help="Oracle model name, e.g. gemini-2.5-pro (env ORACLE_MODEL)")
    gt = g.add_mutually_exclusive_group()
    gt.add_argument("--with-ground-truth", dest="with_ground_truth", action="store_true",
                    help="show the ground-truth answer to the Oracle (prompt version gets '+gt')")
    gt.add_argument("--no-ground-truth", dest="with_ground_truth", action="store_false",
                    help="do not show it (default, as in the released recipe)")
    p.set_defaults(with_ground_truth=False)
    g.add_argument("--prompt-version", default="spot-ta-v1", help="Oracle prompt version (default spot-ta-v1)")
    g.add_argument("--start-marker", default="=== CORRECTED STARTED ===", help="start marker (stripped)")
    g.add_argument("--end-marker", default="=== CORRECTED ENDED ===", help="end marker (stripped)")
    g.add_argument("--oracle-temperature", type=non_negative_float, default=None, help="sent only if given")
    g.add_argument("--oracle-max-tokens", type=positive_int, default=None, help="sent only if given")
    g.add_argument("--oracle-extra-body", default=None, metavar="JSON",
                   help="extra JSON fields merged into each Oracle request (e.g. reasoning settings)")
    g.add_argument("--price-prompt", type=non_negative_float, default=0.0, help="USD per 1M prompt tokens, for the cost estimate")
    g.add_argument("--price-completion", type=non_negative_float, default=0.0, help="USD per 1M completion tokens")


def _filter(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filter (stage 4)")
    g.add_argument("--gamma", type=positive_float, default=0.6,
                   help="drop pairs with change ratio R > gamma, > 0 (R lies in [0, 1]; default 0.6)")
    g.add_argument("--tokenizer", default=None,
                   help="HF tokenizer name/path for R's tokens (default: whitespace-separated words)")


def _elicit(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("elicit (stage 1)")
    g.add_argument("--model-base-url", default=None, help="OpenAI-compatible server of the model being trained (vLLM/SGLang)")
    g.add_argument("--model-name", default=None, help="served model name")
    g.add_argument("--model-api", choices=["chat", "completions"], default="chat", help="endpoint kind (default chat)")
    g.add_argument("--local-model", default=None, help="generate locally with transformers from this path/name instead")
    g.add_argument("--local-batch-size", type=positive_int, default=8, help="prompts per generate() call (default 8)")
    g.add_argument("--samples", "-k", type=positive_int, default=4, help="samples per problem K (default 4)")
    g.add_argument("--temperature", type=non_negative_float, default=0.7, help="default 0.7 (the paper's)")
    g.add_argument("--top-p", type=unit_fraction, default=0.8, help="default 0.8 (the paper's)")
    g.add_argument("--max-tokens", type=positive_int, default=4096, help="max new tokens per sample (default 4096)")
    g.add_argument("--seed", type=int, default=None, help="per-sample seed = seed + k (sent to the server)")
    g.add_argument("--system-prompt", default=None)
    g.add_argument("--thinking", choices=["off", "on", "unset"], default="off",
                   help="chat_template_kwargs.enable_thinking for Qwen3 on vLLM/SGLang (default off = non-thinking)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spot-rectify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("elicit", help="stage 1: sample, grade, keep errors; per-source accuracy (evaluation)")
    _common(p, "problems (.jsonl/.json/.parquet): prompt|question|problem, ground_truth|solution|answer, "
               "optional data_source, index")
    _elicit(p)
    _network(p)

    p = sub.add_parser("rectify", help="stages 2-5 on errors.jsonl (prompt, ground_truth, model_output, ...)")
    _common(p, "errors.jsonl in the authors' form: prompt, ground_truth, model_output (+ index, sample, "
               "extracted_answer, data_source)")
    p.add_argument("--only", action="store_true", help="run stage 2 alone (write rectified.jsonl, stop)")
    _oracle(p)
    _network(p)
    _filter(p)

    p = sub.add_parser("verify", help="stage 3 alone: corrected answer must match the ground truth")
    _common(p, "rectified.jsonl (default DIR/rectified.jsonl)", input_required=False)

    p = sub.add_parser("filter", help="stages 4-5 alone: LCS change-ratio filter, write pairs/report")
    _common(p, "verified.jsonl (default DIR/verified.jsonl)", input_required=False)
    _filter(p)

    p = sub.add_parser("run", help="stages 1-5: problems -> pairs")
    _common(p, "problems file, as for elicit")
    _elicit(p)
    _oracle(p)
    _network(p)
    _filter(p)
    return ap


def _config(args):
    from megatron_spot.rectify.pipeline import PipelineConfig

    cfg = PipelineConfig(output_dir=args.output, progress=not args.no_progress, cache_path=args.cache)
    for name in ("oracle_base_url", "oracle_model", "concurrency", "timeout", "max_retries", "max_requests",
                 "max_answer_bytes", "with_ground_truth", "prompt_version", "start_marker", "end_marker",
                 "oracle_temperature", "oracle_max_tokens", "gamma", "tokenizer",
                 "model_base_url", "model_name", "model_api", "local_model", "local_batch_size", "samples",
                 "temperature", "top_p", "max_tokens", "seed", "system_prompt", "thinking"):
        if hasattr(args, name):
            setattr(cfg, name, getattr(args, name))
    if getattr(args, "oracle_extra_body", None):
        try:
            cfg.oracle_extra_body = json.loads(args.oracle_extra_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--oracle-extra-body is not JSON: {e}") from None
    if hasattr(args, "price_prompt"):
        cfg.price_prompt_per_mtok, cfg.price_completion_per_mtok = args.price_prompt, args.price_completion
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_spot.rectify import pipeline
    from megatron_spot.rectify.client import FatalRequestError

    from megatron_spot.rectify.jsonl import has_records
    from megatron_spot.utils.atomic import makedirs_tracked, remove_empty_dirs
    from megatron_spot.utils.output_paths import check_output_dir, check_output_file

    created: list = []
    try:
        check_output_dir(args.output, "--output")  # before any request: OutputPathError is a ValueError
        if args.cache:
            check_output_file(args.cache, "--cache")
        cfg = _config(args)
        stage_input = args.input or cfg.path("rectified.jsonl" if args.cmd == "verify" else "verified.jsonl")
        if os.path.isfile(stage_input) and not has_records(stage_input):
            raise ValueError(f"{stage_input}: no records (an empty input)")
        if cfg.tokenizer:  # stage 4's tokenizer, loaded now: a wrong name must not wait for the Oracle's answers
            from megatron_spot.rectify.change_ratio import hf_tokenizer

            hf_tokenizer(cfg.tokenizer)
        created = makedirs_tracked(cfg.output_dir)  # taken away again when the input is refused
        if args.cmd == "elicit":
            pipeline.elicit(args.input, cfg)
            print(cfg.path("errors.jsonl"))
            print(cfg.path("eval.json"))
            return OK
        if args.cmd == "rectify":
            if args.only:
                pipeline.rectify(args.input, cfg)
            else:
                pipeline.run_rectify(args.input, cfg)
        elif args.cmd == "verify":
            pipeline.verify(args.input or cfg.path("rectified.jsonl"), cfg)
        elif args.cmd == "filter":
            pipeline.filter_pairs(args.input or cfg.path("verified.jsonl"), cfg)
        elif args.cmd == "run":
            pipeline.run_all(args.input, cfg)
        pipeline.print_summary(cfg)
        return OK
    except FatalRequestError as e:   # the endpoint refuses the key, URL or model: the input is wrong
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except pipeline.AllRequestsFailed as e:  # outputs written (rejects say why), but nothing came back
        print(f"error: {e}", file=sys.stderr)
        return FAILURE
    except (ValueError, FileNotFoundError) as e:
        remove_empty_dirs(created)
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted: finished requests are in the cache; rerun the same command to resume",
              file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
