"""The paper's nine benchmarks end to end (spot-evaluate on a loopback OpenAI-compatible server whose answers
are planted per benchmark, problem and trial): per-benchmark accuracy, IFEval's and Connect4's
sub-metrics, the paper's four columns, the before/after table, resume from the cache, and bad rows.
Every expected number is worked out by hand below from the plan, not by the code under test."""
import json
import re
import statistics
import threading

import pytest

from megatron_spot.cli import evaluate as cli

from .loopback import LoopbackServer, chat_reply

END = "Any other questions?"
C4_RIGHT = {   # board -> the exact right answer
    "c0": "[Intermediate Thinking Results 1: (0,3)]\n[Intermediate Thinking Results 2: None]",
    "c1": "[Intermediate Thinking Results 1: (0,2)]\n[Intermediate Thinking Results 2: (3,6)]",
}


def math_rows(bench, n=2):
    return [{"id": f"{bench}{j}", "problem": f"[q:{bench}-{j}] What is {j} + 10?", "answer": str(10 + j)}
            for j in range(n)]


def files(d):
    """The nine benchmark files, named as --benchmarks-dir expects (the authors' Connect4 file name too)."""
    def write(name, rows, blank_line_at=None):
        with open(d / name, "w") as f:
            for i, r in enumerate(rows):
                if i == blank_line_at:
                    f.write("\n")
                f.write(json.dumps(r) + "\n")

    for b in ("aime24", "aime25", "amc23", "minerva", "olympiadbench"):
        write(f"{b}.jsonl", math_rows(b))
    write("MATH-500.jsonl", math_rows("math500"))
    write("gpqa_diamond.jsonl", [{"Record ID": f"g{j}", "Question": f"[q:gpqa-{j}] Which is option {j}?",
                                  "Correct Answer": f"right{j}", "Incorrect Answer 1": f"wrong{j}a",
                                  "Incorrect Answer 2": f"wrong{j}b", "Incorrect Answer 3": f"wrong{j}c"}
                                 for j in range(2)])
    write("connect4_eval_500.jsonl", [
        {"state": "[q:connect4-0] board one", "answer": [[[0, 3]], []]},
        {"state": "[q:connect4-1] board two", "answer": [[[0, 2]], [[3, 6]]]}])
    write("ifeval.jsonl", [
        {"key": 1, "prompt": "[q:ifeval-0] Answer without commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"key": 2, "prompt": f"[q:ifeval-1] No commas; end with '{END}'.",
         "instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
         "kwargs": [{}, {"end_phrase": END}]}])
    return str(d)


class PlantedNine:
    """The plan (mean over trials, by hand):
    aime24 p0 right, p1 wrong: 0.5 | aime25 all wrong: 0 | amc23 all right: 1 | MATH-500 p0 right: 0.5 |
    minerva all right: 1 | olympiadbench p1 always, p0 on even trials: [1, .5, 1, .5, 1] -> 0.8 |
    GPQA p0 right: 0.5 | Connect4 c0 exact (1, 1), c1 'None' + right opponent move (0, 1): acc1 0.5,
    acc2 1, accuracy 0.75 | IFEval i0 no comma (followed); i1 'Done, ok. <END>\\nBye.': strict no_comma
    and end_checker both fail, loose passes both (without line 1 there is no comma, without the last
    line it ends with <END>): prompt strict 1/2, instruction strict 1/3, prompt and instruction loose 1.
    ``tuned``: every answer right."""

    def __init__(self, tuned=False):
        self.tuned = tuned
        self.lock = threading.Lock()
        self.payloads = []
        self.server = LoopbackServer(self.respond)

    def right(self, bench, j, t):
        if self.tuned:
            return True
        return {"aime24": j == 0, "aime25": False, "amc23": True, "math500": j == 0, "minerva": True,
                "olympiadbench": j == 1 or t % 2 == 0, "gpqa": j == 0, "connect4": j == 0, "ifeval": j == 0}[bench]

    def respond(self, path, headers, payload, raw):
        text = payload["messages"][-1]["content"]
        bench, j = re.search(r"\[q:(\w+)-(\d)\]", text).groups()
        j, t = int(j), payload["seed"]
        with self.lock:
            self.payloads.append(payload)
        ok = self.right(bench, j, t)
        if bench == "gpqa":
            letter = re.search(rf"^([A-D])\. {'right' if ok else 'wrong'}{j}", text, re.MULTILINE).group(1)
            content = f"The answer is \\boxed{{{letter}}}."
        elif bench == "connect4":
            content = C4_RIGHT[f"c{j}"] if ok else (
                "[Intermediate Thinking Results 1: None]\n[Intermediate Thinking Results 2: (3,6)]")
        elif bench == "ifeval":
            content = ("No commas here." if j == 0 else f"Done. {END}") if ok else f"Done, ok. {END}\nBye."
        else:
            content = f"So \\boxed{{{10 + j if ok else 999}}}."
        return chat_reply(content)


