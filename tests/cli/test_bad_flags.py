"""Every tool, in-process through its main(argv): a number out of range, an output path that cannot be
written, or a device this machine lacks ends in one error line naming the flag, exit 2 (BAD_INPUT), before
any work starts (the work functions are replaced by ones that fail the test) and with nothing left behind."""
import os

import pytest

from megatron_spot.cli import BAD_INPUT
from megatron_spot.cli import (convert_checkpoint, evaluate, export_quantized, gpu_check, pack_pairs, profile_throughput,
                               rectify)


def _run(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse, and profile_throughput's fail()
        return exc.code


def _error_line(capsys):
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith(("usage:", " "))]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def no_work(monkeypatch):
    """The tools' work functions, replaced by ones that fail the test: every refusal comes first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the bad flag was refused")

    from megatron_spot.checkpoint import hf_convert
    from megatron_spot.cli import gpu_check as gpu_check_cli
    from megatron_spot.profiling import runner
    from megatron_spot.quantization import export
    from megatron_spot.rectify import evaluate as rectify_evaluate
    from megatron_spot.rectify import pipeline

    import megatron_spot.data as data
    import megatron_spot.quantization as quantization

    for mod, names in ((data, ["pack_pairs"]), (runner, ["run_profile"]),
                       (hf_convert, ["convert_hf_to_mcore", "convert_mcore_to_hf", "load_model_checkpoint"]),
                       (pipeline, ["elicit", "rectify", "run_rectify", "verify", "filter_pairs", "run_all"]),
                       (rectify_evaluate, ["evaluate", "load_results"]),
                       (quantization, ["calibration_prompts", "quantize_and_export"]),
                       (export, ["calibration_prompts", "quantize_and_export"]),
                       (gpu_check_cli, ["orchestrate"])):
        for name in names:
            monkeypatch.setattr(mod, name, forbidden)


NET = ["--output", "OUT", "--oracle-base-url", "http://127.0.0.1:9/v1", "--oracle-model", "o", "--no-progress"]
EVAL = ["--benchmark", "aime24=b.jsonl", "--model-base-url", "http://127.0.0.1:9/v1", "--model-name", "m",
        "--output", "OUT", "--quiet"]
PACK = ["-i", "in.jsonl", "-t", "tok", "-o", "OUT/pairs", "-q"]
EXPORT = ["--checkpoint", "ck", "--pack", "p", "--out", "OUT/q"]

NUMBERS = [  # (tool, argv, flag): argparse refuses the value while parsing
    (rectify, ["filter", "--input", "v.jsonl", "--output", "OUT", "--gamma", "0"], "--gamma"),
    (rectify, ["filter", "--input", "v.jsonl", "--output", "OUT", "--gamma", "-0.5"], "--gamma"),
    (rectify, ["rectify", "--input", "e.jsonl", *NET, "--concurrency", "0"], "--concurrency"),
    (rectify, ["rectify", "--input", "e.jsonl", *NET, "--timeout", "-1"], "--timeout"),
    (rectify, ["rectify", "--input", "e.jsonl", *NET, "--timeout", "nan"], "--timeout"),
    (rectify, ["elicit", "--input", "p.jsonl", "--output", "OUT", "--samples", "0"], "--samples"),
    (rectify, ["elicit", "--input", "p.jsonl", "--output", "OUT", "--max-tokens", "-5"], "--max-tokens"),
    (evaluate, [*EVAL, "--concurrency", "-2"], "--concurrency"),
    (evaluate, [*EVAL, "--timeout", "0"], "--timeout"),
    (evaluate, [*EVAL, "--max-tokens", "0"], "--max-tokens"),
    (evaluate, [*EVAL, "--top-p", "1.5"], "--top-p"),
    (evaluate, [*EVAL, "--trials", "0"], "--trials"),
    (pack_pairs, [*PACK, "--max-length", "-1"], "--max-length"),
    (pack_pairs, [*PACK, "--workers", "0"], "--workers"),
    (pack_pairs, [*PACK, "--chunk-size", "0"], "--chunk-size"),
    (profile_throughput, ["--steps", "0"], "--steps"),
    (profile_throughput, ["--seq-length", "-128"], "--seq-length"),
    (profile_throughput, ["--micro-batch-size", "0"], "--micro-batch-size"),
    (profile_throughput, ["--tp", "0"], "--tp"),
    (profile_throughput, ["--trace-steps", "2:2"], "--trace-steps"),
    (profile_throughput, ["--trace-steps", "3:1"], "--trace-steps"),
    (profile_throughput, ["--sweep", "1x1", "--sweep-mbs", "1,0"], "--sweep-mbs"),
    (profile_throughput, ["--assumed-mfu", "0"], "--assumed-mfu"),
    (convert_checkpoint, ["mcore-to-hf", "--ckpt", "c", "--out", "OUT/hf", "--max-shard-size", "0"], "--max-shard-size"),
    (convert_checkpoint, ["mcore-to-hf", "--ckpt", "c", "--out", "OUT/hf", "--max-shard-size=-5GB"],
     "--max-shard-size"),
    (export_quantized, [*EXPORT, "--num-prompts", "0"], "--num-prompts"),
    (export_quantized, [*EXPORT, "--batch-size", "-1"], "--batch-size"),
    (gpu_check, ["--out", "OUT", "--dry-run", "--budget-s", "0"], "--budget-s"),
]


def _argv(argv, out):
    return [a.replace("OUT", out) for a in argv]


@pytest.mark.parametrize("tool,argv,flag", NUMBERS, ids=[f"{t.__name__.split('.')[-1]}{f}{a[-1].split('=')[-1]}" for t, a, f in NUMBERS])
def test_numbers_out_of_range_are_refused_at_parse_time(tool, argv, flag, tmp_path, capsys, no_work):
    out = str(tmp_path / "out")
    assert _run(tool.main, _argv(argv, out)) == BAD_INPUT
    line = _error_line(capsys)
    assert f"argument {flag}" in line and "must be" in line, line
    assert os.listdir(tmp_path) == []


def test_profile_sweep_with_predict_only_is_refused_not_ignored(tmp_path, capsys, no_work):
    out = str(tmp_path / "sweep")
    argv = ["--predict-only", "--gpu", "H100", "--sweep", "1x1,2x1", "--out-dir", out]
    assert _run(profile_throughput.main, argv) == BAD_INPUT
    assert "--sweep measures each layout under torchrun and --predict-only predicts one layout" in _error_line(capsys)
    assert os.listdir(tmp_path) == []


def test_profile_trace_steps_past_the_measured_steps(tmp_path, capsys, no_work):
    trace = str(tmp_path / "trace")
    assert _run(profile_throughput.main, ["--steps", "2", "--trace", trace, "--trace-steps", "1:3"]) == BAD_INPUT
    assert "--trace-steps 1:3 goes past the 2 measured steps" in _error_line(capsys)
    assert os.listdir(tmp_path) == []


def _paths_case_list():
    return [  # (tool, argv with {t} = the tree, flag, message)
        (pack_pairs, ["-i", "in.jsonl", "-t", "tok", "-o", "{t}/adir/", "-q"], "--output-prefix", "is a folder"),
        (pack_pairs, ["-i", "in.jsonl", "-t", "tok", "-o", "{t}/adir", "-q"], "--output-prefix", "is a folder"),
        (pack_pairs, ["-i", "in.jsonl", "-t", "tok", "-o", "{t}/afile/pairs", "-q"], "--output-prefix", "is a file"),
        (profile_throughput, ["--json", "{t}/adir"], "--json", "is a folder"),
        (profile_throughput, ["--json", "{t}/afile/r.json"], "--json", "is a file"),
        (profile_throughput, ["--trace", "{t}/afile"], "--trace", "is not a folder"),
        (profile_throughput, ["--sweep", "1x1", "--out-dir", "{t}/afile"], "--out-dir", "is not a folder"),
        (convert_checkpoint, ["hf-to-mcore", "--hf", "{t}/adir", "--out", "{t}/afile"], "--out", "is not a folder"),
        (convert_checkpoint, ["mcore-to-hf", "--ckpt", "{t}/adir", "--out", "{t}/afile/x/hf"], "--out", "is a file"),
        (convert_checkpoint, ["mcore-to-hf", "--ckpt", "{t}/x", "--out", "{t}/adir"], "--force", "already exists"),
        (rectify, ["filter", "--input", "v.jsonl", "--output", "{t}/afile"], "--output", "is not a folder"),
        (rectify, ["filter", "--input", "v.jsonl", "--output", "{t}/out", "--cache", "{t}/adir"], "--cache", "is a folder"),
        (evaluate, ["--benchmark", "aime24=b.jsonl", "--local-model", "m", "--output", "{t}/afile"], "--output",
         "is not a folder"),
        (evaluate, ["--compare", "{t}/a.json", "{t}/b.json", "--plot", "{t}/adir"], "--plot", "is a folder"),
        (export_quantized, ["--checkpoint", "{t}/adir", "--pack", "p", "--out", "{t}/afile"], "--out", "is not a folder"),
        (export_quantized, ["--checkpoint", "{t}/x", "--pack", "p", "--out", "{t}/adir"], "--out", "not empty"),
        (gpu_check, ["--out", "{t}/afile", "--dry-run"], "--out", "is not a folder"),
    ]


PATHS = _paths_case_list()


@pytest.mark.parametrize("tool,argv,flag,message", PATHS,
                         ids=[f"{t.__name__.split('.')[-1]}{f}-{m.replace(' ', '_')}" for t, _, f, m in PATHS])
def test_outputs_that_cannot_be_written_are_refused_first(tool, argv, flag, message, tree, capsys, no_work):
    before = sorted(os.listdir(tree))
    assert _run(tool.main, [a.format(t=tree) for a in argv]) == BAD_INPUT
    line = _error_line(capsys)
    assert flag in line and message in line, line
    assert sorted(os.listdir(tree)) == before and os.listdir(tree / "adir") == ["inside"]


def test_read_only_output_folders_are_refused_first(read_only_dir, tmp_path, capsys, no_work):
    for tool, argv, flag in (
            (pack_pairs, ["-i", "in.jsonl", "-t", "tok", "-o", f"{read_only_dir}/pairs", "-q"], "--output-prefix"),
            (profile_throughput, ["--json", f"{read_only_dir}/r.json"], "--json"),
            (convert_checkpoint, ["mcore-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", f"{read_only_dir}/hf"], "--out"),
            (rectify, ["filter", "--input", "v.jsonl", "--output", read_only_dir], "--output"),
            (export_quantized, ["--checkpoint", "c", "--pack", "p", "--out", f"{read_only_dir}/q"], "--out")):
        assert _run(tool.main, argv) == BAD_INPUT, tool.__name__
        line = _error_line(capsys)
        assert flag in line and f"cannot write in {read_only_dir}" in line, line
    assert os.listdir(read_only_dir) == []


def test_export_device_this_machine_lacks(tmp_path, capsys, no_work):
    from megatron_spot.platform.device import has_cuda

    cases = [("tpu", "unknown device 'tpu'"), ("mps", "only cpu and cuda")] + ([] if has_cuda() else [("cuda", "use cpu")])
    if has_cuda():
        import torch

        cases.append((f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"))
    for device, message in cases:
        argv = ["--checkpoint", "c", "--pack", "p", "--out", str(tmp_path / "q"), "--device", device]
        assert _run(export_quantized.main, argv) == BAD_INPUT
        line = _error_line(capsys)
        assert line.startswith("error: --device: ") and message in line, line
    assert os.listdir(tmp_path) == []
