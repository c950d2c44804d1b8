"""Benchmark evaluation the way the SPoT paper reports it, over the elicit machinery.

For every benchmark (a local .jsonl/.json/.parquet file) and every problem, K trials are sampled from
the model (OpenAI-compatible server, or --local-model with transformers), graded (math-verify on the
last \\boxed{} answer; multiple choice by its letter; IFEval by lm-eval's instruction checkers, see
ifeval.py; Connect4 by the authors' two winning-move questions, see connect4.py), and accuracy is
reported per benchmark as the mean over trials of the per-trial accuracy, with its spread: the standard
deviation over trials (population, ddof=0). Requests go through the same client and SQLite cache as
rectification (`DIR/cache.sqlite`, keyed by model, messages, sampling settings and trial), so an
interrupted run resumes without resending anything that already came back.

The paper's protocol (`PAPER_PROTOCOL`): thinking disabled, temperature 0.7, top-p 0.8, up to 32,768
new tokens (IFEval: 8,192); 16 trials for AIME24 / AIME25 / AMC23 and 5 for MATH-500 / Minerva /
OlympiadBench / GPQA-Diamond / Connect4 / IFEval.

The paper's table (`GROUPS`, `summarise_groups`): In-domain Avg = mean of the six math benchmarks, OOD
Avg = mean of GPQA-Diamond and Connect4, IFEval, and Overall Avg = mean over all benchmarks of the run
(the paper's nine give its number: 47.1 = (6 x 46.8 + 2 x 29.9 + 83.0) / 9 for Qwen3-8B).

Outputs in the output folder: samples.jsonl (one graded answer per problem and trial), results.json
(per benchmark: problems, trials, mean, std, per-trial accuracies, and the sub-metrics of IFEval and
Connect4; the table's averages). `compare(base, tuned)` gives the before/after tables and a chart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import statistics
from typing import Optional, Sequence

from . import connect4, ifeval
from .cache import request_key
from .client import ChatClient, Job, api_key_from_env
from .elicit import sampling_body
from .grading import answers_match, extract_boxed
from .jsonl import read_json, read_records_located, write_json_atomic, write_jsonl_atomic

# canonical key -> (display name, trials under the paper's protocol, kind)
BENCHMARKS = {
    "aime24": ("AIME24", 16, "math"), "aime25": ("AIME25", 16, "math"), "amc23": ("AMC23", 16, "math"),
    "math500": ("MATH-500", 5, "math"), "minerva": ("Minerva", 5, "math"),
    "olympiadbench": ("OlympiadBench", 5, "math"), "gpqadiamond": ("GPQA-Diamond", 5, "choice"),
    "connect4": ("Connect4", 5, "connect4"), "ifeval": ("IFEval", 5, "ifeval"),
}
PAPER_PROTOCOL = {"temperature": 0.7, "top_p": 0.8, "max_tokens": 32768, "thinking": "off",
                  "trials": {k: v[1] for k, v in BENCHMARKS.items()},
                  "max_tokens_for": {"ifeval": ifeval.MAX_NEW_TOKENS}}
# The columns of the paper's main table: key -> (heading, member benchmarks); "overall" is every benchmark.
GROUPS = {
    "in_domain": ("In-domain Avg", ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")),
    "ood": ("OOD Avg", ("gpqadiamond", "connect4")),
    "ifeval": ("IFEval", ("ifeval",)),
}
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Answer the multiple-choice question. Think step by step, then give the letter of the "
                      "correct option within \\boxed{}, e.g. \\boxed{A}.")
LETTERS = "ABCDEFGHIJ"


class EvalInputError(ValueError):
    """A benchmark file or option that cannot be used (the message names the file and field)."""


def benchmark_key(name: str) -> str:
    """'MATH-500' -> 'math500', 'GPQA_Diamond' -> 'gpqadiamond', 'gpqa' -> 'gpqadiamond';
    the authors' 'connect4_eval_500' -> 'connect4', 'IFEval_input_data' -> 'ifeval'."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key == "gpqa":
        return "gpqadiamond"
    for prefix in ("connect4", "ifeval"):
        if key.startswith(prefix):
            return prefix
    return key


def display_name(key: str) -> str:
    return BENCHMARKS[key][0] if key in BENCHMARKS else key


