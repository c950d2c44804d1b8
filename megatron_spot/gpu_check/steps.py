"""The step children of the GPU check, one function per step, each run in its own process by
`python -m megatron_spot.cli.gpu_check --child STEP` (orchestrate.run_child). torch, megatron-core
and the rest of the package are imported inside the functions: the wheels step runs before
megatron-core is installed, and the parent imports none of this module."""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback

from megatron_spot.gpu_check.orchestrate import child_command, kill_group
from megatron_spot.gpu_check.plan import (BENCH_DRY, BENCH_GPU, INJECT_ENV, PROFILE_DRY, PROFILE_GPU, ROOT, WHEELS,
                                          GiB)
from megatron_spot.gpu_check.wheels import PROBE_WHEEL, extract_wheel, wheel_files

# The GPU image carries pytest plugins (xdist, timeout, cov, benchmark, mock, hypothesis) that this
# project never installs; loading none of them keeps the GPU run's pytest the one the dry run tested.
PLUGIN_AUTOLOAD_ENV = "PYTEST_DISABLE_PLUGIN_AUTOLOAD"
# pytest is interrupted this long before the step's hard limit, and then has this long to write its results
PYTEST_INTERRUPT_AT_S = 20
PYTEST_INTERRUPT_GRACE_S = 15


def _find_cuda_home() -> str | None:
    """csrc/build_ext_config.find_cuda_home: the same toolkit the build will use."""
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    try:
        from build_ext_config import find_cuda_home
    finally:
        sys.path.pop(0)
    return find_cuda_home()


def _loaded_distributions() -> list[str]:
    import importlib.metadata as md

    dists = md.packages_distributions()
    return sorted({d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])})


# ---------------------------------------------------------------------------------------------
# wheels
# ---------------------------------------------------------------------------------------------

def _machine_info() -> dict:
    # raw torch.cuda on purpose: this runs in the wheels step, before megatron_spot.platform (which
    # imports Megatron-Core and the extension) can be imported on the GPU machine
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_memory_gib=props.total_memory / GiB,
                    capability=f"{props.major}{props.minor}", gpu_count=torch.cuda.device_count())
    try:
        import transformer_engine

        info["transformer_engine"] = getattr(transformer_engine, "__version__", "installed")
    except Exception:
        info["transformer_engine"] = None
    info["cuda_home"] = _find_cuda_home()
    return info


def child_wheels(p: dict) -> dict:
    """Install the carried wheels the machine does not already have into the private site folder."""
    import importlib
    import importlib.metadata as md
    import importlib.util

    machine = _machine_info()
    with open(os.path.join(p["out"], "logs", "machine.json"), "w") as f:  # kept even if an install fails
        json.dump(machine, f)
    if p["probe"]:
        wanted = [("gpu-check-probe", "1.0", "gpu_check_probe")]
        files = {"gpu-check-probe": os.path.join(p["wheels"], PROBE_WHEEL)}
    else:
        wanted = list(WHEELS)
        files = wheel_files(p["wheels"])
    actions, to_install = [], []
    for dist, version, module in wanted:
        try:
            have = md.version(dist)
            # never installed over: the private folder comes first on PYTHONPATH and would shadow it
            actions.append({"dist": dist, "action": f"already installed ({have}); the machine's copy is used"})
            continue
        except md.PackageNotFoundError:
            pass
        if dist not in files:
            raise RuntimeError(f"{p['wheels']}: no wheel for {dist}=={version}, which this machine lacks; "
                               "run `make gpu-wheels` on a machine with the registry first")
        to_install.append((dist, version, module))
        actions.append({"dist": dist, "action": f"installed {os.path.basename(files[dist])}"})
    if to_install and importlib.util.find_spec("pip") is not None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", p["wheels"], "--target",
               p["site"], "--no-deps", "--no-compile", "-q", *[f"{d}=={v}" for d, v, _ in to_install]]
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    elif to_install:  # no pip on the machine: a wheel is a zip laid out for site-packages
        for dist, _, _ in to_install:
            print(f"no pip: extracting {os.path.basename(files[dist])}", flush=True)
            extract_wheel(files[dist], p["site"])
    importlib.invalidate_caches()
    for dist, _, module in wanted:
        importlib.import_module(module)  # raises with the module's own error if a wheel is broken
    return {"wheels": actions, "site": p["site"], "machine": machine}


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------