@pytest.fixture
def nine(serve):
    return lambda **kw: serve(PlantedNine(**kw))


def test_the_paper_table_from_planted_runs(tmp_path, nine, capsys):
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    files(bench_dir)
    base, tuned = nine(), nine(tuned=True)

    def run(srv, name):
        return ["--benchmarks-dir", str(bench_dir), "--model-base-url", srv.server.url, "--model-name", name,
                "--output", str(tmp_path / name), "--quiet"]

    assert cli.main(run(base, "base")) == 0
    doc = json.load(open(tmp_path / "base" / "results.json"))
    b = doc["benchmarks"]
    assert {k: v["trials"] for k, v in b.items()} == {
        "aime24": 16, "aime25": 16, "amc23": 16, "math500": 5, "minerva": 5, "olympiadbench": 5,
        "gpqadiamond": 5, "connect4": 5, "ifeval": 5}
    means = {k: v["mean"] for k, v in b.items()}
    assert means == pytest.approx({"aime24": 0.5, "aime25": 0.0, "amc23": 1.0, "math500": 0.5, "minerva": 1.0,
                                   "olympiadbench": 0.8, "gpqadiamond": 0.5, "connect4": 0.75, "ifeval": 0.5})
    assert b["olympiadbench"]["std"] == pytest.approx(statistics.pstdev([1, .5, 1, .5, 1]))
    c4, ife = b["connect4"]["metrics"], b["ifeval"]["metrics"]
    assert (c4["acc1"]["mean"], c4["acc2"]["mean"], c4["format_error"]["mean"]) == pytest.approx((0.5, 1.0, 0.0))
    assert {k: v["mean"] for k, v in ife.items()} == pytest.approx(
        {"prompt_level_strict": 1 / 2, "inst_level_strict": 1 / 3, "prompt_level_loose": 1.0, "inst_level_loose": 1.0})
    table = doc["table"]
    assert table["in_domain"]["mean"] == pytest.approx((0.5 + 0 + 1 + 0.5 + 1 + 0.8) / 6)
    assert table["ood"]["mean"] == pytest.approx((0.5 + 0.75) / 2)
    assert table["ifeval"]["mean"] == pytest.approx(0.5)
    assert table["overall"]["mean"] == pytest.approx((3.8 + 0.5 + 0.75 + 0.5) / 9) == doc["average"]
    assert all(g["complete"] for g in table.values())
    # the paper's sampling; IFEval capped at 8,192 new tokens; Connect4 under its system prompt
    assert len(base.payloads) == 3 * 2 * 16 + 6 * 2 * 5
    for p in base.payloads:
        bench = re.search(r"\[q:(\w+)-", p["messages"][-1]["content"]).group(1)
        assert (p["temperature"], p["top_p"]) == (0.7, 0.8)
        assert p["max_tokens"] == (8192 if bench == "ifeval" else 32768)
        assert p["chat_template_kwargs"] == {"enable_thinking": False}
        roles = [m["role"] for m in p["messages"]]
        assert roles == (["system", "user"] if bench == "connect4" else ["user"])
        if bench == "connect4":
            assert "[Intermediate Thinking Results 1: None]" in p["messages"][0]["content"]
    out = capsys.readouterr().out
    assert re.search(r"^base\s+63\.3\s+62\.5\s+50\.0\s+61\.7$", out, re.MULTILINE), out

    # an interrupted or repeated run resumes from the cache: nothing is sent again
    sent = len(base.payloads)
    assert cli.main(run(base, "base")) == 0
    assert len(base.payloads) == sent and json.load(open(tmp_path / "base" / "results.json"))["benchmarks"] == b

    assert cli.main(run(tuned, "tuned")) == 0
    capsys.readouterr()
    png = tmp_path / "cmp.png"
    assert cli.main(["--compare", str(tmp_path / "base/results.json"), str(tmp_path / "tuned/results.json"),
                     "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[head].split() == ["model", "In-domain", "Avg", "OOD", "Avg", "IFEval", "Overall", "Avg"]
    assert lines[head + 1].split() == ["base", "63.3", "62.5", "50.0", "61.7"]
    assert lines[head + 2].split() == ["tuned", "100.0", "(+36.7)", "100.0", "(+37.5)", "100.0", "(+50.0)",
                                       "100.0", "(+38.3)"]
    row = next(line for line in lines if line.startswith("  acc1"))
    assert row.split() == ["acc1", "50.0", "+-", "0.0", "100.0", "+-", "0.0", "+50.0"]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_named_benchmarks_partial_table_and_bad_rows(tmp_path, nine, capsys):
    d = tmp_path / "b"
    d.mkdir()
    files(d)
    srv = nine()
    common = ["--model-base-url", srv.server.url, "--model-name", "m", "--trials", "2", "--quiet"]
    argv = ["--benchmark", f"ifeval={d / 'ifeval.jsonl'}", "--benchmark", f"connect4={d / 'connect4_eval_500.jsonl'}",
            "--benchmark", f"gpqa={d / 'gpqa_diamond.jsonl'}", "--output", str(tmp_path / "o")] + common
    assert cli.main(argv) == 0
    doc = json.load(open(tmp_path / "o" / "results.json"))
    assert set(doc["benchmarks"]) == {"ifeval", "connect4", "gpqadiamond"}
    assert doc["table"]["in_domain"] == {"name": "In-domain Avg", "mean": None, "benchmarks": [], "complete": False}
    assert doc["table"]["ood"]["mean"] == pytest.approx(0.625) and doc["table"]["ood"]["complete"]
    assert doc["table"]["overall"]["mean"] == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    out = capsys.readouterr().out
    assert re.search(r"^m\s+n/a\s+62\.5\s+50\.0\s+58\.3\*$", out, re.MULTILINE), out
    assert "* averaged over the benchmarks present only: Overall Avg over GPQA-Diamond, Connect4, IFEval" in out

    # bad rows: named by file and line (blank lines counted), exit code 2, nothing sampled
    bad_c4 = tmp_path / "connect4.jsonl"
    bad_c4.write_text(json.dumps({"state": "s", "answer": [[], []]}) + "\n\n"
                      + json.dumps({"state": "s", "answer": [[[6, 0]], []]}) + "\n")
    bad_if = tmp_path / "ifeval.jsonl"
    bad_if.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["nope:nope"],
                                  "kwargs": [{}]}) + "\n")
    sent = len(srv.payloads)
    assert cli.main(["--benchmark", f"connect4={bad_c4}", "--output", str(tmp_path / "x")] + common) == 2
    assert f"{bad_c4}:3: 'answer' move [6, 0] is not [row 0-5, col 0-6]" in capsys.readouterr().err
    assert cli.main(["--benchmark", f"ifeval={bad_if}", "--output", str(tmp_path / "x")] + common) == 2
    assert f"{bad_if}:1: unknown instruction id 'nope:nope'" in capsys.readouterr().err
    assert cli.main(argv[:-len(common)] + common + ["--max-tokens-for", "aime24=5"]) == 2
    assert "--max-tokens-for aime24=5: aime24 is not a benchmark of this run" in capsys.readouterr().err
    assert len(srv.payloads) == sent