@dataclasses.dataclass
class Problem:
    id: str
    prompt: str
    answer: str
    kind: str                              # "math", "choice", "ifeval" or "connect4"
    system_prompt: Optional[str] = None    # replaces --system-prompt for this problem (Connect4's rules)
    reference: object = None               # ifeval.IFEvalItem, or Connect4's [own moves, opponent's moves]


def _first(rec: dict, names) -> Optional[object]:
    for n in names:
        v = rec.get(n)
        if v is not None and (not isinstance(v, str) or v.strip()):
            return v
    return None


def _choice_problem(rec: dict, where: str, index: int) -> tuple[str, str]:
    """(question with lettered options, correct letter) from a multiple-choice record.

    Accepted forms: `choices`/`options` (a list, or a dict letter -> text) with `answer` as a letter, an
    index or the correct option's text; or GPQA's own columns `Question`, `Correct Answer`,
    `Incorrect Answer 1..3`, whose options are put in an order fixed by the record's index.
    """
    question = _first(rec, ("question", "Question", "problem", "prompt"))
    if not isinstance(question, str):
        raise EvalInputError(f"{where}: no question text (question/Question/problem/prompt)")
    opts = _first(rec, ("choices", "options"))
    if opts is None and rec.get("Correct Answer") is not None:
        wrong = [rec.get(f"Incorrect Answer {i}") for i in (1, 2, 3)]
        if any(w is None for w in wrong):
            raise EvalInputError(f"{where}: GPQA record needs 'Incorrect Answer 1'..'3'")
        options = [str(rec["Correct Answer"]).strip()] + [str(w).strip() for w in wrong]
        order = sorted(range(4), key=lambda k: request_key(i=index, k=k))   # stable, content-independent
        options = [options[k] for k in order]
        letter = LETTERS[order.index(0)]
    else:
        if isinstance(opts, dict):
            keys = sorted(opts)
            options = [str(opts[k]) for k in keys]
            letters = [str(k).strip().upper() for k in keys]
        elif isinstance(opts, (list, tuple)) and opts:
            options = [str(o) for o in opts]
            letters = list(LETTERS[:len(options)])
        else:
            raise EvalInputError(f"{where}: multiple-choice record needs 'choices' (a list or dict) "
                                 f"or GPQA's 'Correct Answer' columns")
        ans = _first(rec, ("answer", "correct", "label", "ground_truth"))
        if isinstance(ans, bool) or ans is None:
            raise EvalInputError(f"{where}: multiple-choice record has no 'answer'")
        if isinstance(ans, int) and 0 <= ans < len(options):
            letter = letters[ans]
        elif str(ans).strip().upper() in letters:
            letter = str(ans).strip().upper()
        elif str(ans).strip() in [o.strip() for o in options]:
            letter = letters[[o.strip() for o in options].index(str(ans).strip())]
        else:
            raise EvalInputError(f"{where}: 'answer' {ans!r} is neither an option letter, index nor option text")
        if letters != list(LETTERS[:len(options)]):
            raise EvalInputError(f"{where}: option keys must be A, B, C, ... (got {letters})")
    text = question.strip() + "\n\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return text, letter


