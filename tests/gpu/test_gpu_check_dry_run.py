"""`make gpu-check DRY_RUN=1` inside `make test`: the GPU acceptance kit (megatron_spot/gpu_check/, run
through the tools/gpu_check.py shim) runs end to end on this CPU machine at tiny sizes (so it cannot rot
before a GPU comes), and one failing step does not stop the others. Not gpu-marked: this is the CPU half.
The dry run's children see only the packages the GPU machine has (orchestrate.build_machine_site), so a
new import the wheels do not carry fails here.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from megatron_spot.gpu_check import plan, report, wheels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "gpu_check.py")


def _run(out, *extra, timeout=480, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", plan.INJECT_ENV)}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, TOOL, "--dry-run", "--out", str(out), *extra], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    with open(os.path.join(out, "gpu_results.json")) as f:
        return proc, json.load(f)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_dry")
    return out, *_run(out)


def test_dry_run_is_green_and_writes_results(dry):
    out, proc, res = dry
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["name"]: s for s in res["steps"]}
    assert list(steps) == list(plan.STEP_NAMES)
    assert res["dry_run"] is True and res["ok"] is True
    assert steps["build"]["status"] == "skipped" and "dry run" in steps["build"]["reason"]
    assert all(steps[n]["status"] == "ok" for n in ("wheels", "pytest", "bench-ops", "moe", "profile")), steps
    assert res["wall_s"] < res["budget_s"]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check: PASSED (DRY RUN") and summary in proc.stdout
    for name in plan.STEP_NAMES:
        assert f"| {name} |" in summary


def test_dry_run_installs_a_wheel_privately(dry):
    _, _, res = dry
    wheels = {s["name"]: s for s in res["steps"]}["wheels"]["result"]["wheels"]
    assert wheels == [{"dist": "gpu-check-probe", "action": "installed gpu_check_probe-1.0-py3-none-any.whl"}]
    import importlib.util

    assert importlib.util.find_spec("gpu_check_probe") is None  # it went to the private folder, now removed


def test_dry_run_collects_the_gpu_tests(dry):
    _, _, res = dry
    r = {s["name"]: s for s in res["steps"]}["pytest"]["result"]
    assert "tests/gpu" in r["files"] and any(f.startswith("tests/models") for f in r["files"])
    names = {t["name"].split("::")[-1].split("[")[0] for t in r["tests"]}
    # the kernel, training, checkpoint and NCCL checks are all collected (and skip without CUDA)
    for expected in ("test_token_logprobs_cuda_matches_fp64_torch", "test_pair_loss_cuda_matches_formulas",
                     "test_fused_linear_head_cuda_matches_fp64_torch", "test_gpu_fp32_local_spec_training_equals_cpu",
                     "test_checkpoint_saved_on_cuda_resumes_exactly", "test_one_rank_nccl_startup_and_vocab_parallel_op"):
        assert expected in names, sorted(names)
    assert r["counts"]["skipped"] == len(r["tests"]) and r["counts"]["failed"] == 0
    assert not any("test_gpu_check_dry_run" in t["name"] for t in r["tests"])  # no recursion


def test_dry_run_benchmark_agrees_with_fp64_and_profile_reports(dry):
    _, _, res = dry
    steps = {s["name"]: s for s in res["steps"]}
    cases = steps["bench-ops"]["result"]["cases"]
    assert {(c["impl"], c["dtype"], c["tokens"]) for c in cases} == {
        (i, d, t) for i in ("fused", "naive", "megatron") for d in ("float32", "bfloat16")
        for t in plan.BENCH_DRY["tokens"]}
    for c in cases:
        assert "error" not in c, c
        assert c["time_s"] > 0 and c["bytes_moved"] > 0
        assert c["max_abs_diff"] <= 1e-4, c  # every implementation against the fp64 log_softmax
    fused = {(c["dtype"], c["tokens"]): c for c in cases if c["impl"] == "fused"}
    assert all(c["backend"] == "cpu" for c in fused.values())
    prof = steps["profile"]["result"]
    assert prof["preset"] == "qwen3-tiny"
    rep = prof["report"]
    assert rep["tokens_per_s"] > 0 and rep["peak_memory_bytes"]["predicted"] > 0
    assert math.isfinite(rep["flops_per_step"]["measured"]) and rep["flops_per_step"]["predicted"] > 0


def test_dry_run_moe_step_trains_grouped_experts_like_sequential(dry):
    """The moe step's two tiny Qwen3-MoE runs (grouped experts as the GPU side, sequential experts as the CPU
    reference; both on the CPU here) agree step by step within 1e-6, checked again here from the recorded
    numbers, and that agreement is not of an untrained model: the loss moved far beyond the tolerance."""
    from megatron_spot.gpu_check.steps.moe import COMPARED

    out, _, res = dry
    r = {s["name"]: s for s in res["steps"]}["moe"]["result"]
    ref, (run,) = r["reference"], r["runs"]
    assert r["preset"] == "qwen3-moe-tiny" and ref["device"] == run["device"] == "cpu"
    assert [h["step"] for h in ref["history"]] == [h["step"] for h in run["history"]] == [1, 2]
    for got, want in zip(run["history"], ref["history"]):
        for k in COMPARED:
            assert abs(got[k] - want[k]) <= 1e-6 * max(abs(got[k]), abs(want[k]), 1e-3), (k, got, want)
    assert ref["history"][0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)  # policy = reference at step 1
    assert ref["loss_moved"] > 1e-2 and ref["history"][1]["grad_norm"] != ref["history"][0]["grad_norm"]
    assert run["passed"] and run["tolerance"] == {"rel": 1e-6, "grad_norm_rel": 1e-6}
    assert run["tokens_per_s"] > 0 and run["step_time_s"] > 0
    # moe.experts: Megatron-Core's grouped module (here with the plain-PyTorch twin of TE's GroupedLinear)
    assert (ref["experts_module"], run["experts_module"], run["te"]) == ("SequentialMLP", "TEGroupedMLP", False), run
    summary = (out / "summary.md").read_text()
    assert "## MoE: qwen3-moe-tiny grouped experts vs sequential" in summary and "| grouped-fp32 | cpu |" in summary


def test_moe_comparison_reports_every_difference_beyond_its_tolerance():
    from megatron_spot.gpu_check.steps.moe import compare_histories

    ref = [{"step": s, "loss": 1.0, "logps/chosen": -50.0, "logps/rejected": -60.0, "grad_norm": 4.0} for s in (1, 2)]
    got = [dict(h) for h in ref]
    got[1].update({"loss": 1.0 + 2e-4, "grad_norm": 4.0 * (1 + 5e-4), "logps/rejected": float("nan")})
    worst, bad = compare_histories(got, ref, rel=1e-4, grad_rel=1e-3)
    assert worst["loss"] == pytest.approx(2e-4, rel=1e-3) and worst["logps/chosen"] == 0.0
    assert [b.split(":")[0] for b in bad] == ["step 2 loss", "step 2 logps/rejected"]  # grad norm within 1e-3
    assert compare_histories(got[:1], ref, rel=1e-4)[1] == ["steps [1] vs [1, 2]"]


def test_one_failing_step_does_not_stop_the_others(tmp_path):
    proc, res = _run(tmp_path, "--only", "wheels,bench-ops", "--inject-failure", "wheels")
    assert proc.returncode == 1
    steps = {s["name"]: s for s in res["steps"]}
    assert steps["wheels"]["status"] == "failed" and "injected failure" in steps["wheels"]["error"]
    assert steps["bench-ops"]["status"] == "ok" and len(steps["bench-ops"]["result"]["cases"]) == 12
    assert res["ok"] is False
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check: FAILED")


def test_a_hanging_step_is_killed_and_a_step_that_would_not_fit_is_skipped(tmp_path):
    # wheels hangs (as a deadlocked collective would) and gets its 5 s minimum; nothing is left for profile
    proc, res = _run(tmp_path, "--only", "wheels,profile", "--budget-s", "6", "--inject-failure", "wheels:hang")
    steps = {s["name"]: s for s in res["steps"]}
    assert steps["wheels"]["status"] == "timeout" and 5 <= steps["wheels"]["seconds"] < 30, steps["wheels"]
    assert steps["profile"]["status"] == "skipped" and "would not fit" in steps["profile"]["reason"]
    assert proc.returncode == 1


def test_a_hanging_test_interrupts_pytest_and_keeps_its_results(tmp_path):
    """A GPU test that hangs (a stuck NCCL start-up) gets SIGINT before the step's hard limit, so pytest
    still writes its results and the step reports the interruption instead of a bare timeout."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "hang_third_test.py").write_text(  # the first two finish (skipped on CPU), the third hangs
        "import time\nimport pytest\nstarted = []\n\n\n@pytest.hookimpl(tryfirst=True)\n"
        "def pytest_runtest_setup(item):\n    started.append(item)\n    if len(started) == 3:\n"
        "        time.sleep(3600)\n")
    # about the smallest budget pytest starts with (its 30 s minimum): interrupted after about 12 s
    proc, res = _run(tmp_path / "out", "--only", "pytest", "--budget-s", "32",
                     env_extra={"PYTHONPATH": str(plugin), "PYTEST_ADDOPTS": "-p hang_third_test"})
    step = {s["name"]: s for s in res["steps"]}["pytest"]
    assert proc.returncode == 1
    assert step["status"] == "failed" and "interrupted at its 12 s deadline" in step["error"], step
    assert step["seconds"] < 30, step  # ended by the interrupt, not by the parent's 30 s kill
    assert "KeyboardInterrupt" in (tmp_path / "out" / "logs" / "pytest.log").read_text()
    assert step["result"]["counts"] == {"passed": 0, "failed": 0, "error": 0, "skipped": 2}, step["result"]["counts"]


