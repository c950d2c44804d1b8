"""GPU acceptance in one command (README "Checking a GPU machine"; `spot-gpu-check`, `tools/gpu_check.py`).

plan.py (what runs, its sizes and time budgets), orchestrate.py (the parent: child runner, dry-run
machine site), wheels.py (download, probe and pip-less install of the carried wheels) and report.py
(summary.md, the BENCHMARKS.md section) use the standard library only: the parent must start on a
GPU machine that has only its image's packages, before any wheel is installed. steps/ holds the
step children, one module per step; they import torch, megatron-core and the rest of the package
inside each function.
Nothing is imported here, so `import megatron_spot.gpu_check.plan` stays torch-free.
"""