def load_benchmark(path: str, key: str, limit: Optional[int] = None) -> list[Problem]:
    """Problems of one benchmark file. Math: problem/question/prompt + answer/ground_truth (or the
    \\boxed{} of `solution`). Multiple choice (GPQA-Diamond, or records with `choices`): see above.
    IFEval: key, prompt, instruction_id_list, kwargs. Connect4: state, answer (two lists of [row, col]).
    A bad record is reported by file and line (.jsonl) or item / row number (.json / .parquet)."""
    if not os.path.isfile(path):
        raise EvalInputError(f"benchmark {display_name(key)}: file not found: {path}")
    try:
        records = read_records_located(path)
    except ValueError as e:
        raise EvalInputError(f"benchmark {display_name(key)}: {e}") from None
    if not records:
        raise EvalInputError(f"{path}: no records")
    kind_default = BENCHMARKS.get(key, (None, None, "math"))[2]
    out, seen = [], set()
    for i, (where, rec) in enumerate(records[:limit] if limit else records):
        if not isinstance(rec, dict):
            raise EvalInputError(f"{where}: expected an object")
        given = _first(rec, ("id", "key", "unique_id", "index", "idx", "Record ID"))
        pid = str(i) if given is None else str(given)
        if pid in seen:
            pid = f"{pid}@{i}"
        seen.add(pid)
        if kind_default == "ifeval":
            try:
                item = ifeval.parse_record(rec, where)
            except ValueError as e:
                raise EvalInputError(str(e)) from None
            out.append(Problem(pid, item.prompt, ",".join(item.instruction_id_list), "ifeval", reference=item))
            continue
        if kind_default == "connect4":
            state = rec.get("state")
            if not isinstance(state, str) or not state.strip():
                raise EvalInputError(f"{where}: Connect4 record needs a 'state' (the board as text)")
            try:
                moves = connect4.parse_answer(rec.get("answer"), where)
            except ValueError as e:
                raise EvalInputError(str(e)) from None
            out.append(Problem(pid, state, json.dumps(moves), "connect4", system_prompt=connect4.SYSTEM_PROMPT,
                               reference=moves))
            continue
        if kind_default == "choice" or rec.get("choices") is not None or rec.get("options") is not None:
            prompt, answer = _choice_problem(rec, where, i)
            out.append(Problem(pid, prompt + "\n\n" + CHOICE_INSTRUCTION, answer, "choice"))
            continue
        prompt = _first(rec, ("problem", "question", "prompt", "Question"))
        if not isinstance(prompt, str):
            raise EvalInputError(f"{where}: no problem text (problem/question/prompt)")
        answer = _first(rec, ("answer", "ground_truth", "final_answer", "expected_answer"))
        if answer is None and isinstance(rec.get("solution"), str):
            answer = extract_boxed(rec["solution"]) or rec["solution"]
        if isinstance(answer, (list, tuple)) and answer:   # OlympiadBench stores final_answer as a list
            answer = answer[0]
        if answer is None:
            raise EvalInputError(f"{where}: no answer (answer/ground_truth/final_answer, or a \\boxed{{}} solution)")
        out.append(Problem(pid, prompt.strip() + "\n\n" + MATH_INSTRUCTION, str(answer), "math"))
    return out


_LETTER_RE = re.compile(r"(?:answer|option)\s*(?:is|:)?\s*\(?\**([A-J])\b\)?", re.IGNORECASE)


def extract_choice(text: Optional[str], n_options: int = 4) -> Optional[str]:
    """The chosen letter: the last \\boxed{} when it holds a letter (\\boxed{B}, \\boxed{(B)},
    \\boxed{\\text{B}}), else the last 'answer is B' / 'Answer: (B)'."""
    if not text:
        return None
    valid = LETTERS[:max(n_options, 1)]
    boxed = extract_boxed(text)
    if boxed is not None:
        m = re.fullmatch(r"\s*(?:\\text\{|\\textbf\{|\\mathrm\{)?\(?\s*([A-Ja-j])\s*\)?\}?\s*(?:[.:].*)?", boxed)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper()
    hits = [h.upper() for h in _LETTER_RE.findall(text) if h.upper() in valid]
    return hits[-1] if hits else None


def grade_answer(problem: Problem, text: Optional[str]) -> tuple[bool, Optional[str]]:
    """(right, what was extracted) for a math or multiple-choice answer."""
    if problem.kind == "choice":
        n = len(re.findall(r"^[A-J]\. ", problem.prompt, flags=re.MULTILINE))
        letter = extract_choice(text, n)
        return letter == problem.answer, letter
    extracted = extract_boxed(text)
    return (answers_match(extracted, problem.answer) if extracted is not None else False), extracted


# Sub-metrics reported beside a benchmark's accuracy: name -> what it is (README, results.json).
SUB_METRICS = {
    "ifeval": {"prompt_level_strict": "all of a prompt's instructions followed, strict (the IFEval accuracy)",
               "inst_level_strict": "share of instructions followed, strict",
               "prompt_level_loose": "all of a prompt's instructions followed, loose",
               "inst_level_loose": "share of instructions followed, loose"},
    "connect4": {"acc1": "own winning moves listed exactly (Intermediate Thinking Results 1)",
                 "acc2": "opponent's winning moves listed exactly (Intermediate Thinking Results 2)",
                 "format_error": "share of answers missing either tag"},
}


@dataclasses.dataclass
class Graded:
    score: float          # this answer's share of the benchmark's accuracy: 0/1, Connect4 (acc1 + acc2) / 2
    extracted: object     # what grading read from the answer
    counts: dict          # sub-metric -> (numerator, denominator) for this answer (SUB_METRICS)