def test_the_cuda_build_step_names_why_it_cannot_build_here():
    """The GPU run's build path (the dry run skips it) up to the build itself: toolkit found, nvcc asked
    for its version, setup.py started with MEGATRON_SPOT_EXT=cuda, which this CPU torch refuses."""
    from megatron_spot.gpu_check.steps.build import child_build
    from megatron_spot.gpu_check.steps.common import find_cuda_home

    with pytest.raises(RuntimeError) as err:
        child_build({"dry_run": False})
    if find_cuda_home() is None:
        assert "no CUDA toolkit" in str(err.value)
    else:
        assert "build failed (exit 1)" in str(err.value) and "has no CUDA support" in str(err.value), err.value


def test_the_wheel_list_fits_the_budget_and_names_pinned_versions():
    assert {d for d, _, _ in plan.WHEELS} >= {"megatron-core", "psutil"}
    assert all(v.count(".") >= 1 for _, v, _ in plan.WHEELS)
    folder = os.path.join(ROOT, ".gpu-wheels")
    files = wheels.wheel_files(folder)
    if not files:
        pytest.skip("no .gpu-wheels/ here (run `make gpu-wheels`)")
    assert sum(os.path.getsize(p) for p in files.values()) <= plan.WHEELS_BUDGET_BYTES


