"""The moe step: the tiny Qwen3-MoE (8 experts, top-2) trained a few SPoT steps with grouped experts
(`moe.experts=grouped`: Megatron-Core's TEGroupedMLP, Transformer Engine's grouped GEMM where TE is installed,
models/gpt/grouped_experts.py's plain-PyTorch twin otherwise) against the same steps with sequential experts
(SequentialMLP) on the CPU in fp32, same checkpoint, data and seed, at EP1; per step and metric
within the stated tolerances of plan.MOE_GPU, with the GPU run's step time and tokens/s. The dry run runs
the grouped side on the CPU too (plan.MOE_DRY): grouped and sequential experts agree to float noise there.

Every run is a fresh process of tests/gpu/train_child.py, the child tests/gpu/test_train_cuda.py uses for the
dense model: the CPU reference (GPU hidden) builds the workspace and trains on it in one process (a start-up
fewer), the GPU runs start once the workspace is complete, one after the other so the timed one has the GPU
to itself."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

from megatron_spot.gpu_check.orchestrate import kill_group
from megatron_spot.gpu_check.plan import MOE_DRY, MOE_EXPERT_BLOCKS, MOE_EXPERTS_KEY, MOE_GPU, ROOT
from megatron_spot.gpu_check.steps.common import python_argv

TRAIN_CHILD = os.path.join(ROOT, "tests", "gpu", "train_child.py")
COMPARED = ("loss", "logps/chosen", "logps/rejected", "grad_norm")
KEPT = COMPARED + ("step_time_s", "tokens_per_s", "tokens", "moe_load_imbalance")
# the CPU reference's threads: it runs beside the GPU runs, whose host side must not starve
CPU_THREADS = 4


def compare_histories(got: list[dict], ref: list[dict], rel: float, grad_rel: float | None = None) -> tuple[dict, list]:
    """Per step and key of COMPARED: |a - b| <= tol * max(|a|, |b|, 1e-3), tol = grad_rel for grad_norm
    (when given) and rel otherwise. Returns (largest relative difference per key, one line per violation)."""
    by_step = {h["step"]: h for h in ref}
    worst, bad = {k: 0.0 for k in COMPARED}, []
    if [h["step"] for h in got] != [h["step"] for h in ref]:
        bad.append(f"steps {[h['step'] for h in got]} vs {[h['step'] for h in ref]}")
    for h in got:
        o = by_step.get(h["step"])
        if o is None:
            continue
        for k in COMPARED:
            tol = grad_rel if (k == "grad_norm" and grad_rel) else rel
            x, y = float(h[k]), float(o[k])
            diff = abs(x - y) / max(abs(x), abs(y), 1e-3)
            worst[k] = max(worst[k], diff)
            if not diff <= tol:  # NaN fails too
                bad.append(f"step {h['step']} {k}: {x:.8g} vs {y:.8g} (rel {diff:.2e} > {tol})")
    return worst, bad


def _experts(experts: str) -> str:
    return f"{MOE_EXPERTS_KEY}={experts}"


class _Child:
    """One train_child.py process with its log under OUT/logs; `cpu` hides the GPU from it."""

    def __init__(self, name: str, args: list, logs: str, cpu: bool):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if cpu:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(min(CPU_THREADS, os.cpu_count() or 1)))
        self.name, self.log = name, os.path.join(logs, f"moe_{name}.log")
        cmd = [*python_argv(), TRAIN_CHILD, *map(str, args)]
        print(f"+ {' '.join(cmd)}  ({'CPU' if cpu else 'the device'}; log {os.path.basename(self.log)})", flush=True)
        self.t0 = time.monotonic()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.seconds = None

    def wait_for(self, path: str, deadline: float) -> str | None:
        """None once `path` exists; otherwise why not (this process ended or the deadline came first)."""
        while not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return self.wait(deadline) or f"{self.name}: exit 0 without writing {path}"
            time.sleep(0.2)
        return None

    def wait(self, deadline: float) -> str | None:
        """None when it exited 0 before `deadline` (monotonic); otherwise why not, with its log's tail."""
        try:
            rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            self.proc.wait()
            rc = "killed at the step's deadline"
        self.seconds = round(time.monotonic() - self.t0, 1)
        if rc == 0:
            return None
        with open(self.log, errors="replace") as f:
            tail = "".join(f.readlines()[-8:])
        return f"{self.name}: exit {rc} after {self.seconds} s; last log lines:\n{tail}"

    def kill(self) -> None:
        kill_group(self.proc)


def _summary(child_json: str, seconds: float) -> dict:
    with open(child_json) as f:
        r = json.load(f)
    return {"device": r["device"], "te": r["te"], "experts_module": r.get("experts_module"), "seconds": seconds,
            "history": [{"step": h["step"], **{k: h.get(k) for k in KEPT}} for h in r["history"]]}