def grade(problem: Problem, text: Optional[str]) -> Graded:
    """Any benchmark's verdict on one answer (None: no answer, graded as an empty one, i.e. wrong)."""
    if problem.kind == "ifeval":
        g = ifeval.grade(problem.reference, text)
        n = len(g.strict)
        return Graded(float(g.prompt_strict), {"strict": list(g.strict), "loose": list(g.loose)},
                      {"prompt_level_strict": (g.prompt_strict, 1), "inst_level_strict": (sum(g.strict), n),
                       "prompt_level_loose": (g.prompt_loose, 1), "inst_level_loose": (sum(g.loose), n)})
    if problem.kind == "connect4":
        g = connect4.grade(text, problem.reference)
        return Graded(g.score, {"results1": g.given1, "results2": g.given2},
                      {"acc1": (g.acc1, 1), "acc2": (g.acc2, 1), "format_error": (int(g.format_error), 1)})
    ok, extracted = grade_answer(problem, text)
    return Graded(float(ok), extracted, {})


@dataclasses.dataclass
class EvalConfig:
    output_dir: str
    benchmarks: dict                       # key -> path
    trials: dict                           # key -> K
    temperature: float = 0.7
    top_p: float = 0.8
    max_tokens: int = 32768
    max_tokens_for: dict = dataclasses.field(default_factory=dict)   # key -> cap; a benchmark gets the smaller
    thinking: str = "off"                  # off | on | unset (chat_template_kwargs.enable_thinking)
    seed: Optional[int] = 0                # trial t sends seed + t (vLLM/SGLang honour per-request seeds)
    system_prompt: Optional[str] = None
    model_base_url: Optional[str] = None
    model_name: Optional[str] = None
    model_api_key_env: tuple = ("MODEL_API_KEY",)
    local_model: Optional[str] = None
    local_batch_size: int = 8
    concurrency: int = 16
    timeout: float = 1800.0
    max_retries: int = 6                   # the openai SDK's retries (backoff and Retry-After: see client.py)
    max_requests: Optional[int] = None
    limit: Optional[int] = None            # first N problems of each benchmark (smoke tests)
    progress: bool = True


def trials_for(keys: Sequence[str], protocol: str = "paper", trials: Optional[int] = None,
               overrides: Optional[dict] = None) -> dict:
    """K per benchmark: --trials for all, else the protocol's table; name=K overrides win."""
    out = {}
    for k in keys:
        if trials is not None:
            out[k] = trials
        elif protocol == "paper" and k in PAPER_PROTOCOL["trials"]:
            out[k] = PAPER_PROTOCOL["trials"][k]
        else:
            raise EvalInputError(f"benchmark {k!r} has no trial count in the {protocol!r} protocol; "
                                 f"pass --trials K or --trials-for {k}=K (known: {', '.join(BENCHMARKS)})")
    for k, v in (overrides or {}).items():
        out[benchmark_key(k)] = int(v)
    if any(v < 1 for v in out.values()):
        raise EvalInputError(f"trials must be >= 1, got {out}")
    return out


def _generate(cfg: EvalConfig, jobs: list, cache, model_label: str) -> tuple[dict, dict]:
    if cfg.local_model:
        from .config import PipelineConfig
        from .elicit import generate_locally

        pcfg = PipelineConfig(output_dir=cfg.output_dir, local_model=cfg.local_model,
                              local_batch_size=cfg.local_batch_size, progress=cfg.progress)
        return generate_locally(pcfg, jobs, cache), {}
    client = ChatClient(cfg.model_base_url, model_label, api_key=api_key_from_env(cfg.model_api_key_env),
                        timeout=cfg.timeout, max_requests=cfg.max_requests,
                        max_retries=cfg.max_retries)
    results = client.run(jobs, cache, kind="eval", concurrency=cfg.concurrency, progress=cfg.progress,
                         desc="evaluate: sampling")
    return results, client.stats.as_dict()


def summarise(per_trial: list[float]) -> dict:
    mean = statistics.fmean(per_trial)
    return {"mean": mean, "std": statistics.pstdev(per_trial) if len(per_trial) > 1 else 0.0,
            "per_trial": per_trial}