def child_build(p: dict) -> dict:
    """Build the CUDA extension in place against this machine's torch."""
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    if p["dry_run"]:
        return {"status": "skipped", "command": f"MEGATRON_SPOT_EXT=cuda TORCH_CUDA_ARCH_LIST=9.0 {' '.join(cmd)}",
                "reason": "dry run: the CUDA build needs the GPU machine's CUDA torch and toolkit; the ops use the "
                          "extension already built here"}
    import torch

    # this GPU's own architecture only (sm_90 on H100/H200): one target compiles fastest. Raw torch.cuda:
    # megatron_spot.platform imports the extension this step is about to build
    arch = "{}.{}".format(*torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else "9.0"
    env = dict(os.environ, MEGATRON_SPOT_EXT="cuda", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", arch),
               MAX_JOBS=str(os.cpu_count() or 4))
    shown = f"MEGATRON_SPOT_EXT=cuda TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} {' '.join(cmd)}"
    cuda_home = os.environ.get("CUDA_HOME") or _find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit (include/cuda_runtime.h + bin/nvcc) on this machine: the CUDA kernels "
                           "cannot be built and the ops fall back to the PyTorch reference; set CUDA_HOME if one exists")
    # the toolkit the build uses, in the log and the results: torch refuses an nvcc whose CUDA version
    # differs from torch.version.cuda, and that is the first thing to read when the build fails
    nvcc = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    nvcc_version = (nvcc.stdout.strip().splitlines() or ["?"])[-1]
    print(f"CUDA_HOME={cuda_home}: {nvcc_version}; torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    print("+ " + shown, flush=True)
    build = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(build.stdout, flush=True)
    if build.returncode != 0:
        errors = [line for line in build.stdout.splitlines() if "error" in line.lower()]
        raise RuntimeError(f"build failed (exit {build.returncode}): " + " / ".join((errors or
                                                                                       build.stdout.splitlines())[-4:]))
    # a fresh interpreter: does the built module load, and do CUDA tensors now reach our kernels?
    probe = subprocess.run([sys.executable, "-c", "from megatron_spot import ops; print(ops.active_backend('cuda'))"],
                           env=env, cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError("the built extension does not import: " + probe.stderr.strip()[-1500:])
    backend = probe.stdout.strip().splitlines()[-1]
    if backend != "cuda":
        raise RuntimeError(f"built, but megatron_spot.ops uses the {backend!r} implementation for CUDA tensors")
    return {"command": shown, "ops_backend_on_cuda": backend, "cuda_home": cuda_home, "nvcc": nvcc_version}


# ---------------------------------------------------------------------------------------------
# pytest
# ---------------------------------------------------------------------------------------------

def gpu_test_files() -> list[str]:
    """tests/gpu/ and every other test file that marks a test `gpu` (collecting all of tests/ would
    import test modules whose packages the GPU machine does not carry)."""
    files = [os.path.join("tests", "gpu")]
    for folder, _, names in os.walk(os.path.join(ROOT, "tests")):
        if os.path.basename(folder) == "gpu":
            continue
        for n in sorted(names):
            if n.startswith("test_") and n.endswith(".py"):
                path = os.path.join(folder, n)
                with open(path, errors="replace") as f:
                    if re.search(r"mark\.gpu\b", f.read()):
                        files.append(os.path.relpath(path, ROOT))
    return sorted(files)


def _junit_outcomes(junit: str) -> tuple[list[dict], dict]:
    """(one record per test case, counts per outcome) from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    if not os.path.exists(junit):
        return tests, counts
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('file') or case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or (el.text or "")).strip().splitlines()[0] if (
                    el.get("message") or el.text) else ""
                break
        counts[outcome] += 1
        tests.append({"name": name, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    return tests, counts


def _run_pytest(argv: list[str], deadline_s: float) -> tuple[int, bool]:
    """pytest in its own process group; at `deadline_s` it gets SIGINT, which ends it like Ctrl-C: the
    running test is interrupted and the junit XML of every test that finished is still written (the
    parent's hard kill at the step's limit would lose them all). Whatever the tests started (training
    children on the GPU) is killed with the group afterwards, so it cannot hold the GPU in later steps.
    Returns (exit code, interrupted)."""
    python = [sys.executable, "-S"] if sys.flags.no_site else [sys.executable]  # the dry run's machine site
    env = dict(os.environ, **{PLUGIN_AUTOLOAD_ENV: "1"})
    proc = subprocess.Popen([*python, "-m", "pytest", *argv], cwd=ROOT, env=env, start_new_session=True)
    interrupted = False
    try:
        code = proc.wait(timeout=max(1.0, deadline_s))
    except subprocess.TimeoutExpired:
        interrupted = True
        os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=PYTEST_INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:  # stuck inside a CUDA call that SIGINT cannot interrupt
            kill_group(proc)
            code = proc.wait()
    kill_group(proc)  # stragglers of a finished pytest too
    return code, interrupted


def child_pytest(p: dict) -> dict:
    files = gpu_test_files()
    junit = os.path.join(p["out"], "logs", "pytest_gpu.xml")
    if os.path.exists(junit):  # a previous run's results must not be read as this one's
        os.remove(junit)
    argv = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "--junitxml", junit,
            "-o", "junit_family=xunit1", *files]
    deadline = p["limit_s"] - PYTEST_INTERRUPT_AT_S
    print(f"+ {PLUGIN_AUTOLOAD_ENV}=1 pytest " + " ".join(argv) + f"  (interrupted after {deadline:.0f} s)", flush=True)
    code, interrupted = _run_pytest(argv, deadline)
    tests, counts = _junit_outcomes(junit)
    # 0 all passed, 5 nothing selected: both fine when nothing failed; anything else is a failure
    status = "ok" if code in (0, 5) and counts["failed"] == counts["error"] == 0 and not interrupted else "failed"
    res = {"status": status, "exit_code": code, "files": files, "counts": counts, "tests": tests}
    if interrupted:
        res["error"] = (f"pytest interrupted at its {deadline:.0f} s deadline (a test hung or ran long; the log's "
                        f"KeyboardInterrupt line names it): {counts['passed']} passed, {counts['failed']} failed "
                        f"before that")
    elif status == "failed":
        res["error"] = f"pytest exit code {code}: {counts['failed']} failed, {counts['error']} errors (see the table)"
    return res


# ---------------------------------------------------------------------------------------------
# bench-ops
# ---------------------------------------------------------------------------------------------

def _bytes_moved(impl: str, tokens: int, vocab: int, elem: int) -> int:
    """HBM traffic of forward+backward, the model of benchmarks/bench_ops.py's GPU estimate."""
    n, f32 = tokens * vocab * elem, tokens * vocab * 4
    low = elem < 4
    if impl == "fused":  # read once forward, once backward, write the gradient in place
        return 3 * n
    if impl == "naive":  # cast, log_softmax (2 reads + write), gather-backward zeros+scatter,
        return (n + f32) + 3 * f32 + (f32 + 3 * f32) + ((f32 + n) if low else 0)  # its backward, cast back
    # Megatron-Core: cast, max, subtract (r+w), exp (r+w), sum, divide (r+w); backward r+w + read; cast back
    return ((n + f32) if low else 0) + 7 * f32 + 3 * f32 + ((f32 + n) if low else 0)


class _Meter:
    """Time (CUDA events on a GPU, perf_counter on a CPU: platform.device.time_call) and the peak
    accelerator memory beyond a baseline (None on a CPU, whose allocator keeps no count)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def timed(self, fn):
        from megatron_spot.platform.device import time_call

        return time_call(fn)

    def mem_base(self):
        from megatron_spot.platform.device import allocated_memory_bytes, reset_peak_memory, synchronize

        if not self.cuda:
            return None
        synchronize()
        reset_peak_memory()
        return allocated_memory_bytes()

    def mem_extra(self, base):
        from megatron_spot.platform.device import peak_memory_bytes

        return None if base is None else peak_memory_bytes() - base


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _copy_bandwidth(cfg: dict, dev, meter: _Meter) -> float:
    """Bytes/s a read+write pass reaches on this device (the time model's denominator)."""
    import torch

    buf = torch.empty(min(2**28, max(cfg["tokens"]) * cfg["vocab"]), dtype=torch.float32, device=dev)
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    best = min(meter.timed(lambda: dst.copy_(buf))[0] for _ in range(3))
    return 2 * buf.numel() * 4 / best


def _bench_op_case(impl: str, fn, logits, targets, exact, refill, reps: int, meter: _Meter) -> dict:
    """Forward + backward of one implementation at one shape: best time, peak extra, error vs fp64."""
    import torch

    tokens, _, vocab = logits.shape
    go = torch.ones(tokens, 1, device=logits.device)
    times, extra, diff = [], None, None
    for rep in range(reps + 1):  # repetition 0 warms up (kernel load, allocator)
        refill()
        x = logits.requires_grad_(True)
        base = meter.mem_base()

        def fwd_bwd():
            y = fn(x, targets)
            (g,) = torch.autograd.grad(y, x, go)
            return y.detach()

        t, y = meter.timed(fwd_bwd)
        if rep:
            times.append(t)
            extra = meter.mem_extra(base)
        diff = float((y.double() - exact).abs().max())
        del y
        logits.requires_grad_(False)
    return {"time_s": min(times), "times_s": times, "peak_extra_bytes": extra, "max_abs_diff": diff,
            "bytes_moved": _bytes_moved(impl, tokens, vocab, logits.element_size()),
            "logits_bytes": logits.numel() * logits.element_size()}


def child_bench_ops(p: dict) -> dict:
    import torch

    from megatron_spot import ops
    from megatron_spot.config.schema import ParallelConfig
    from megatron_spot.platform import initialize, shutdown
    from megatron_spot.platform.device import device_name, has_cuda, release_cached_memory

    cfg = BENCH_DRY if p["dry_run"] else BENCH_GPU
    info = initialize(ParallelConfig(), seed=0)  # Megatron's cross entropy needs its TP group
    dev = info.device
    cuda = has_cuda()
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    meter = _Meter(cuda)
    bandwidth = _copy_bandwidth(cfg, dev, meter)  # its buffers are freed before the logits are allocated
    impls = {
        "naive": lambda x, t: torch.log_softmax(x.float(), dim=-1).gather(-1, t[..., None]).squeeze(-1),
        "megatron": lambda x, t: -vocab_parallel_cross_entropy(x, t),
        # last: its in-place backward overwrites the logits (refilled before each repetition)
        "fused": lambda x, t: ops.token_logprobs(x, t, inplace_backward=True),
    }
    cases = []
    for tokens in cfg["tokens"]:
        for dtype in (torch.float32, torch.bfloat16):
            V = cfg["vocab"]
            gen = torch.Generator(device=dev)
            logits = torch.empty(tokens, 1, V, dtype=dtype, device=dev)
            targets = torch.randint(0, V, (tokens, 1), device=dev, generator=gen.manual_seed(1))

            def refill():
                with torch.no_grad():
                    logits.copy_(torch.randn(tokens, 1, V, device=dev, generator=gen.manual_seed(0)).mul_(2))

            refill()
            # the independent oracle: fp64 log_softmax + gather, chunked so it needs no fp64 logits copy
            with torch.no_grad():
                exact = torch.cat([torch.log_softmax(c.double(), -1).gather(-1, t[..., None]).squeeze(-1)
                                   for c, t in zip(logits.split(256), targets.split(256))])
            for impl, fn in impls.items():
                rec = {"impl": impl, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "vocab": V}
                try:
                    rec.update(_bench_op_case(impl, fn, logits, targets, exact, refill, cfg["reps"], meter))
                    rec["predicted_s"] = rec["bytes_moved"] / bandwidth
                    if impl == "fused":
                        rec["backend"] = ops.active_backend(dev)
                except Exception as exc:  # OOM or a kernel error: record it, keep benchmarking
                    rec["error"] = _error_text(exc)
                    logits.requires_grad_(False)
                    release_cached_memory()
                cases.append(rec)
                print(json.dumps(rec), flush=True)
            logits = exact = None  # free this shape's buffers before the next, larger one
    res = {"device": f"{dev} ({device_name() or platform.processor() or 'CPU'})",
           "timer": "CUDA events" if cuda else "perf_counter", "reps": cfg["reps"],
           "memory_source": "torch.cuda.max_memory_allocated" if cuda else "n/a on CPU",
           "copy_bandwidth_gbs": bandwidth / 1e9, "cases": cases,
           "linear_head": _bench_linear_head(cfg, dev, cuda, meter)}
    shutdown()
    return res


def _bench_linear_head(cfg, dev, cuda, meter: _Meter) -> dict:
    """The fused linear loss head (issue 12) against output GEMM + fused op and GEMM + Megatron CE."""
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_spot import ops
    from megatron_spot.platform.device import release_cached_memory

    from megatron_spot.ops.linear_token_logprobs import default_chunk_size, default_vocab_chunk_size

    H, V = cfg["hidden"], cfg["vocab"]
    # both chunk layouts at the default budget: plan_chunks picks vocabulary chunks below V tokens on the
    # argument that they re-read [T, H] instead of the [V, H] weight-gradient accumulator; this measures it
    impls = {
        "linear_token_logprobs, vocabulary chunks": lambda h, w, t: ops.linear_token_logprobs(
            h, w, t, vocab_chunk_size=default_vocab_chunk_size(t.numel(), h.dtype)),
        "linear_token_logprobs, token chunks": lambda h, w, t: ops.linear_token_logprobs(
            h, w, t, chunk_size=default_chunk_size(w.shape[0], h.dtype)),
        "GEMM + token_logprobs": lambda h, w, t: ops.token_logprobs(torch.matmul(h, w.t()), t, inplace_backward=True),
        "GEMM + Megatron-Core CE": lambda h, w, t: -vocab_parallel_cross_entropy(torch.matmul(h, w.t()), t),
    }
    cases = []
    for tokens in cfg["tokens"]:
        dtype = torch.bfloat16
        gen = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(tokens, 1, H, device=dev, generator=gen).to(dtype).requires_grad_(True)
        weight = (torch.randn(V, H, device=dev, generator=gen) * H**-0.5).to(dtype).requires_grad_(True)
        targets = torch.randint(0, V, (tokens, 1), device=dev, generator=gen)
        go = torch.ones(tokens, 1, device=dev)
        for impl, fn in impls.items():
            rec = {"impl": impl, "dtype": "bfloat16", "tokens": tokens, "hidden": H, "vocab": V}
            try:
                times, extra = [], None
                for rep in range(cfg["reps"] + 1):
                    base = meter.mem_base()
                    t, _ = meter.timed(lambda: torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight), go))
                    if rep:
                        times.append(t)
                        extra = meter.mem_extra(base)
                rec.update(time_s=min(times), peak_extra_bytes=extra)
            except Exception as exc:
                rec["error"] = _error_text(exc)
                release_cached_memory()
            cases.append(rec)
            print(json.dumps(rec), flush=True)
    return {"note": f"fused linear head, bf16, hidden {H}: forward + backward (both GEMM gradients included); "
                    "peak extra counts the gradients of hidden and weight as well", "cases": cases}


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------

def rank_presets(cfg: dict, capacity_bytes: float, peak_tflops: float | None, time_limit_s: float,
                 flash_attention: bool):
    """Candidates predicted to fit 85% of the device memory and a third of the step's time, largest
    first, with the analytical prediction of each and a note for every candidate left out."""
    from megatron_spot.models import load_model_config
    from megatron_spot.profiling.analytical import StepShape, predict

    fitting, notes = [], []
    for name in cfg["candidates"]:
        model_cfg = load_model_config(name)
        shape = StepShape(micro_batch_size=cfg["micro_batch_size"], num_micro_batches=cfg["num_micro_batches"],
                          seq_length=cfg["seq_length"], dtype=cfg["precision"], recompute=cfg["recompute"],
                          flash_attention=flash_attention)
        pred = predict(model_cfg, shape, peak_tflops=peak_tflops, assumed_mfu=cfg["assumed_mfu"] if peak_tflops else None,
                       vocab=model_cfg.padded_vocab_size)
        mem = pred.memory["peak"]["total"]
        # warm-up + measured steps + the FLOP-counting step; model build and start-up take the rest
        steps_s = (pred.step_time_s or 0.0) * (cfg["steps"] + cfg["warmup_steps"] + 1)
        if mem > 0.85 * capacity_bytes:
            notes.append(f"{name} left out: predicted {mem / GiB:.1f} GiB > 85% of {capacity_bytes / GiB:.0f} GiB")
        elif steps_s > time_limit_s / 3:
            notes.append(f"{name} left out: predicted {steps_s:.0f} s of steps > a third of the {time_limit_s:.0f} s limit")
        else:
            fitting.append((name, pred))
    if not fitting:
        raise RuntimeError("no candidate preset fits: " + "; ".join(notes))
    return fitting, notes


def _device_capacity() -> tuple[float, float | None]:
    """(bytes the profiled run may use, the device's peak dense TFLOP/s or None)."""
    from megatron_spot.platform.device import total_memory_bytes
    from megatron_spot.profiling.hardware import current_gpu_name, peak_tflops

    total = total_memory_bytes()
    if total is not None:
        gpu = current_gpu_name()
        return total, (peak_tflops(gpu) if gpu else None)
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None


def _profile_argv(cfg: dict, preset: str, json_path: str) -> list[str]:
    return ["--preset", preset, "--seq-length", str(cfg["seq_length"]), "--micro-batch-size",
            str(cfg["micro_batch_size"]), "--num-micro-batches", str(cfg["num_micro_batches"]), "--steps",
            str(cfg["steps"]), "--warmup-steps", str(cfg["warmup_steps"]), "--precision", cfg["precision"],
            "--recompute", cfg["recompute"], "--json", json_path]


def _profile_attempt(argv: list[str], result_path: str, left_s: float) -> dict:
    """One profile run in its own process (an OOM or a hang cannot take the step's record with it)."""
    proc = subprocess.Popen(child_command(os.environ, "profile-run", argv, result_path), cwd=ROOT,
                            start_new_session=True)
    try:
        proc.wait(timeout=max(1.0, left_s))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    return {"status": "failed", "error": f"killed after {left_s:.0f} s"}


def child_profile(p: dict) -> dict:
    """Profile the largest fitting preset; an attempt that fails (an OOM the model did not foresee)
    falls back to the next smaller preset while time is left. Each attempt is its own process."""
    from megatron_spot.platform.device import transformer_engine_available

    t0 = time.monotonic()
    cfg = PROFILE_DRY if p["dry_run"] else PROFILE_GPU
    capacity, peak = _device_capacity()
    fitting, notes = rank_presets(cfg, capacity, peak, p["limit_s"], transformer_engine_available())
    notes.append(f"{fitting[0][0]} chosen: predicted peak {fitting[0][1].memory['peak']['total'] / GiB:.2f} GiB of "
                 f"{capacity / GiB:.0f} GiB")
    attempts = []
    for preset, pred in fitting:
        left = p["limit_s"] - (time.monotonic() - t0) - 5
        if attempts and left < 30:
            notes.append(f"{preset} not tried: {left:.0f} s left")
            break
        json_path = os.path.join(p["out"], "logs", f"profile_{preset}.json")
        argv = _profile_argv(cfg, preset, json_path)
        command = "python tools/profile_throughput.py " + " ".join(argv)
        print("+ " + command, flush=True)
        rec = _profile_attempt(argv, json_path + ".child.json", left)
        attempts.append({"preset": preset, "status": rec["status"], "error": rec.get("error")})
        if rec["status"] == "ok":
            with open(json_path) as f:
                report = json.load(f)
            keep = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "peak_source",
                    "step_time_s", "flops_per_step", "peak_memory_bytes", "time_split_s", "layout")
            return {"preset": preset, "selection": notes, "attempts": attempts, "command": command,
                    "assumed_mfu": cfg["assumed_mfu"], "predicted_step_s": pred.step_time_s,
                    "predicted_tokens_per_s": pred.tokens_per_s,
                    "predicted_peak_memory_bytes": pred.memory["peak"]["total"],
                    "report": {k: report.get(k) for k in keep}}
        notes.append(f"{preset} failed: {rec.get('error')}")
    raise RuntimeError("no profile run succeeded: " + "; ".join(notes))


