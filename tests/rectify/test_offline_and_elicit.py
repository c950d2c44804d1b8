import json
import os
import subprocess
import sys

from examples import offline_oracle
from examples.offline_oracle import (OfflineEndpoint, calculator_fix, make_problems, problem_record,
                                     run_offline_demo, student_solution, synth_errors)
from megatron_spot.cli.rectify import main
from megatron_spot.rectify import jsonl
from megatron_spot.rectify.grading import answers_match, extract_boxed
from megatron_spot.rectify.pipeline import PipelineConfig, elicit

from .conftest import SECRET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_calculator_oracle_fixes_exactly_the_wrong_step_and_its_dependents():
    checked = 0
    for p in make_problems(60, seed=11):
        for s in range(3):
            text, wrong = student_solution(p, s)
            fixed, changed = calculator_fix(text)
            assert answers_match(extract_boxed(fixed), str(p.answer))
            old, new = text.split("\n"), fixed.split("\n")
            assert len(old) == len(new)
            diff = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
            if wrong is None:
                assert fixed == text and changed == 0
                continue
            checked += 1
            steps = [i for i, l in enumerate(old) if "$" in l and "=" in l]
            # the wrong step, every later step (they build on it) and the final line; nothing before
            assert diff == steps[wrong - 1:] + [len(old) - 1]
            assert changed == len(steps) - wrong + 1
    assert checked > 30


def test_synth_errors_are_in_the_authors_form_and_wrong():
    errs = synth_errors(30, seed=4, samples=2)
    assert errs
    for e in errs:
        assert {"index", "prompt", "ground_truth", "model_output", "extracted_answer", "data_source"} <= set(e)
        assert not answers_match(e["extracted_answer"], e["ground_truth"])


def test_offline_demo_end_to_end(tmp_path):
    import time

    t = time.time()
    path = run_offline_demo(str(tmp_path / "demo"), num_problems=80, seed=0)
    dt = time.time() - t
    rep = json.load(open(tmp_path / "demo" / "report.json"))
    assert rep["accounting"]["balanced"]
    pairs = list(jsonl.read_jsonl(path))
    assert len(pairs) >= 60 and rep["pairs"] == len(pairs)
    # the demo's deterministic Oracle faults show up as rejects with reasons
    reasons = {r for d in rep["rejects_by_stage_and_reason"].values() for r in d}
    assert {"no_start_marker", "wrong_answer", "change_ratio_above_gamma"} <= reasons
    for f in ("rejects.jsonl", "eval.json", "change_ratio_hist.png", "errors.jsonl", "samples.jsonl"):
        assert os.path.exists(tmp_path / "demo" / f)
    assert dt < 20
    # rerun in place: everything is answered from the cache, identical output
    before = open(path).read()
    run_offline_demo(str(tmp_path / "demo"), num_problems=80, seed=0)
    rep2 = json.load(open(tmp_path / "demo" / "report.json"))
    assert rep2["usage"]["http_requests"] == 0
    assert open(path).read() == before


def test_elicit_over_http_reports_accuracy_and_caches(tmp_path, fault_server, monkeypatch):
    # an Oracle key in the environment must not reach the model server (the SDK would send OPENAI_API_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    problems = make_problems(25, seed=9)
    srv = fault_server(endpoint=OfflineEndpoint(problems))
    inp = str(tmp_path / "problems.jsonl")
    jsonl.write_jsonl_atomic(inp, [problem_record(p) for p in problems])
    cfg = PipelineConfig(output_dir=str(tmp_path / "ev"), model_base_url=srv.url, model_name="student",
                         samples=3, seed=100, concurrency=4, progress=False)
    elicit(inp, cfg)
    ev = json.load(open(tmp_path / "ev" / "eval.json"))
    # expected accuracy straight from the generator (the student is deterministic per seed)
    exp = sum(student_solution(p, 100 + k)[1] is None for p in problems for k in range(3)) / 75
    assert abs(ev["by_data_source"]["offline-arith"]["accuracy"] - exp) < 1e-9
    errors = list(jsonl.read_jsonl(str(tmp_path / "ev" / "errors.jsonl")))
    assert len(errors) == round((1 - exp) * 75)
    payload = next(iter(srv.payloads.values()))
    assert payload["temperature"] == 0.7 and payload["top_p"] == 0.8
    assert payload["chat_template_kwargs"] == {"enable_thinking": False}
    n = sum(srv.requests.values())
    assert n == 75
    assert dict(srv.auth) == {"": 75}   # no MODEL_API_KEY: no Authorization header at all
    elicit(inp, cfg)  # rerun: all cached
    assert sum(srv.requests.values()) == n


def test_cli_help_and_run_over_http(tmp_path, capsys, fault_server):
    # the shim in tools/ runs without any sys.path edit (the package is installed)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "rectify.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for word in ("elicit", "rectify", "verify", "filter", "run", "ORACLE_API_KEY", "resum"):
        assert word in r.stdout
    out = str(tmp_path / "cli")
    assert offline_oracle.main(["synth", "--output", out, "--num-problems", "30"]) == 0
    problems = os.path.join(out, "problems.jsonl")
    # one loopback server plays both the student (elicit) and the calculator Oracle (rectify)
    srv = fault_server(endpoint=OfflineEndpoint(list(jsonl.read_jsonl(problems))))
    assert main(["run", "--input", problems, "--output", out, "--model-base-url", srv.url, "--model-name", "student",
                 "--oracle-base-url", srv.url, "--oracle-model", "oracle", "--samples", "2", "--seed", "0",
                 "--no-progress"]) == 0
    assert "pairs:" in capsys.readouterr().out
    # stages runnable alone on the files the previous ones wrote
    assert main(["verify", "--output", out, "--no-progress"]) == 0
    assert main(["filter", "--output", out, "--no-progress", "--gamma", "0.05"]) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["accounting"]["balanced"] and rep["pairs"] > 0
    assert rep["stages"]["filter"]["gamma"] == 0.05
    assert rep["rejects_by_stage_and_reason"]["filter"]["change_ratio_above_gamma"] > 0
    # a missing oracle URL is a usage error, not a traceback
    assert main(["rectify", "--input", os.path.join(out, "errors.jsonl"), "--output", out, "--no-progress"]) == 2