def request_body(cfg: EvalConfig, key: str, problem: Problem, trial: int) -> dict:
    """The sampling request of one (problem, trial): the run's settings, the problem's own system prompt
    (Connect4) and the benchmark's token cap (IFEval), so each lands in the cache key."""
    body = sampling_body(cfg, problem.prompt, trial)
    if problem.system_prompt is not None:
        body["messages"] = [{"role": "system", "content": problem.system_prompt},
                            {"role": "user", "content": problem.prompt}]
    cap = cfg.max_tokens_for.get(key)
    if cap is not None:
        body["max_tokens"] = min(cfg.max_tokens, int(cap))
    return body


def summarise_groups(benches: dict) -> dict:
    """The paper's table from per-benchmark results (key -> {"mean": ...}): each group's mean over its
    members present (`benchmarks`; `complete` says whether all are), and Overall Avg over every benchmark."""
    out = {}
    for gkey, (name, members) in GROUPS.items():
        present = [k for k in members if k in benches]
        out[gkey] = {"name": name, "mean": statistics.fmean(benches[k]["mean"] for k in present) if present else None,
                     "benchmarks": present, "complete": len(present) == len(members)}
    out["overall"] = {"name": "Overall Avg", "mean": statistics.fmean(b["mean"] for b in benches.values()),
                      "benchmarks": list(benches), "complete": set(benches) == set(BENCHMARKS)}
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Sample, grade and summarise every benchmark; writes samples.jsonl and results.json."""
    from .cache import RequestCache

    if cfg.local_model:
        model_label = "local:" + cfg.local_model
    elif cfg.model_base_url and cfg.model_name:
        model_label = cfg.model_name
    else:
        raise EvalInputError("evaluate needs --model-base-url and --model-name, or --local-model")
    if not cfg.benchmarks:
        raise EvalInputError("no benchmarks given (--benchmark NAME=PATH or --benchmarks-dir DIR)")
    order = list(BENCHMARKS)   # the paper's order, then any other benchmark as given
    keys = sorted(cfg.benchmarks, key=lambda k: order.index(k) if k in order else len(order))
    problems = {k: load_benchmark(cfg.benchmarks[k], k, cfg.limit) for k in keys}
    jobs, slots = [], []
    for key, probs in problems.items():
        for pr in probs:
            for t in range(cfg.trials[key]):
                body = request_body(cfg, key, pr, t)
                jk = request_key(kind="eval", model=model_label, body=body, trial=t)
                jobs.append(Job(jk, body))
                slots.append((key, pr, t, jk))
    created = not os.path.exists(cfg.output_dir)
    os.makedirs(cfg.output_dir, exist_ok=True)
    cache = RequestCache(os.path.join(cfg.output_dir, "cache.sqlite"))
    try:
        results, client_stats = _generate(cfg, jobs, cache, model_label)
    except BaseException:
        # a run that fails before its first answer (a --local-model that does not load, a server that is not
        # there) leaves nothing behind; one with answers keeps them in the cache for the rerun
        stored = len(cache)
        cache.close()
        if created and not stored:
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
        raise
    cache.close()

    samples, graded = [], {}
    failed = 0
    for key, pr, t, jk in slots:
        r = results.get(jk)
        if r is None or not r.ok:   # a failed request counts as wrong (graded as an empty answer), and is reported
            failed += 1
            graded[(key, pr.id, t)] = (grade(pr, None), True)
            continue
        g = grade(pr, r.content)
        graded[(key, pr.id, t)] = (g, False)
        samples.append({"benchmark": key, "id": pr.id, "trial": t, "correct": g.score == 1.0, "score": g.score,
                        "extracted": g.extracted, "answer": pr.answer, "finish_reason": r.finish_reason,
                        "response": r.content})
    benches = {}
    for key, probs in problems.items():
        K = cfg.trials[key]
        per_trial, missing = [], 0
        sub = {name: [] for name in SUB_METRICS.get(BENCHMARKS.get(key, ("", 0, "math"))[2], {})}
        for t in range(K):
            marks = [graded[(key, pr.id, t)] for pr in probs]
            missing += sum(m[1] for m in marks)
            per_trial.append(sum(m[0].score for m in marks) / len(probs))
            for name in sub:
                num = sum(m[0].counts[name][0] for m in marks)
                den = sum(m[0].counts[name][1] for m in marks)
                sub[name].append(num / den)
        benches[key] = {"name": display_name(key), "file": os.path.abspath(cfg.benchmarks[key]),
                        "problems": len(probs), "trials": K, "failed_requests": missing,
                        **summarise(per_trial)}
        if sub:
            benches[key]["metrics"] = {name: summarise(v) for name, v in sub.items()}
    groups = summarise_groups(benches)
    doc = {"model": model_label,
           "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                        "max_tokens_for": dict(cfg.max_tokens_for), "thinking": cfg.thinking, "seed": cfg.seed,
                        "system_prompt": cfg.system_prompt},
           "spread": "std over trials of the per-trial accuracy (ddof=0)",
           "benchmarks": benches, "average": groups["overall"]["mean"], "table": groups,
           "failed_requests": failed, "client": client_stats}
    write_jsonl_atomic(os.path.join(cfg.output_dir, "samples.jsonl"), samples)
    write_json_atomic(os.path.join(cfg.output_dir, "results.json"), doc)
    return doc


# --- before / after ---------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _group_cell(group: dict) -> str:
    if group["mean"] is None:
        return "n/a"
    return _pct(group["mean"]) + ("" if group["complete"] else "*")


def _partial_note(groups: dict) -> list:
    partial = [g for g in groups.values() if g["mean"] is not None and not g["complete"]]
    if not partial:
        return []
    return ["* averaged over the benchmarks present only: " + "; ".join(
        f"{g['name']} over {', '.join(display_name(k) for k in g['benchmarks'])}" for g in partial)]


def paper_table(rows: list) -> list:
    """The paper's main table: one line per (label, groups); a later row shows its change from the first."""
    heads = [GROUPS[k][0] for k in GROUPS] + ["Overall Avg"]
    width = max(14, max(len(label) for label, _ in rows))
    lines = [(f"{'model':<{width}} " + " ".join(f"{h:<15}" for h in heads)).rstrip()]
    first = rows[0][1]
    for i, (label, groups) in enumerate(rows):
        cells = []
        for k in list(GROUPS) + ["overall"]:
            cell = _group_cell(groups[k])
            if i and groups[k]["mean"] is not None and first[k]["mean"] is not None:
                cell += f" ({100 * (groups[k]['mean'] - first[k]['mean']):+.1f})"
            cells.append(f"{cell:<15}")
        lines.append(f"{label:<{width}} " + " ".join(cells).rstrip())
    return lines + _partial_note(rows[-1][1])


