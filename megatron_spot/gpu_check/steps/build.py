"""The build step: megatron_spot._C with CUDA for this GPU's architecture, then a fresh interpreter
checks that CUDA tensors reach the CUDA kernels."""
from __future__ import annotations

import os
import subprocess
import sys

from megatron_spot.gpu_check.plan import ROOT
from megatron_spot.gpu_check.steps.common import find_cuda_home


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
    cuda_home = os.environ.get("CUDA_HOME") or find_cuda_home()
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
