"""What several step children share: this interpreter as the children run it, the CUDA toolkit the build
uses, and the machine's description (recorded by the wheels step, the first to run)."""
from __future__ import annotations

import os
import sys

from megatron_spot.gpu_check.plan import ROOT, GiB


def python_argv() -> list[str]:
    """This interpreter as the step children run it: with -S in the dry run, whose children see only the
    GPU machine's packages (orchestrate.build_machine_site), so a grandchild sees no more than they do."""
    return [sys.executable, "-S"] if sys.flags.no_site else [sys.executable]


def find_cuda_home() -> str | None:
    """csrc/build_ext_config.find_cuda_home: the same toolkit the build will use."""
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    try:
        from build_ext_config import find_cuda_home
    finally:
        sys.path.pop(0)
    return find_cuda_home()


def machine_info() -> dict:
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
    info["cuda_home"] = find_cuda_home()
    return info
