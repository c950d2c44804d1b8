"""Evaluate a model on the SPoT paper's nine benchmarks the way the paper does, or compare two runs.

Sample K answers per problem from an OpenAI-compatible server (vLLM/SGLang) or --local-model
(transformers), grade them (math-verify on the last \\boxed{} answer; GPQA-Diamond and other
multiple-choice files by option letter; IFEval by lm-eval's instruction checkers, strict and loose;
Connect4 by the authors' two winning-move questions) and report accuracy per benchmark as mean +- std
over trials, then the paper's table: In-domain Avg (AIME24, AIME25, AMC23, MATH-500, Minerva,
OlympiadBench), OOD Avg (GPQA-Diamond, Connect4), IFEval (prompt-level strict) and Overall Avg (the mean
over all benchmarks of the run: the paper's nine give the paper's number).

--protocol paper (the default): thinking disabled, temperature 0.7, top-p 0.8, up to 32,768 new tokens
(IFEval: 8,192), 16 trials for AIME24 / AIME25 / AMC23 and 5 for MATH-500 / Minerva / OlympiadBench /
GPQA-Diamond / Connect4 / IFEval. Connect4 is asked under the authors' system prompt (the rules and the
answer format), which --system-prompt does not replace.

Examples:
  spot-evaluate --benchmarks-dir benchmarks/ --model-base-url http://localhost:8000/v1 \\
      --model-name Qwen/Qwen3-8B --output runs/eval_base
  spot-evaluate --benchmark aime24=data/aime24.jsonl --benchmark gpqa=data/gpqa_diamond.parquet \\
      --benchmark ifeval=data/ifeval_input_data.jsonl --benchmark connect4=data/connect4_eval_500.jsonl \\
      --local-model runs/spot/hf --trials 2 --max-tokens 2048 --output runs/eval_smoke
  spot-evaluate --compare runs/eval_base/results.json runs/eval_spot/results.json --plot cmp.png

--benchmarks-dir takes every .jsonl/.json/.parquet whose name is a known benchmark (aime24, aime25, amc23,
math500 / MATH-500, minerva, olympiadbench, gpqa_diamond / gpqa, connect4* (e.g. the authors'
connect4_eval_500.jsonl), ifeval*). Interrupted? Rerun the same command:
every answer is in OUTPUT/cache.sqlite and is never requested again.

Exit codes: 0 ok, 1 failure (some requests failed: counted as wrong and reported), 2 bad arguments or
input (including an endpoint that refuses the key, URL or model: HTTP 401/403/404), 130 interrupted.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from megatron_spot.cli import BAD_INPUT, FAILURE, INTERRUPTED, OK
from megatron_spot.cli.args import non_negative_float, positive_float, positive_int, unit_fraction


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spot-evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs=2, metavar=("BASE", "TUNED"),
                    help="print the before/after tables (per benchmark and the paper's four columns) of two "
                         "results.json files (no sampling)")
    ap.add_argument("--plot", metavar="PNG", help="with --compare: write a bar chart (default: TUNED's folder/compare.png)")
    b = ap.add_argument_group("benchmarks")
    b.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH",
                   help="a benchmark file (.jsonl/.json/.parquet); NAME: aime24, aime25, amc23, math500, minerva, "
                        "olympiadbench, gpqa, connect4, ifeval, or any other (math, or multiple choice with "
                        "'choices'); repeatable")
    b.add_argument("--benchmarks-dir", metavar="DIR", help="every file in DIR named after a known benchmark")
    b.add_argument("--limit", type=positive_int, help="only the first N problems of each benchmark (smoke tests)")
    m = ap.add_argument_group("model")
    m.add_argument("--model-base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    m.add_argument("--model-name", help="model name the server serves")
    m.add_argument("--local-model", metavar="HF_DIR", help="sample with transformers on this machine instead")
    m.add_argument("--local-batch-size", type=positive_int, default=8, help="prompts per generate() call (default 8)")
    m.add_argument("--concurrency", type=positive_int, default=16, help="requests in flight (default: 16)")
    m.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds per request (default: 1800)")
    m.add_argument("--max-requests", type=positive_int, help="stop after this many new requests")
    s = ap.add_argument_group("protocol")
    s.add_argument("--protocol", choices=["paper", "none"], default="paper",
                   help="paper: the SPoT paper's settings (see above); none: give --trials and the sampling flags")
    s.add_argument("--trials", type=positive_int, help="K trials for every benchmark (overrides the protocol's table)")
    s.add_argument("--trials-for", action="append", default=[], metavar="NAME=K", help="K for one benchmark")
    s.add_argument("--temperature", type=non_negative_float, help="sampling temperature (paper: 0.7)")
    s.add_argument("--top-p", type=unit_fraction, help="nucleus sampling top-p (paper: 0.8)")
    s.add_argument("--max-tokens", type=positive_int, help="max new tokens (paper: 32768)")
    s.add_argument("--max-tokens-for", action="append", default=[], metavar="NAME=N",
                   help="a lower cap for one benchmark; it gets min(--max-tokens, N) (paper: ifeval=8192)")
    s.add_argument("--thinking", choices=["off", "on", "unset"],
                   help="chat_template_kwargs.enable_thinking (paper: off); unset sends nothing")
    s.add_argument("--seed", type=int, default=0, help="trial t sends seed + t (default: 0)")
    s.add_argument("--system-prompt")
    ap.add_argument("--output", "-o", help="output folder (results.json, samples.jsonl, cache.sqlite)")
    ap.add_argument("--quiet", "-q", action="store_true")
    return ap


def _pairs(items, flag):
    out = {}
    for it in items:
        name, sep, value = it.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects NAME=VALUE, got {it!r}")
        out[name] = value
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_spot.rectify import evaluate as E
    from megatron_spot.rectify.client import FatalRequestError

    from megatron_spot.utils.output_paths import check_output_dir, check_output_file

    try:  # output paths are checked before any work (OutputPathError is a ValueError)
        if args.compare:
            plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.compare[1])), "compare.png")
            check_output_file(plot, "--plot")
            base, tuned = (E.load_results(p) for p in args.compare)
            print(E.compare(base, tuned, plot))
            return OK
        if not args.output:
            raise ValueError("--output DIR is required to evaluate")
        check_output_dir(args.output, "--output")
        benches = {E.benchmark_key(k): v for k, v in _pairs(args.benchmark, "--benchmark").items()}
        if args.benchmarks_dir:
            if not os.path.isdir(args.benchmarks_dir):
                raise ValueError(f"--benchmarks-dir: not a folder: {args.benchmarks_dir}")
            for path in sorted(glob.glob(os.path.join(args.benchmarks_dir, "*"))):
                stem, ext = os.path.splitext(os.path.basename(path))
                key = E.benchmark_key(stem)
                if ext in (".jsonl", ".json", ".parquet") and key in E.BENCHMARKS:
                    benches.setdefault(key, path)
        if not benches:
            raise ValueError("no benchmarks: pass --benchmark NAME=PATH or a --benchmarks-dir with known names")
        paper = args.protocol == "paper"
        if not paper and (args.temperature is None or args.top_p is None or args.max_tokens is None):
            raise ValueError("--protocol none needs --temperature, --top-p and --max-tokens")
        proto = E.PAPER_PROTOCOL

        def pick(value, name):
            return proto[name] if value is None else value

        caps = dict(proto["max_tokens_for"]) if paper else {}
        for name, value in _pairs(args.max_tokens_for, "--max-tokens-for").items():
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--max-tokens-for {name}={value}: N must be a positive integer")
            if E.benchmark_key(name) not in benches:
                raise ValueError(f"--max-tokens-for {name}={value}: {name} is not a benchmark of this run "
                                 f"({', '.join(benches)})")
            caps[E.benchmark_key(name)] = int(value)
        cfg = E.EvalConfig(
            output_dir=args.output, benchmarks=benches,
            trials=E.trials_for(list(benches), args.protocol, args.trials, _pairs(args.trials_for, "--trials-for")),
            temperature=pick(args.temperature, "temperature"), top_p=pick(args.top_p, "top_p"),
            max_tokens=pick(args.max_tokens, "max_tokens"), max_tokens_for=caps,
            thinking=args.thinking or (proto["thinking"] if paper else "unset"), seed=args.seed,
            system_prompt=args.system_prompt, model_base_url=args.model_base_url, model_name=args.model_name,
            local_model=args.local_model, local_batch_size=args.local_batch_size, concurrency=args.concurrency,
            timeout=args.timeout, max_requests=args.max_requests, limit=args.limit, progress=not args.quiet)
        doc = E.evaluate(cfg)
        print(E.format_results(doc))
        print(f"results: {os.path.join(args.output, 'results.json')}")
        if doc["failed_requests"]:
            print(f"evaluate: {doc['failed_requests']} requests failed (counted as wrong); rerun to retry them",
                  file=sys.stderr)
            return FAILURE
        return OK
    except FatalRequestError as e:   # the endpoint refuses the key, URL or model: the input is wrong
        print(f"evaluate: endpoint refused: {e}", file=sys.stderr)
        return BAD_INPUT
    except (ValueError, FileNotFoundError) as e:   # EvalInputError is a ValueError
        print(f"evaluate: error: {e}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("evaluate: interrupted; rerun the same command to resume from the cache", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