def child_moe(p: dict) -> dict:
    cfg = MOE_DRY if p["dry_run"] else MOE_GPU
    t0 = time.monotonic()
    deadline = t0 + p["limit_s"] - 5  # the result is written before the parent's hard kill
    logs = os.path.join(p["out"], "logs")
    res = {"preset": cfg["preset"], "steps": cfg["steps"], "reference": None, "runs": [], "notes": []}
    work = tempfile.mkdtemp(prefix="gpu_check_moe_")
    children: list[_Child] = []
    errors: list[str] = []
    try:
        ws = os.path.join(work, "ws")
        common = [f"run.train_steps={cfg['steps']}", "optimizer.warmup_fraction=0"]  # every step at the full lr
        reference = _Child("cpu-sequential", ["workspace-and-train", cfg["preset"], ws, os.path.join(work, "cpu"),
                                              "local", *common, _experts("sequential")], logs, cpu=True)
        children.append(reference)
        failed = reference.wait_for(os.path.join(ws, "READY"), deadline)
        if failed:
            return {**res, "status": "failed", "error": "the workspace was not built: " + failed}
        res["workspace_s"] = round(time.monotonic() - t0, 1)
        runs: list[dict] = []
        for run in cfg["runs"]:  # one after the other: the timed run has the device to itself
            left = deadline - time.monotonic()
            if runs and runs[-1].get("seconds") and left < 1.5 * runs[-1]["seconds"]:
                res["notes"].append(f"{run['name']} not run: {left:.0f} s left, the last run took "
                                    f"{runs[-1]['seconds']:.0f} s")
                continue
            child = _Child(run["name"], ["train", ws, os.path.join(work, run["name"]), "auto", *common,
                                         f"precision.dtype={run['precision']}",
                                         _experts(run["experts"])], logs, cpu=bool(p["dry_run"]))
            children.append(child)
            failed = child.wait(deadline)
            rec = {"name": run["name"], "precision": run["precision"], "experts_asked": run["experts"]}
            if failed:
                errors.append(failed)
                runs.append({**rec, "status": "failed", "error": failed})
                continue
            runs.append({**rec, **_summary(os.path.join(work, run["name"], "child.json"), child.seconds)})
        failed = reference.wait(deadline)
        if failed:
            return {**res, "runs": runs, "status": "failed", "error": "the CPU reference failed: " + failed}
        res["reference"] = {"name": "cpu-sequential", "precision": "fp32",
                            **_summary(os.path.join(work, "cpu", "child.json"), reference.seconds)}
        losses = [h["loss"] for h in res["reference"]["history"]]
        # how far training moved the loss (the first step's is 2 log 2: policy = reference): a comparison of
        # later steps means something only when this is far above the tolerances
        res["reference"]["loss_moved"] = max(abs(x - losses[0]) for x in losses)
        if res["reference"]["experts_module"] != MOE_EXPERT_BLOCKS["sequential"]:
            errors.append(f"the CPU reference's experts ran as {res['reference']['experts_module']}, not "
                          f"{MOE_EXPERT_BLOCKS['sequential']}")
        for rec in runs:
            if "history" in rec:
                errors += _judge(rec, res["reference"], cfg)
        res["runs"] = runs
    finally:
        for child in children:
            child.kill()  # whatever a killed or failed run left behind
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.monotonic() - t0, 1)
    if errors:
        return {**res, "status": "failed", "error": "; ".join(e.splitlines()[0] for e in errors)}
    return res


def _judge(rec: dict, reference: dict, cfg: dict) -> list[str]:
    """Compare one run with the CPU reference under its tolerance (the TE bound when TE built its layers);
    record the bound, the largest differences and the device's last-step throughput. Returns the errors."""
    run = next(r for r in cfg["runs"] if r["name"] == rec["name"])
    rel = run.get("te_rel", run["rel"]) if rec["te"] else run["rel"]
    grad_rel = run.get("te_rel", run["grad_rel"]) if rec["te"] else run["grad_rel"]
    worst, bad = compare_histories(rec["history"], reference["history"], rel, grad_rel)
    last = rec["history"][-1]  # the first step carries the warm-up (kernel loading, allocator)
    rec.update(tolerance={"rel": rel, "grad_norm_rel": grad_rel}, max_rel_diff=worst, violations=bad,
               passed=not bad, tokens_per_s=last["tokens_per_s"], step_time_s=last["step_time_s"])
    errors = [f"{rec['name']}: {b}" for b in bad]
    if rec["experts_module"] != MOE_EXPERT_BLOCKS[run["experts"]]:
        errors.append(f"{rec['name']}: asked for {run['experts']} experts ({MOE_EXPERT_BLOCKS[run['experts']]}), "
                      f"ran {rec['experts_module']}")
    return errors
