"""Write one benchmark's section into BENCHMARKS.md, replacing that section's previous text.

Each benchmark owns a section delimited by HTML comments, so benchmarks can run alone
(`python benchmarks/bench_ops.py`) or all together (`make bench`) without clobbering others.
"""
from __future__ import annotations

import datetime
import os
import platform
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "BENCHMARKS.md")
HEADER = "# Benchmarks\n\nEach section says the command that produced it and the machine it ran on.\n"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        tv = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:
        tv, gpu = "?", "?"
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}){mem}, {gpu}, torch {tv}, Python {platform.python_version()}"


def write_section(name: str, title: str, command: str, body: str) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine_description()}  \nRun: {stamp}\n\n"
        f"{body.rstrip()}\n<!-- /bench:{name} -->\n"
    )
    old = open(PATH).read() if os.path.exists(PATH) else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    new = pattern.sub(lambda _m: text, old) if pattern.search(old) else old.rstrip() + "\n\n" + text
    tmp = PATH + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, PATH)
