"""--local-model on IFEval, Connect4 and a math set at once (a tiny random Qwen3, about 10 s on a CPU): each
request keeps its own token cap even when benchmarks share a batch, Connect4 gets its system prompt, and
a rerun is answered from the cache."""
import json

import pytest

from megatron_spot.cli import evaluate as cli
from megatron_spot.rectify import evaluate as E
from megatron_spot.rectify.cache import RequestCache, request_key


@pytest.mark.slow
def test_local_model_mixed_caps_and_resume(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from tests.tiny import build_local_chat_model

    d = build_local_chat_model(str(tmp_path / "tiny"))
    bench = {
        "connect4": [{"state": "Current Game Board: (0,0):X", "answer": [[[0, 1]], []]}],
        "ifeval": [{"key": 1, "prompt": "Answer without commas.", "instruction_id_list": ["punctuation:no_comma"],
                    "kwargs": [{}]}],
        "aime24": [{"problem": "What is 2 + 2?", "answer": "4"}],
    }
    argv = ["--local-model", d, "--local-batch-size", "8", "--trials", "2", "--max-tokens", "12",
            "--max-tokens-for", "ifeval=2", "--thinking", "unset", "--output", str(tmp_path / "out"), "--quiet"]
    for name, rows in bench.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv += ["--benchmark", f"{name}={path}"]
    assert cli.main(argv) == 0
    doc = json.load(open(tmp_path / "out" / "results.json"))
    assert set(doc["benchmarks"]) == {"aime24", "connect4", "ifeval"} and doc["failed_requests"] == 0
    assert doc["sampling"]["max_tokens_for"] == {"ifeval": 2}

    cfg = E.EvalConfig(output_dir="unused", benchmarks={}, trials={}, max_tokens=12, max_tokens_for={"ifeval": 2},
                       thinking="unset")
    with RequestCache(str(tmp_path / "out" / "cache.sqlite")) as cache:
        for key in bench:
            problem = E.load_benchmark(str(tmp_path / f"{key}.jsonl"), key)[0]
            for t in range(2):
                body = E.request_body(cfg, key, problem, t)
                hit = cache.get(request_key(kind="eval", model="local:" + d, body=body, trial=t))
                assert hit is not None
                assert 1 <= hit["usage"]["completion_tokens"] <= (2 if key == "ifeval" else 12)
                assert hit["usage"]["prompt_tokens"] > (500 if key == "connect4" else 0)   # the rules came along
    samples = open(tmp_path / "out" / "samples.jsonl").read()
    capsys.readouterr()
    assert cli.main(argv) == 0   # everything from the cache: identical
    assert open(tmp_path / "out" / "samples.jsonl").read() == samples
