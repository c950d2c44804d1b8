"""The whole rectify path (stages 2-5) against a loopback OpenAI-compatible server with faults."""
import json
import os

import pytest

from examples.offline_oracle import synth_errors
from megatron_spot.rectify import jsonl
from megatron_spot.rectify.client import ChatClient, FatalRequestError
from megatron_spot.rectify.pipeline import PipelineConfig, run_rectify

from .conftest import SECRET, scan_for_secret

# tag -> where the item must end: "pair" or the reject reason
EXPECTED = {
    "": "pair",
    "500x2": "pair",
    "429x1": "pair",
    "timeoutx1": "pair",
    "malformedx1": "pair",
    "dropx1": "pair",
    "500xinf": "oracle_http_500",
    "timeoutxinf": "oracle_timeout",
    "malformedxinf": "oracle_malformed_response",
    "400": "oracle_http_400",
    "nomarkers": "no_start_marker",
    "noend": "truncated",
    "wrong": "wrong_answer",
    "rewrite": "change_ratio_above_gamma",
}


def _errors(tmp_path):
    errs = synth_errors(40, seed=3)
    tags = list(EXPECTED)
    items = []
    for i, e in enumerate(errs[: 2 * len(tags)]):
        tag = tags[i % len(tags)]
        if tag:
            e["prompt"] += f" [fault:{tag}]"
        e["_tag"] = tag
        items.append(e)
    items.append({"index": "nofield", "prompt": "x", "ground_truth": "1"})          # missing model_output
    items.append(dict(items[0], sample=99))                                      # exact duplicate content
    path = str(tmp_path / "errors.jsonl")
    jsonl.write_jsonl_atomic(path, [{k: v for k, v in e.items() if k != "_tag"} for e in items])
    return path, items


def _cfg(out, url, **kw):
    base = dict(output_dir=str(out), oracle_base_url=url, oracle_model="oracle-x", concurrency=4,
                timeout=0.4, max_retries=3, progress=False)
    base.update(kw)
    return PipelineConfig(**base)


def test_every_input_ends_in_pairs_or_rejects(tmp_path, fault_server, monkeypatch):
    monkeypatch.setenv("ORACLE_API_KEY", SECRET)
    srv = fault_server(hang=0.8)
    path, items = _errors(tmp_path)
    out = tmp_path / "out"
    report = run_rectify(path, _cfg(out, srv.url))

    pairs = list(jsonl.read_jsonl(str(out / "pairs.jsonl")))
    rejects = list(jsonl.read_jsonl(str(out / "rejects.jsonl")))
    pair_ids = [p["metadata"]["id"] for p in pairs]
    reject_ids = [r["id"] for r in rejects]
    assert len(set(pair_ids)) == len(pair_ids) and len(set(reject_ids)) == len(reject_ids)
    assert not set(pair_ids) & set(reject_ids)
    assert len(pairs) + len(rejects) == len(items)
    assert report["accounting"]["balanced"]

    reason_of = {r["id"]: r["reason"] for r in rejects}
    for e in items[:-2]:
        iid = f"{e['index']}:{e['sample']}"
        want = EXPECTED[e["_tag"]]
        got = "pair" if iid in pair_ids else reason_of.get(iid)
        assert got == want, (e["_tag"], got)
    assert reason_of["nofield"] == "missing_field"
    assert sorted(reason_of.values()).count("duplicate") == 1

    # the packer's `rectify` preset reads exactly these; markers are stripped
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "metadata"}
        assert all(isinstance(p[k], str) for k in ("prompt", "chosen", "rejected"))
        assert "CORRECTED" not in p["chosen"]
        md = p["metadata"]
        for k in ("problem_id", "ground_truth", "rejected_answer", "chosen_answer", "change_ratio",
                  "oracle_model", "prompt_version", "data_source"):
            assert k in md
        assert md["chosen_answer"] == md["ground_truth"] and md["rejected_answer"] != md["ground_truth"]
        assert 0 <= md["change_ratio"] <= 0.6 and md["oracle_model"] == "oracle-x"
        assert md["prompt_version"] == "spot-ta-v1"

    # retries were exactly as many as the faults demanded (bodies identified by their messages)
    by_tag = {}
    for bid, payload in srv.payloads.items():
        text = payload["messages"][0]["content"]
        tag = next((t for t in EXPECTED if t and f"[fault:{t}]" in text), "")
        by_tag.setdefault(tag, []).append(srv.requests[bid])
    assert set(by_tag["500x2"]) == {3}
    assert set(by_tag["429x1"]) == {2}
    assert set(by_tag["malformedx1"]) == {2}
    assert set(by_tag["500xinf"]) == {4}  # 1 + max_retries
    assert set(by_tag[""]) == {1}

    # the key went to the server, and nowhere else
    assert srv.auth["Bearer " + SECRET] == sum(srv.requests.values())
    assert scan_for_secret(str(tmp_path)) == []
    rep = json.loads((out / "report.json").read_text())
    assert rep["usage"]["prompt_tokens"] > 0 and os.path.exists(rep["histogram_png"])

    # rerun: nothing that succeeded is sent again; only the failed requests are retried
    before = dict(srv.requests)
    run_rectify(path, _cfg(out, srv.url, timeout=0.2, max_retries=0))
    for bid, n in srv.requests.items():
        if srv.ok[bid]:
            assert n == before[bid], "a finished request was sent twice"
    pairs2 = list(jsonl.read_jsonl(str(out / "pairs.jsonl")))
    assert [p["metadata"]["id"] for p in pairs2] == pair_ids