def test_wheels_install_without_pip_by_extraction(tmp_path):
    """The fallback for a GPU machine without pip: extracted wheels import (and ninja runs)."""
    site = tmp_path / "site"
    wheels.extract_wheel(wheels.make_probe_wheel(str(tmp_path / "w")), str(site))
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", "import gpu_check_probe; print(gpu_check_probe.ANSWER)"],
                         capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "42", out.stderr
    ninja = wheels.wheel_files(os.path.join(ROOT, ".gpu-wheels")).get("ninja")
    if ninja:  # the real wheel, when `make gpu-wheels` has run here
        wheels.extract_wheel(ninja, str(site))
        version = subprocess.run([str(site / "bin" / "ninja"), "--version"], capture_output=True, text=True)
        assert version.stdout.startswith("1.13"), version


def test_gpu_results_go_into_benchmarks_as_one_replaceable_section(dry, tmp_path):
    out, _, res = dry
    bench = tmp_path / "BENCHMARKS.md"
    original = open(os.path.join(ROOT, "BENCHMARKS.md")).read()
    bench.write_text(original)
    assert report.write_benchmarks_section(str(out / "gpu_results.json"), str(bench)) == 2  # a dry run: refused
    as_gpu = tmp_path / "gpu_results.json"
    as_gpu.write_text(json.dumps({**res, "dry_run": False, "machine": {**res["machine"], "gpu_name": "TEST GPU"}}))
    for _ in range(2):  # a rerun replaces the section
        assert report.write_benchmarks_section(str(as_gpu), str(bench)) == 0
    text = bench.read_text()
    assert text.count("<!-- bench:gpu -->") == 1 and text.startswith(original.rstrip())
    section = text[text.index("<!-- bench:gpu -->"):]
    assert "Machine: TEST GPU" in section and "| bench-ops | ok |" in section and "## fused log-prob op" in section
    assert "| moe | ok |" in section and "## MoE: qwen3-moe-tiny" in section


# what the parent must not import: the GPU machine lacks megatron-core before the wheels step, and the
# parent must report even when torch itself is broken there
HEAVY = ("torch", "numpy", "megatron", "transformers", "packaging", "yaml")
BLOCKER = f"""
import sys
attempts = []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            attempts.append(name)
            raise ModuleNotFoundError(f"blocked: {{name}}")
        return None
sys.meta_path.insert(0, Block())
"""


def test_the_parent_imports_without_torch(dry):
    out, _, _ = dry
    probe = BLOCKER + f"""
import json
from megatron_spot.cli import gpu_check
from megatron_spot.gpu_check import orchestrate, plan, report, wheels
args = gpu_check.parse_args(["--dry-run", "--out", "x"])
text = report.render_summary(json.load(open({str(out / "gpu_results.json")!r})))
assert text.startswith("# GPU check: PASSED"), text[:200]
print("attempts", attempts)
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("attempts []"), r.stdout  # not even tried
    # no site-packages at all (torch not importable): the shim finds the checkout, the parent's paths run
    help_ = subprocess.run([sys.executable, "-S", TOOL, "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--to-benchmarks" in help_.stdout, help_.stderr[-2000:]
    refused = subprocess.run([sys.executable, "-S", TOOL, "--to-benchmarks", str(out / "gpu_results.json")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "is a dry run on a CPU" in refused.stderr, refused.stderr[-2000:]


def test_a_gpu_run_without_the_wheels_it_needs_is_refused_before_any_step(tmp_path):
    # `python -S`: none of the pinned distributions is installed, as on the bare GPU machine
    r = subprocess.run([sys.executable, "-S", TOOL, "--out", str(tmp_path / "out"), "--wheels", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and not (tmp_path / "out").exists(), r.stdout + r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and f"{tmp_path}: no wheel for megatron-core==0.19.2" in line and "make gpu-wheels" in line


def test_a_folder_without_the_sources_is_refused_in_one_line(tmp_path):
    problem = plan.checkout_problem(str(tmp_path))
    assert "not a megatron_spot source checkout" in problem and "setup.py" in problem and "\n" not in problem
    assert plan.checkout_problem() is None
