"""The demo's OFFLINE Oracle: synthetic problems, a fallible "student", a calculator Oracle.

Not part of the package: the rectification pipeline only sees ``ChatClient``s (its one transport
seam), and this file hands it clients whose httpx transport answers in-process. Nothing here
touches the network; demos and tests run the real pipeline end to end (same ChatClient, same SDK
retries, budget and cache, same parsing, grading and filtering). Tests serve ``OfflineEndpoint``
over real HTTP on 127.0.0.1 with tests/rectify/loopback.py.

    python examples/offline_oracle.py demo --output runs/rectify_demo   # the whole pipeline offline
    python examples/offline_oracle.py synth --output runs/synth         # problems.jsonl + errors.jsonl

* Problems: multi-step arithmetic word problems ("Maya buys 7 crates of pears, each holding 12
  pears. ... How many pears does Maya have at the end?"), integer-valued at every step, with the
  ground truth and their structure (kept under the record's ``offline`` field).
* Student (answers elicitation requests): writes a step-by-step solution, one equation
  ``$A op B = C$`` per step, ending "Therefore, the final answer is: $\\boxed{N}$.". With a
  per-problem error rate it makes ONE arithmetic slip in one step; later steps correctly build on
  the wrong value, so the error propagates to the final answer.
* Calculator Oracle (answers rectification requests): reads the student's solution out of the
  prompt, recomputes each equation, fixes the first wrong result, carries the corrected value into
  the dependent steps (operand, result and any later mention in that step) and the boxed answer,
  leaves every other character untouched, and wraps the result in the markers. Optional,
  deterministic (hash-seeded) misbehaviour for demos: rewriting from scratch in another style
  (large R), answering without markers, or slipping itself (wrong answer).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import httpx2

from megatron_spot.rectify import prompts as P
from megatron_spot.rectify.client import ChatClient
from megatron_spot.rectify.grading import extract_boxed
from megatron_spot.rectify.jsonl import write_jsonl_atomic
from megatron_spot.rectify.pipeline import PipelineConfig, run_all
from megatron_spot.rectify.report import print_summary

DATA_SOURCE = "offline-arith"
OFFLINE_BASE_URL = "http://offline-calculator.invalid/v1"  # never resolved: the transport is in-process
ORACLE_MODEL = "offline-calculator-oracle"
STUDENT_MODEL = "offline-student"

ELICIT_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form 'Therefore, the final answer is: $\\boxed{ANSWER}$.' where ANSWER is the final number."
)

_NAMES = ["Maya", "Liam", "Sofia", "Noah", "Aisha", "Kenji", "Elena", "Omar", "Priya", "Lucas",
          "Zara", "Mateo", "Ines", "Tariq", "Hana", "Felix"]
_ITEMS = [("apples", "crates", "crate"), ("pencils", "boxes", "box"), ("marbles", "bags", "bag"),
          ("stickers", "sheets", "sheet"), ("cookies", "trays", "tray"), ("books", "shelves", "shelf"),
          ("seeds", "packets", "packet"), ("bottles", "cases", "case"), ("coins", "jars", "jar"),
          ("cards", "decks", "deck")]

_OPS = {"mul": "\\times", "add": "+", "sub": "-", "div": "\\div"}
_SYM2OP = {v: k for k, v in _OPS.items()}


def _apply(op: str, a: int, b: int) -> int:
    if op == "mul":
        return a * b
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "div":
        if b == 0 or a % b:
            raise ArithmeticError("inexact division")
        return a // b
    raise ValueError(op)


def _rng(*parts) -> random.Random:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


@dataclass
class SynthProblem:
    index: int
    name: str
    item: str
    container_pl: str
    container: str
    a: int                      # containers
    b: int                      # items per container
    steps: list = field(default_factory=list)  # [(op, operand)] after the first (a*b) step
    error_rate: float = 0.5

    def values(self) -> list[int]:
        """Correct running value after each step (step 1 = a*b)."""
        vals = [self.a * self.b]
        for op, c in self.steps:
            vals.append(_apply(op, vals[-1], c))
        return vals

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def text(self) -> str:
        n, it = self.name, self.item
        s = [f"{n} buys {self.a} {self.container_pl} of {it}, and each {self.container} holds {self.b} {it}."]
        for k, (op, c) in enumerate(self.steps):
            v = k % 2
            if op == "add":
                s.append([f"Then {n} finds {c} more {it}.", f"A friend gives {n} another {c} {it}."][v])
            elif op == "sub":
                s.append([f"{n} uses {c} of the {it} for a school project.", f"{n} gives {c} {it} to a neighbour."][v])
            elif op == "mul":
                s.append(f"Later, {n} ends up with {c} times as many {it} as before.")
            elif op == "div":
                s.append(f"{n} then splits the {it} equally into {c} groups and keeps only one group.")
        s.append(f"How many {it} does {n} have at the end?")
        return " ".join(s)

    def prompt(self) -> str:
        return ELICIT_INSTRUCTION + "\n\n" + self.text()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SynthProblem":
        d = dict(d)
        d["steps"] = [tuple(x) for x in d.get("steps", [])]
        return cls(**d)


def make_problem(index: int, seed: int = 0) -> SynthProblem:
    r = _rng("problem", seed, index)
    item, cpl, c1 = r.choice(_ITEMS)
    p = SynthProblem(index, r.choice(_NAMES), item, cpl, c1, r.randint(3, 15), r.randint(4, 25),
                     error_rate=round(r.uniform(0.3, 0.9), 2))
    x = p.a * p.b
    for _ in range(r.randint(3, 6)):
        op = r.choice(["add", "sub", "mul", "div", "add", "sub"])
        if op == "div":
            divs = [d for d in range(2, 7) if x % d == 0 and x // d >= 4]
            op = "div" if divs else "add"
            c = r.choice(divs) if divs else r.randint(5, 60)
        elif op == "sub":
            if x < 10:
                op, c = "add", r.randint(5, 60)
            else:
                c = r.randint(1, x // 2)
        elif op == "mul":
            c = r.randint(2, 4) if x < 500 else 2
        else:
            c = r.randint(5, 60)
        x = _apply(op, x, c)
        p.steps.append((op, c))
    return p


def make_problems(num_problems: int, seed: int = 0) -> list[SynthProblem]:
    return [make_problem(i, seed) for i in range(num_problems)]


def problem_record(p: SynthProblem) -> dict:
    """A problems.jsonl record (the elicit stage's input), structure kept under ``offline``."""
    return {"index": p.index, "prompt": p.prompt(), "ground_truth": str(p.answer),
            "data_source": DATA_SOURCE, "offline": p.to_dict()}


# --- the student ---------------------------------------------------------------------------------
def _step_line(p: SynthProblem, k: int, op: str, a: int, b: int, r: int, style: int, restate: bool) -> str:
    n, it = p.name, p.item
    sym = _OPS[op]
    eq = f"${a} {sym} {b} = {r}$"
    prefix = [f"Step {k}: ", f"**Step {k}.** ", f"{k}. "][style]
    if k == 1:
        body = f"{n} starts with {p.a} {p.container_pl} holding {p.b} {it} each, so that is {eq} {it}."
    elif op == "add":
        body = f"Adding the {b} extra {it} gives {eq} {it}."
    elif op == "sub":
        body = f"Taking away the {b} {it} leaves {eq} {it}."
    elif op == "mul":
        body = f"Having {b} times as many means {eq} {it}."
    else:
        body = f"Splitting into {b} equal groups and keeping one gives {eq} {it}."
    if restate:
        body += f" So {n} now has {r} {it}."
    return prefix + body


def student_solution(p: SynthProblem, sample_seed: int) -> tuple[str, Optional[int]]:
    """(solution text, wrong step number or None). Deterministic in (problem, sample_seed)."""
    r = _rng("student", p.index, p.to_dict(), sample_seed)
    style = r.randrange(3)
    restate = r.random() < 0.5
    ops = [("mul", p.a, p.b)] + [(op, None, c) for op, c in p.steps]
    wrong_step = None
    delta = 0
    if r.random() < p.error_rate:
        for _ in range(20):
            j = r.randrange(len(ops))
            later_divs = 1
            for op, _, c in ops[j + 1:]:
                if op == "div":
                    later_divs *= c
            d = later_divs * r.choice([1, 2, 3, 10, -1, -2, -10])
            x, ok = None, True
            for k, (op, a, c) in enumerate(ops):
                x = _apply(op, a if k == 0 else x, c) + (d if k == j else 0)
                if x <= 0:
                    ok = False
                    break
            if ok and d != 0:
                wrong_step, delta = j, d
                break
    lines = [["Let's solve this step by step.", f"We follow the number of {p.item} through each event.",
              "Let's work through the problem one event at a time."][style], ""]
    x = None
    for k, (op, a, c) in enumerate(ops):
        a_val = a if k == 0 else x
        x = _apply(op, a_val, c) + (delta if k == wrong_step else 0)
        lines.append(_step_line(p, k + 1, op, a_val, c, x, style, restate))
        lines.append("")
    lines.append(f"Therefore, the final answer is: $\\boxed{{{x}}}$.")
    return "\n".join(lines), (None if wrong_step is None else wrong_step + 1)


# --- the calculator oracle -------------------------------------------------------------------------
_EQ_RE = re.compile(r"\$(\d+) (\\times|\+|-|\\div) (\d+) = (-?\d+)\$")
_BOXED_RE = re.compile(r"\\boxed\{[^{}]*\}")


def calculator_fix(solution: str) -> tuple[str, int]:
    """Rewrite exactly the wrong step(s) and what depends on them; returns (text, lines changed)."""
    out, changed = [], 0
    prev_old = prev_new = None
    for line in solution.split("\n"):
        m = _EQ_RE.search(line)
        if not m:
            out.append(line)
            continue
        a, sym, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        a_new = prev_new if (prev_old is not None and a == prev_old) else a
        try:
            c_new = _apply(_SYM2OP[sym], a_new, b)
        except ArithmeticError:
            c_new = c
        if (a_new, c_new) != (a, c):
            new_eq = f"${a_new} {sym} {b} = {c_new}$"
            tail = line[m.end():]
            if c_new != c:
                tail = re.sub(rf"(?<![\d.]){c}(?![\d.])", str(c_new), tail)
            line = line[: m.start()] + new_eq + tail
            changed += 1
        prev_old, prev_new = c, c_new
        out.append(line)
    text = "\n".join(out)
    if prev_new is not None:
        boxes = list(_BOXED_RE.finditer(text))
        if boxes:
            last = boxes[-1]
            text = text[: last.start()] + f"\\boxed{{{prev_new}}}" + text[last.end():]
    return text, changed


def _rewrite_from_scratch(solution: str) -> str:
    """A correct but differently written solution (what a non-minimal Oracle does)."""
    fixed, _ = calculator_fix(solution)
    eqs = [m.group(0) for m in _EQ_RE.finditer(fixed)]
    ans = _BOXED_RE.findall(fixed)[-1] if _BOXED_RE.findall(fixed) else "\\boxed{?}"
    body = ["To solve this, we carry out the operations described in order, keeping a running total."]
    for i, eq in enumerate(eqs):
        body.append(f"Operation {i + 1} updates the running total: {eq}.")
    body.append("The running total after the last operation is what the question asks for.")
    return " ".join(body) + f"\n\nTherefore, the final answer is: ${ans}$."


@dataclass
class OracleFaults:
    """Deterministic (hash-seeded per request) Oracle misbehaviour rates, for demos."""
    rewrite: float = 0.0
    no_markers: float = 0.0
    wrong: float = 0.0


class OfflineEndpoint:
    """Answers OpenAI chat/completions request bodies: Oracle prompts with the calculator, everything
    else as the student (problems are looked up by their text)."""

    def __init__(self, problems: Optional[list] = None, faults: Optional[OracleFaults] = None,
                 start_marker: str = P.START_MARKER, end_marker: str = P.END_MARKER):
        self.faults = faults or OracleFaults()
        self.start_marker, self.end_marker = start_marker, end_marker
        self._by_text: dict[str, SynthProblem] = {}
        for p in problems or []:
            self.register(p)

    def register(self, p) -> None:
        if isinstance(p, dict):
            p = SynthProblem.from_dict(p["offline"] if "offline" in p else p)
        self._by_text[p.text()] = p
        self._by_text[p.prompt()] = p

    def oracle_answer(self, prompt_text: str) -> str:
        sol = P.extract_student_solution(prompt_text)
        if sol is None:
            return "I could not find the student's solution in the prompt."
        f = self.faults
        u = _rng("fault", prompt_text).random()
        if u < f.rewrite:
            body = _rewrite_from_scratch(sol)
        else:
            body, _ = calculator_fix(sol)
            if u < f.rewrite + f.wrong:  # the Oracle itself slips in the final answer
                boxes = list(_BOXED_RE.finditer(body))
                if boxes:
                    val = int(re.sub(r"\D", "", boxes[-1].group(0)) or 0) + 1
                    body = body[: boxes[-1].start()] + f"\\boxed{{{val}}}" + body[boxes[-1].end():]
        if f.rewrite + f.wrong <= u < f.rewrite + f.wrong + f.no_markers:
            return body
        return f"{self.start_marker}\n{body}\n{self.end_marker}"

    def student_answer(self, prompt_text: str, seed) -> str:
        p = self._by_text.get(prompt_text.strip())
        if p is None:
            for text, cand in self._by_text.items():
                if text in prompt_text:
                    p = cand
                    break
        if p is None:
            return "I do not know this problem.\n\nTherefore, the final answer is: $\\boxed{0}$."
        return student_solution(p, 0 if seed is None else int(seed))[0]

    def handle(self, path: str, payload: dict) -> tuple[int, dict]:
        if "messages" in payload:
            msgs = payload["messages"]
            text = "\n".join(m.get("content", "") for m in msgs if m.get("role") == "user"
                             and isinstance(m.get("content"), str))
        elif "prompt" in payload:
            text = payload["prompt"]
        else:
            return 400, {"error": {"message": "need messages or prompt"}}
        if P.SOLUTION_BEGIN in text:
            content = self.oracle_answer(text)
        else:
            content = self.student_answer(text, payload.get("seed"))
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(content.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if "messages" in payload:
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "finish_reason": "stop"}
            obj = "text_completion"
        return 200, {"id": "offline-" + hashlib.sha1(content.encode()).hexdigest()[:12], "object": obj,
                     "model": payload.get("model", ORACLE_MODEL), "choices": [choice], "usage": usage}


class OfflineTransport(httpx2.BaseTransport):
    """In-process httpx transport: the request never leaves the process, but ChatClient's whole code
    path (the openai SDK's serialisation, status handling and retries, budget, parsing, cache) runs as
    for HTTP."""

    def __init__(self, endpoint: Optional[OfflineEndpoint] = None):
        self.endpoint = endpoint or OfflineEndpoint()
        self.calls = 0

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        status, obj = self.endpoint.handle(request.url.path, json.loads(request.read().decode("utf-8")))
        return httpx2.Response(status, json=obj, request=request)


# --- files in the authors' form ----------------------------------------------------------------------
def write_problems_jsonl(path: str, num_problems: int, seed: int = 0) -> str:
    write_jsonl_atomic(path, (problem_record(p) for p in make_problems(num_problems, seed)))
    return path


def synth_errors(num_problems: int, seed: int = 0, samples: int = 1) -> list[dict]:
    """Wrong student solutions in the authors' errors.jsonl form (no server involved)."""
    out = []
    for p in make_problems(num_problems, seed):
        for k in range(samples):
            text, wrong = student_solution(p, seed * 1000003 + k)
            if wrong is None:
                continue
            out.append({"index": p.index, "sample": k, "prompt": p.prompt(), "ground_truth": str(p.answer),
                        "model_output": text, "extracted_answer": extract_boxed(text),
                        "data_source": DATA_SOURCE, "wrong_step": wrong})
    return out


def write_errors_jsonl(path: str, num_problems: int, seed: int = 0, samples: int = 1) -> str:
    write_jsonl_atomic(path, synth_errors(num_problems, seed, samples))
    return path


DEMO_FAULTS = OracleFaults(rewrite=0.06, no_markers=0.03, wrong=0.03)


def offline_client(model: str, endpoint: OfflineEndpoint, cfg: PipelineConfig) -> ChatClient:
    """A ChatClient whose requests the endpoint answers in-process (the pipeline cannot tell)."""
    return ChatClient(OFFLINE_BASE_URL, model, transport=OfflineTransport(endpoint), timeout=cfg.timeout,
                      max_retries=cfg.max_retries, max_requests=cfg.max_requests,
                      max_answer_bytes=cfg.max_answer_bytes)


def run_offline_demo(output_dir: str, num_problems: int = 256, seed: int = 0, samples: int = 2,
                     concurrency: int = 8, gamma: float = 0.6, progress: bool = False,
                     faults: Optional[OracleFaults] = None) -> str:
    """Run the whole pipeline offline: synthesize problems -> elicit (offline student, K=``samples``)
    -> Oracle (calculator, with a few deterministic faults so rejects are exercised) -> verify ->
    filter -> pairs.jsonl. Returns the path to pairs.jsonl; report.json, rejects.jsonl,
    eval.json and change_ratio_hist.png lie beside it."""
    os.makedirs(output_dir, exist_ok=True)
    problems = make_problems(num_problems, seed)
    problems_path = os.path.join(output_dir, "problems.jsonl")
    write_jsonl_atomic(problems_path, (problem_record(p) for p in problems))
    cfg = PipelineConfig(output_dir=output_dir, samples=samples, seed=seed, concurrency=concurrency, gamma=gamma,
                         progress=progress)
    student = offline_client(STUDENT_MODEL, OfflineEndpoint(problems), cfg)
    oracle = offline_client(ORACLE_MODEL, OfflineEndpoint(faults=faults or DEMO_FAULTS, start_marker=cfg.start_marker,
                                                          end_marker=cfg.end_marker), cfg)
    run_all(problems_path, cfg, model=student, oracle=oracle)
    return os.path.join(output_dir, "pairs.jsonl")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="examples/offline_oracle.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="offline end-to-end run (synthetic problems, offline student and Oracle)")
    demo.add_argument("--num-problems", type=int, default=256)
    demo.add_argument("--samples", type=int, default=2)
    synth = sub.add_parser("synth", help="write synthetic problems.jsonl and errors.jsonl (authors' form)")
    synth.add_argument("--num-problems", type=int, default=200)
    synth.add_argument("--samples", type=int, default=1, help="student samples per problem for errors.jsonl")
    for p in (demo, synth):
        p.add_argument("--output", required=True, metavar="DIR")
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "synth":
        os.makedirs(args.output, exist_ok=True)
        print(write_problems_jsonl(os.path.join(args.output, "problems.jsonl"), args.num_problems, args.seed))
        print(write_errors_jsonl(os.path.join(args.output, "errors.jsonl"), args.num_problems, args.seed,
                                 args.samples))
        return 0
    path = run_offline_demo(args.output, args.num_problems, args.seed, args.samples, progress=True)
    print_summary(PipelineConfig(output_dir=args.output))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
