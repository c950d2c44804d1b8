"""Elicitation with local transformers generation, on a tiny random Qwen3 (about 20 s on a CPU)."""
import json

import pytest

from examples.offline_oracle import write_problems_jsonl
from megatron_spot.rectify import jsonl
from megatron_spot.rectify.pipeline import PipelineConfig, elicit


@pytest.mark.slow
def test_local_generation_elicit_and_cache(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.tiny import build_local_chat_model

    d = build_local_chat_model(str(tmp_path / "tiny"))
    probs = write_problems_jsonl(str(tmp_path / "p.jsonl"), 3)
    cfg = PipelineConfig(output_dir=str(tmp_path / "out"), local_model=d, samples=2, max_tokens=6, seed=0,
                         progress=False, local_batch_size=4)
    st = elicit(probs, cfg)
    assert st["passed"] == 6 and st["errors"] == 6  # a random model is always wrong
    ev = json.load(open(tmp_path / "out" / "eval.json"))
    assert ev["by_data_source"]["offline-arith"]["accuracy"] == 0.0
    first = open(tmp_path / "out" / "samples.jsonl").read()
    elicit(probs, cfg)  # rerun: answered from the cache, identical
    assert open(tmp_path / "out" / "samples.jsonl").read() == first
    assert len(list(jsonl.read_jsonl(str(tmp_path / "out" / "errors.jsonl")))) == 6