def test_budget_then_resume(tmp_path, fault_server):
    srv = fault_server()
    path = str(tmp_path / "errors.jsonl")
    jsonl.write_jsonl_atomic(path, synth_errors(30, seed=1)[:10])
    out = tmp_path / "out"
    rep = run_rectify(path, _cfg(out, srv.url, max_requests=4, concurrency=2))
    assert rep["pairs"] == 4
    assert rep["rejects_by_stage_and_reason"]["rectify"] == {"budget_exhausted": 6}
    rep = run_rectify(path, _cfg(out, srv.url))
    assert rep["pairs"] == 10 and rep["rejects"] == 0
    assert sum(srv.requests.values()) == 10 and set(srv.requests.values()) == {1}
    assert rep["stages"]["rectify"]["client"]["cache_hits"] == 4


def test_with_ground_truth_is_a_different_request(tmp_path, fault_server):
    srv = fault_server()
    path = str(tmp_path / "errors.jsonl")
    jsonl.write_jsonl_atomic(path, synth_errors(10, seed=2)[:3])
    run_rectify(path, _cfg(tmp_path / "a", srv.url, cache_path=str(tmp_path / "c.sqlite")))
    rep = run_rectify(path, _cfg(tmp_path / "b", srv.url, cache_path=str(tmp_path / "c.sqlite"),
                                 with_ground_truth=True))
    assert sum(srv.requests.values()) == 6  # same cache, different key
    pairs = list(jsonl.read_jsonl(str(tmp_path / "b" / "pairs.jsonl")))
    assert {p["metadata"]["prompt_version"] for p in pairs} == {"spot-ta-v1+gt"}
    assert rep["pairs"] == 3


def test_auth_failure_is_fatal(tmp_path, fault_server):
    srv = fault_server(status_override=401)
    path = str(tmp_path / "errors.jsonl")
    jsonl.write_jsonl_atomic(path, synth_errors(10, seed=2)[:3])
    with pytest.raises(FatalRequestError):
        run_rectify(path, _cfg(tmp_path / "o", srv.url))


def test_retry_after_is_honoured_and_backoff_grows():
    """The SDK's retry timing as we configure it: the server's Retry-After replaces the first backoff
    (0.5 s at most), the next backoff doubles (1 s minus <= 25 % jitter); every attempt is counted."""
    import time

    import httpx2

    script = [(429, {"retry-after": "1.2"}), (503, {}), (200, {})]
    sent_at = []

    def answer(request):
        sent_at.append(time.monotonic())
        status, headers = script.pop(0)
        body = {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]} if status == 200 else {}
        return httpx2.Response(status, headers=headers, json=body)

    c = ChatClient("http://127.0.0.1:9/v1", "m", transport=httpx2.MockTransport(answer), max_retries=5)
    r = c.request({"messages": []})
    assert r.ok and r.content == "ok" and r.attempts == 3
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:])]
    assert gaps[0] >= 1.2, gaps                 # Retry-After, not the SDK's first 0.5 s
    assert 0.74 <= gaps[1] < 2.0, gaps          # second backoff: 1 s * (1 - <= 25 % jitter)
    assert c.stats.retries == 2 and c.stats.http_requests == 3
    assert c.stats.attempt_errors == {"http_429": 1, "http_503": 1}
    assert "m" in repr(c) and "Bearer" not in repr(c)