def child_profile_run(argv: list) -> dict:
    from megatron_spot.cli.profile_throughput import main as profile_main

    code = profile_main(argv)
    if code != 0:
        raise RuntimeError(f"tools/profile_throughput.py exited with {code}")
    return {}


CHILDREN = {"wheels": child_wheels, "build": child_build, "pytest": child_pytest, "bench-ops": child_bench_ops,
            "profile": child_profile, "profile-run": child_profile_run}


def child_main(step: str, params, result_path: str) -> int:
    """Runs inside the child process; always writes a result file unless killed."""
    rec = {"step": step}
    code = 0
    try:
        injected = os.environ.get(INJECT_ENV, "").split(",")
        if f"{step}:hang" in injected:  # stands in for a deadlocked collective: the parent's limit must end it
            print(f"injected hang in step {step!r} ({INJECT_ENV})", flush=True)
            time.sleep(3600)
        if step in injected:
            raise RuntimeError(f"injected failure in step {step!r} ({INJECT_ENV})")
        out = CHILDREN[step](params)
        status = out.pop("status", "ok")
        rec.update(status=status, result=out)
        for k in ("reason", "error"):
            if k in out:
                rec[k] = out.pop(k)
        if status == "failed":
            code = 1
    except BaseException as exc:  # the parent records every failure and carries on with the next step
        traceback.print_exc()
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        code = 1
    rec["imports"] = _loaded_distributions()
    with open(result_path, "w") as f:
        json.dump(rec, f, indent=1, default=str)
    return code
