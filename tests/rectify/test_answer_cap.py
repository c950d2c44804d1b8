"""An Oracle cannot fill the disk (answers above max_answer_bytes are refused and counted), and a
rectify run in which every request failed exits non-zero."""
import json
import os

from examples.offline_oracle import OfflineEndpoint, synth_errors
from megatron_spot.cli.rectify import main
from megatron_spot.rectify import jsonl

from .loopback import LoopbackServer

HUGE_TAG = "[huge-answer]"
CAP = 64 * 1024


def _errors(tmp_path, n=6, huge_every=2):
    items = synth_errors(4 * n, seed=5)[:n]
    for i, e in enumerate(items):
        if i % huge_every == 0:
            e["prompt"] += " " + HUGE_TAG
    path = str(tmp_path / "errors.jsonl")
    jsonl.write_jsonl_atomic(path, items)
    return path, sum(1 for e in items if HUGE_TAG in e["prompt"]), len(items)


def _server(huge_bytes=3 * 2**20, always_500=False):
    endpoint = OfflineEndpoint()

    def respond(path, headers, payload, raw):
        if always_500:
            return 500, {}, b'{"error": {"message": "down"}}'
        status, obj = endpoint.handle(path, payload)
        if HUGE_TAG in json.dumps(payload):  # a runaway Oracle: megabytes of text inside valid markers
            content = obj["choices"][0]["message"]["content"]
            obj["choices"][0]["message"]["content"] = content.replace(
                "=== CORRECTED ENDED ===", "x" * huge_bytes + "\n=== CORRECTED ENDED ===")
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()

    return LoopbackServer(respond)


def _dir_bytes(root):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def _argv(errors, out, url, *extra):
    return ["rectify", "--input", errors, "--output", str(out), "--oracle-base-url", url, "--oracle-model", "o",
            "--max-retries", "0", "--no-progress", "--concurrency", "2", *extra]


def test_oversized_answers_are_refused_counted_and_never_written(tmp_path, serve, capsys):
    errors, n_huge, n = _errors(tmp_path)
    srv = serve(_server())
    out = tmp_path / "out"
    code = main(_argv(errors, out, srv.url, "--max-answer-bytes", str(CAP)))
    assert code == 0  # some requests succeeded
    stats = json.load(open(out / "stats.rectify.json"))
    assert stats["client"]["capped"] == n_huge >= 2
    assert stats["reasons"].get("oracle_answer_too_large") == n_huge
    assert stats["passed"] == n - n_huge  # the normal answers went through
    # each huge answer was 3 MiB: none of it reached the output folder (cache included)
    assert _dir_bytes(out) < 1 * 2**20, _dir_bytes(out)
    assert f"capped: {n_huge}" in capsys.readouterr().out


def test_every_request_failed_exits_1_with_one_line(tmp_path, serve, capsys):
    errors, _, n = _errors(tmp_path)
    srv = serve(_server(always_500=True))
    out = tmp_path / "out"
    code = main(_argv(errors, out, srv.url))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: rectify: all") and "http_500" in err[0], err
    rejects = [json.loads(line) for line in open(out / "rejects.rectify.jsonl")]
    assert len(rejects) == n and {r["reason"] for r in rejects} == {"oracle_http_500"}  # the reasons are kept
