"""One exit-code convention for spot-rectify and spot-evaluate (README, "Exit codes"): 0 ok, 1 failure,
2 bad input (an endpoint refusing the key/URL/model included), 130 interrupted. 0 and the other
failure paths are covered beside the features (test_answer_cap, test_offline_and_elicit, test_evaluate)."""
import json

from examples.offline_oracle import synth_errors
from megatron_spot.cli import evaluate as evaluate_cli
from megatron_spot.cli import rectify as rectify_cli
from megatron_spot.rectify import evaluate as E
from megatron_spot.rectify import jsonl, pipeline

from .test_evaluate import AIME, PlantedServer, write


def _errors(tmp_path):
    path = str(tmp_path / "errors.jsonl")
    jsonl.write_jsonl_atomic(path, synth_errors(12, seed=2)[:3])
    return path


def _rectify_argv(errors, out, url):
    return ["rectify", "--input", errors, "--output", str(out), "--oracle-base-url", url, "--oracle-model", "o",
            "--no-progress"]


def test_refused_endpoint_is_bad_input_with_one_line(tmp_path, fault_server, capsys):
    srv = fault_server(status_override=401)
    assert rectify_cli.main(_rectify_argv(_errors(tmp_path), tmp_path / "o", srv.url)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 401" in err[0], err
    bench = write(tmp_path / "aime24.jsonl", AIME[:1])
    assert evaluate_cli.main(["--benchmark", f"aime24={bench}", "--model-base-url", srv.url, "--model-name", "m",
                              "--trials", "1", "--output", str(tmp_path / "e"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 401" in err[0], err


def test_failed_requests_exit_1(tmp_path, serve):
    srv = serve(PlantedServer())
    bench = write(tmp_path / "aime24.jsonl", AIME[:1])
    # a budget of one request for two trials: one answer comes back, one request fails
    code = evaluate_cli.main(["--benchmark", f"aime24={bench}", "--model-base-url", srv.server.url,
                              "--model-name", "m", "--trials", "2", "--max-requests", "1", "--concurrency", "1",
                              "--output", str(tmp_path / "e"), "--quiet"])
    assert code == 1
    assert json.load(open(tmp_path / "e" / "results.json"))["failed_requests"] == 1


def test_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_rectify", interrupted)
    assert rectify_cli.main(_rectify_argv(_errors(tmp_path), tmp_path / "o", "http://127.0.0.1:9/v1")) == 130
    monkeypatch.setattr(E, "evaluate", interrupted)
    bench = write(tmp_path / "aime24.jsonl", AIME[:1])
    assert evaluate_cli.main(["--benchmark", f"aime24={bench}", "--model-base-url", "http://127.0.0.1:9/v1",
                              "--model-name", "m", "--trials", "1", "--output", str(tmp_path / "e"), "--quiet"]) == 130
    assert "rerun" in capsys.readouterr().err


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_empty_and_wrongly_typed_inputs_are_bad_input(tmp_path, capsys):
    """A user's input with no records, or with none holding the fields the stage reads (a problems file
    given to filter, numbers where text belongs), is exit 2 with one line naming the file, before any
    request (the endpoints here accept no connection) and without an output folder left behind."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    typed = str(tmp_path / "typed.jsonl")
    jsonl.write_jsonl_atomic(typed, [{"prompt": 1, "ground_truth": 2, "model_output": None}])
    url = "http://127.0.0.1:9/v1"
    cases = [
        (["filter", "--input", str(empty)], "empty.jsonl: no records"),
        (["filter", "--input", typed], "none of its 1 records has the fields filter reads (prompt, corrected"),
        (["verify", "--input", typed], "none of its 1 records has the fields verify reads (corrected, ground_truth)"),
        (["rectify", "--input", str(empty), "--oracle-base-url", url, "--oracle-model", "o"], "no records"),
        (["rectify", "--input", typed, "--oracle-base-url", url, "--oracle-model", "o"],
         "none of its 1 records has the fields rectify reads"),
        (["elicit", "--input", typed, "--model-base-url", url, "--model-name", "m"],
         "none of its 1 records has the fields elicit reads"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        assert rectify_cli.main([*argv, "--output", str(out), "--no-progress"]) == 2, argv
        assert message in _one_error_line(capsys), argv
        assert not out.exists(), argv


def test_unloadable_tokenizer_or_local_model_is_one_line_before_any_request(tmp_path, capsys):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    errors = _errors(tmp_path)
    argv = _rectify_argv(errors, tmp_path / "o", "http://127.0.0.1:9/v1") + ["--tokenizer", str(not_a_model)]
    assert rectify_cli.main(argv) == 2
    assert f"--tokenizer {not_a_model}: cannot load a Hugging Face tokenizer" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()
    bench = write(tmp_path / "aime24.jsonl", AIME[:1])
    assert evaluate_cli.main(["--benchmark", f"aime24={bench}", "--local-model", str(not_a_model), "--trials", "1",
                              "--output", str(tmp_path / "e"), "--quiet"]) == 2
    assert f"--local-model {not_a_model}: cannot load it with transformers" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # no empty cache.sqlite left behind
