"""SIGKILL the CLI mid-run, rerun it: no request whose answer had been received is sent again."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

from examples.offline_oracle import synth_errors
from megatron_spot.rectify import jsonl
from megatron_spot.rectify.cache import request_key

from .conftest import SECRET, scan_for_secret

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(errors, out, url):
    return [sys.executable, os.path.join(ROOT, "tools", "rectify.py"), "rectify", "--input", errors,
            "--output", out, "--oracle-base-url", url, "--oracle-model", "oracle-k", "--concurrency", "2",
            "--no-progress"]


def test_sigkill_then_rerun_sends_no_finished_request_twice(tmp_path, fault_server):
    srv = fault_server(delay=0.03)
    errors = str(tmp_path / "errors.jsonl")
    items = synth_errors(90, seed=5)[:40]
    jsonl.write_jsonl_atomic(errors, items)
    out = str(tmp_path / "out")
    env = dict(os.environ, ORACLE_API_KEY=SECRET, PYTHONPATH=ROOT)

    proc = subprocess.Popen(_cli(errors, out, srv.url), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while sum(srv.ok.values()) < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 12 <= sum(srv.ok.values()) < 40, "the kill must land mid-run"
    assert not os.path.exists(os.path.join(out, "pairs.jsonl"))  # no half-written stage output

    # what the client had received and committed before dying
    db = sqlite3.connect(os.path.join(out, "cache.sqlite"))
    finished = {k for (k,) in db.execute("SELECT key FROM responses")}
    db.close()
    assert len(finished) >= 10

    def cache_key(payload):
        return request_key(kind="oracle", model="oracle-k", prompt_version="spot-ta-v1",
                           messages=payload["messages"], sampling={})

    before = dict(srv.requests)
    in_cache_before = {bid for bid, p in srv.payloads.items() if cache_key(p) in finished}
    assert len(in_cache_before) == len(finished)  # the key recipe is what the CLI used

    r = subprocess.run(_cli(errors, out, srv.url), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for bid in in_cache_before:
        assert srv.requests[bid] == before[bid] == 1, "a finished request was sent again"
    # at most the requests in flight at the kill (<= concurrency) were answered twice
    assert sum(srv.requests.values()) - len(srv.requests) <= 2
    assert len(srv.requests) == 40
    pairs = list(jsonl.read_jsonl(os.path.join(out, "pairs.jsonl")))
    assert len(pairs) == 40 and len({p["metadata"]["id"] for p in pairs}) == 40
    assert SECRET not in r.stdout + r.stderr
    assert scan_for_secret(str(tmp_path)) == []
