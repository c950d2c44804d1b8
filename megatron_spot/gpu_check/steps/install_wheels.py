"""The wheels step: install the carried wheels the machine lacks into the private site folder (the
wheel files themselves, download and pip-less install: gpu_check/wheels.py) and record the machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron_spot.gpu_check.plan import WHEELS
from megatron_spot.gpu_check.steps.common import machine_info
from megatron_spot.gpu_check.wheels import PROBE_WHEEL, extract_wheel, wheel_files


def child_wheels(p: dict) -> dict:
    """Install the carried wheels the machine does not already have into the private site folder."""
    import importlib
    import importlib.metadata as md
    import importlib.util

    machine = machine_info()
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