def test_parquet_sets_load_as_jsonl(tmp_path):
    """IFEval and Connect4 as Parquet (the hub's form: kwargs a struct with every key, unused ones null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_spot.rectify import evaluate as E

    kwargs_type = pa.list_(pa.struct([("end_phrase", pa.string()), ("num_bullets", pa.int64())]))
    pq.write_table(pa.table({"key": [1], "prompt": ["p"],
                             "instruction_id_list": [["startend:end_checker", "detectable_format:number_bullet_lists"]],
                             "kwargs": pa.array([[{"end_phrase": "Bye.", "num_bullets": None},
                                                  {"end_phrase": None, "num_bullets": 2}]], type=kwargs_type)}),
                   tmp_path / "ifeval.parquet")
    (item,) = E.load_benchmark(str(tmp_path / "ifeval.parquet"), "ifeval")
    g = E.grade(item, "* a\n* b\nBye.")
    assert g.score == 1.0 and g.counts["inst_level_strict"] == (2, 2)
    pq.write_table(pa.table({"state": ["s", "t"], "answer": [[[[0, 3]], []], [[[0, 9]], []]]}),
                   tmp_path / "connect4.parquet")
    with pytest.raises(E.EvalInputError, match=r"connect4.parquet: row 2: 'answer' move \[0, 9\]"):
        E.load_benchmark(str(tmp_path / "connect4.parquet"), "connect4")
