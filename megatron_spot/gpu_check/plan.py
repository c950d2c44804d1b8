"""What the GPU check runs: the steps with their time budgets, the carried wheels, the sizes of the GPU
run and of the dry run. Standard library only (the parent imports it on a bare GPU machine)."""
from __future__ import annotations

import os

# The checkout that holds the package: the check builds csrc/ in place and runs tests/, so it needs
# a source tree, not an installed copy (see checkout_problem).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 2**30

# What the GPU machine lacks and the checked code paths import, as (distribution, version, module).
# psutil (megatron-core's undeclared import) and ninja (parallel extension build) are preinstalled in
# the GPU image as last read; they stay here as fallbacks because the wheels step installs only what
# the machine does not already have (so they can never shadow the machine's copies) and they cost
# 0.3 MB, while an image without them would fail the whole check (no psutil: megatron.core does not
# import; no ninja: a serial build).
WHEELS = (
    ("megatron-core", "0.19.2", "megatron.core"),
    ("psutil", "7.2.2", "psutil"),
    ("ninja", "1.13.2", "ninja"),
)
# Preinstalled on the GPU machine (with whatever they require), per the acceptance issue; the dry
# run's children see only these (orchestrate.build_machine_site).
GPU_MACHINE_PACKAGES = ("torch", "triton", "transformers", "safetensors", "tokenizers", "numpy", "pytest",
                        "pyyaml", "matplotlib")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
WHEEL_PYTHON = "3.12"
WHEELS_BUDGET_BYTES = 40 * 10**6
INJECT_ENV = "GPU_CHECK_INJECT_FAILURE"  # comma-separated step names whose child fails on purpose
SIMULATE_ENV = "GPU_CHECK_MACHINE_SITE"  # dry run: the folder that stands in for the GPU machine's packages
CHILD_MODULE = "megatron_spot.cli.gpu_check"  # children run `python -m CHILD_MODULE --child STEP`

# Fused-op benchmark shapes (the acceptance issue) and the dry-run stand-ins.
BENCH_GPU = {"tokens": [4096, 16384], "vocab": 151_936, "hidden": 2048, "reps": 3}
BENCH_DRY = {"tokens": [128, 512], "vocab": 2048, "hidden": 64, "reps": 2}
# Profiling: largest preset first; the first one predicted to fit memory and time is run.
PROFILE_GPU = {"candidates": ["qwen3-8b", "qwen3-4b", "qwen3-1.7b", "qwen3-0.6b"], "seq_length": 4096,
               "micro_batch_size": 1, "num_micro_batches": 2, "steps": 3, "warmup_steps": 1,
               "precision": "bf16", "recompute": "selective", "assumed_mfu": 0.3}
PROFILE_DRY = {"candidates": ["qwen3-tiny"], "seq_length": 64, "micro_batch_size": 1, "num_micro_batches": 2,
               "steps": 2, "warmup_steps": 1, "precision": "fp32", "recompute": "selective", "assumed_mfu": 0.3}

# The MoE step: a few SPoT steps of the tiny Qwen3-MoE (8 experts, top-2; tests/gpu/train_child.py, the recipe
# of tests/gpu/test_train_cuda.py: spot-bco, lr 2e-3, online reference, 8 pairs per step, EP1) with grouped
# experts (Megatron-Core's TEGroupedMLP) against the same steps with sequential experts (SequentialMLP) on the
# CPU in fp32. MOE_EXPERTS_KEY picks the implementation (the one place that names the override). Tolerances
# are relative, per step and per metric (loss, logps/chosen, logps/rejected, grad_norm): |a - b| <= rel *
# max(|a|, |b|, 1e-3). The fp32 run on the GPU is held to test_train_cuda's local-spec bounds (1e-4, grad
# norm 1e-3: fp32 GEMMs, TF32 off, only the summation order differs) or, when Transformer Engine builds the
# layers, its TE-spec bound 1e-3 (fused attention, TE's GEMMs); bf16 to 3e-2. The dry run compares grouped
# with sequential experts on the CPU, where both are fp32 matmuls over the same tokens: 1e-6.
MOE_EXPERTS_KEY = "moe.experts"
MOE_EXPERT_BLOCKS = {"grouped": "TEGroupedMLP", "sequential": "SequentialMLP"}  # Megatron-Core's class of each
MOE_GPU = {"preset": "qwen3-moe-tiny", "steps": 2, "runs": [
    {"name": "grouped-fp32", "experts": "grouped", "precision": "fp32", "rel": 1e-4, "grad_rel": 1e-3, "te_rel": 1e-3},
    {"name": "grouped-bf16", "experts": "grouped", "precision": "bf16", "rel": 3e-2, "grad_rel": 3e-2, "te_rel": 3e-2},
]}
MOE_DRY = {"preset": "qwen3-moe-tiny", "steps": 2, "runs": [
    {"name": "grouped-fp32", "experts": "grouped", "precision": "fp32", "rel": 1e-6, "grad_rel": 1e-6},
]}


class Step:
    """One guarded stage: `budget_s` caps its run, `min_s` is what it needs to be worth starting."""

    def __init__(self, name: str, budget_s: float, min_s: float, what: str):
        self.name, self.budget_s, self.min_s, self.what = name, budget_s, min_s, what


STEPS = (
    Step("wheels", 120, 5, "install the carried wheels into a private folder (never the machine's torch)"),
    Step("build", 200, 30, "build megatron_spot._C with CUDA (MEGATRON_SPOT_EXT=cuda, sm_90)"),
    Step("pytest", 220, 30, "pytest -m gpu: tests/gpu/ and every gpu-marked test elsewhere"),
    Step("bench-ops", 90, 15, "fused log-prob op vs naive and Megatron-Core on the GPU"),
    # before profile, whose preset choice adapts to the time it is left; this step cannot shrink
    Step("moe", 180, 45, "tiny Qwen3-MoE SPoT steps: grouped experts on the GPU vs sequential experts on the CPU"),
    Step("profile", 150, 40, "tools/profile_throughput.py on the largest Qwen3 preset that fits"),
)
STEP_NAMES = tuple(s.name for s in STEPS)
DEFAULT_BUDGET_S = 450  # the issue: well inside 8 minutes on an H100-class GPU


def checkout_problem(root: str = ROOT) -> str | None:
    """Why `root` cannot be checked (None when it can): the steps need the source checkout."""
    missing = [p for p in ("setup.py", os.path.join("csrc", "build_ext_config.py"), "tests")
               if not os.path.exists(os.path.join(root, p))]
    if missing:
        return (f"{root}: not a megatron_spot source checkout (no {', '.join(missing)}); the GPU check builds "
                "csrc/ in place and runs tests/, so run it from a checkout (python3 tools/gpu_check.py)")
    return None