NAME_WIDTH = 21   # fits the sub-metric rows ("  prompt_level_strict")


def _sub_metric_lines(b: dict) -> list:
    return [f"{'  ' + name:<{NAME_WIDTH}} {'':>8} {'':>6} {_pct(m['mean']):>7} +- {_pct(m['std']):<5}"
            for name, m in b.get("metrics", {}).items()]


def format_results(doc: dict) -> str:
    lines = [f"{doc['model']}  (accuracy %, mean +- std over trials)",
             f"{'benchmark':<{NAME_WIDTH}} {'problems':>8} {'trials':>6} {'accuracy':>14}"]
    for b in doc["benchmarks"].values():
        lines.append(f"{b['name']:<{NAME_WIDTH}} {b['problems']:>8} {b['trials']:>6} "
                     f"{_pct(b['mean']):>7} +- {_pct(b['std']):<5}")
        lines += _sub_metric_lines(b)
    lines.append(f"{'average':<{NAME_WIDTH}} {'':>8} {'':>6} {_pct(doc['average']):>7}")
    groups = summarise_groups(doc["benchmarks"])
    lines += ["", "the paper's table (accuracy %):"] + paper_table([(doc["model"][:40], groups)])
    return "\n".join(lines)


def compare(base: dict, tuned: dict, plot_path: Optional[str] = None) -> str:
    """The before/after tables (benchmarks of both files, in the base's order: per benchmark, then the
    paper's four columns over those benchmarks) and an optional chart."""
    keys = [k for k in base["benchmarks"] if k in tuned["benchmarks"]]
    if not keys:
        raise EvalInputError("the two results files have no benchmark in common")
    head = f"{'benchmark':<{NAME_WIDTH}} {'base':>14} {'tuned':>14} {'delta':>7}"
    lines = [f"base:  {base['model']}", f"tuned: {tuned['model']}", "accuracy %, mean +- std over trials", head]

    def row(name, b, t):
        return (f"{name:<{NAME_WIDTH}} {_pct(b['mean']):>7} +- {_pct(b['std']):<4} {_pct(t['mean']):>7} +- "
                f"{_pct(t['std']):<4} {100 * (t['mean'] - b['mean']):>+7.1f}")

    for k in keys:
        b, t = base["benchmarks"][k], tuned["benchmarks"][k]
        lines.append(row(b["name"], b, t))
        for name, m in b.get("metrics", {}).items():
            if name in t.get("metrics", {}):
                lines.append(row("  " + name, m, t["metrics"][name]))
    gb = summarise_groups({k: base["benchmarks"][k] for k in keys})
    gt = summarise_groups({k: tuned["benchmarks"][k] for k in keys})
    ab, at = gb["overall"]["mean"], gt["overall"]["mean"]
    lines.append(f"{'average':<{NAME_WIDTH}} {_pct(ab):>7}{'':7} {_pct(at):>7}{'':7} {100 * (at - ab):>+7.1f}")
    lines += ["", "the paper's table (accuracy %, change from base in brackets):"]
    lines += paper_table([("base", gb), ("tuned", gt)])
    if plot_path:
        _bar_chart(base, tuned, keys, (gb, gt), plot_path)
        lines.append(f"chart: {plot_path}")
    return "\n".join(lines)


def _bar_chart(base: dict, tuned: dict, keys: list, groups: tuple, path: str) -> None:
    """Left: every benchmark (error bar = std over trials); right: the paper's four columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_spot.utils.atomic import publish_file, temp_path

    gkeys = [k for k in list(GROUPS) + ["overall"] if groups[0][k]["mean"] is not None]
    w = 0.38
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(5.0, 1.1 * len(keys) + 2) + 1.2 * len(gkeys) + 1, 4.0),
                                  gridspec_kw={"width_ratios": [max(len(keys), 1), max(len(gkeys), 1)]})
    top = 0.0
    for off, doc, label, g in ((-w / 2, base, "base", groups[0]), (w / 2, tuned, "tuned", groups[1])):
        means = [100 * doc["benchmarks"][k]["mean"] for k in keys]
        stds = [100 * doc["benchmarks"][k]["std"] for k in keys]
        bars = ax.bar([i + off for i in range(len(keys))], means, w, yerr=stds, capsize=3,
                      label=f"{label}: {doc['model']}"[:60])
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=2)
        top = max([top] + [m + s for m, s in zip(means, stds)])
        gmeans = [100 * g[k]["mean"] for k in gkeys]
        gbars = ax2.bar([i + off for i in range(len(gkeys))], gmeans, w, label=label)
        ax2.bar_label(gbars, labels=[f"{m:.1f}" for m in gmeans], fontsize=7, padding=2)
        top = max([top] + gmeans)
    for a in (ax, ax2):   # room above the bars for their labels; the axis itself stops at 100
        a.set_ylim(0, min(112.0, max(10.0, 1.25 * top)))
        a.set_yticks([y for y in range(0, 101, 20) if y <= max(10.0, 1.25 * top)])
    ax.set_xticks(list(range(len(keys))))
    ax.set_xticklabels([base["benchmarks"][k]["name"] for k in keys], rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("per benchmark (error bar = std over trials)", fontsize=9, pad=12)
    ax.legend(fontsize=7, loc="best")
    ax2.set_xticks(list(range(len(gkeys))))
    ax2.set_xticklabels([groups[0][k]["name"] + ("" if groups[0][k]["complete"] else "*") for k in gkeys],
                        rotation=20, ha="right")
    ax2.set_title("the paper's table", fontsize=9, pad=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    publish_file(tmp, path)


def load_results(path: str) -> dict:
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), dict):
        raise EvalInputError(f"{path}: not a results.json written by tools/evaluate.py")
    return doc


__all__ = ["BENCHMARKS", "GROUPS", "PAPER_PROTOCOL", "SUB_METRICS", "EvalConfig", "EvalInputError", "Graded",
           "Problem", "benchmark_key", "compare", "evaluate", "extract_choice", "format_results", "grade",
           "grade_answer", "load_benchmark", "load_results", "paper_table", "request_body", "summarise",
           "summarise_groups", "trials_for"]
