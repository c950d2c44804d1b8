#!/usr/bin/env python
"""Time and peak memory of tools/convert_checkpoint.py on a Qwen3-0.6B-shaped checkpoint, both ways.

The HF checkpoint (random bf16 weights, tied embeddings, one model.safetensors like the released
Qwen3-0.6B) is generated here, tensor by tensor. Each conversion runs as its own subprocess; its
peak memory is that process's resident-set high-water mark (os.wait4 rusage ru_maxrss).
Usage: python benchmarks/bench_convert.py [--preset qwen3-0.6b] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.report import write_section  # noqa: E402
from megatron_spot.checkpoint.safetensors_io import SafetensorsCheckpoint, write_safetensors  # noqa: E402
from megatron_spot.models.gpt.state_dict import hf_shapes  # noqa: E402
from megatron_spot.models import all_presets, config_from_hf_dict  # noqa: E402

GiB = 2**30


def make_hf_checkpoint(folder: str, preset: str, layers: int | None = None) -> int:
    cfg_dict = dict(all_presets()[preset], torch_dtype="bfloat16")
    if layers:  # the full-size shapes of every tensor, fewer layers (a 70B-shaped checkpoint that fits here)
        cfg_dict["num_hidden_layers"] = layers
    cfg = config_from_hf_dict(cfg_dict)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    gen = torch.Generator().manual_seed(0)
    items = [(n, torch.bfloat16, s) for n, s in hf_shapes(cfg).items()]

    def produce(name):
        shape = dict((n, s) for n, _, s in items)[name]
        rows = shape[0]
        step = max(1, (32 * 2**20) // max(1, math.prod(shape[1:]) * 2))
        for r in range(0, rows, step):
            block = torch.randn((min(step, rows - r), *shape[1:]), generator=gen) * 0.02
            if "norm" in name:
                block += 1.0
            yield block.to(torch.bfloat16)

    return write_safetensors(os.path.join(folder, "model.safetensors"), items, produce)


def measure(cmd: list[str]) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / GiB, out


def bit_exact(a_dir: str, b_dir: str) -> bool:
    with SafetensorsCheckpoint(a_dir) as a, SafetensorsCheckpoint(b_dir) as b:
        if set(a.names()) != set(b.names()):
            return False
        return all(torch.equal(a.read(n), b.read(n)) for n in a.names())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-0.6b", help="model preset of any family (shapes of its tensors)")
    ap.add_argument("--layers", type=int, default=None,
                    help="keep only this many layers (e.g. 2 for a llama3.1-70b-shaped checkpoint that fits in memory)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    shaped = args.preset + (f" ({args.layers} layers)" if args.layers else "")
    tied = config_from_hf_dict(all_presets()[args.preset]).tie_word_embeddings
    hf, mc, back = (os.path.join(work, d) for d in ("hf", "mcore", "hf-export"))
    for d in (mc, back):
        shutil.rmtree(d, ignore_errors=True)
    try:
        t = time.perf_counter()
        nbytes = make_hf_checkpoint(hf, args.preset, args.layers)
        print(f"generated {shaped}-shaped bf16 checkpoint: {nbytes / GiB:.2f} GiB in {time.perf_counter() - t:.1f} s",
              flush=True)
        tool = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]
        # baseline: the same interpreter importing what the converter imports, converting nothing
        base_wall, base_rss, _ = measure([sys.executable, "-c", "import megatron.core, transformers, "
                                          "megatron_spot.checkpoint.hf_convert"])
        runs = {}
        for name, cmd in (("hf-to-mcore", tool + ["hf-to-mcore", "--hf", hf, "--out", mc, "--dtype", "bf16", "--no-progress"]),
                          ("mcore-to-hf", tool + ["mcore-to-hf", "--ckpt", mc, "--out", back, "--no-progress"])):
            wall, rss, out = measure(cmd)
            conv = re.search(r" in ([0-9.]+) s ->", out)
            runs[name] = (wall, rss, float(conv.group(1)) if conv else float("nan"))
            print(f"{name}: {wall:.1f} s wall ({runs[name][2]:.1f} s converting), peak RSS {rss:.2f} GiB", flush=True)
        exact = bit_exact(hf, back)
        print(f"round trip bit-exact: {exact}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    size = nbytes / GiB
    rows = "\n".join(
        f"| {name} | {wall:.1f} | {conv:.1f} | {rss:.2f} | {rss - size:+.2f} |"
        for name, (wall, rss, conv) in runs.items())
    body = (
        f"{shaped}-shaped checkpoint, random bf16 weights, {'tied' if tied else 'untied'} embeddings: {nbytes / 1e9:.2f} GB "
        f"({size:.2f} GiB) of weights in one model.safetensors; converted to a bf16 dist checkpoint and back.\n\n"
        "| direction | command wall time (s) | inside the call (s) | peak RSS (GiB) | peak RSS - model size (GiB) |\n"
        "|---|---|---|---|---|\n"
        f"{rows}\n\n"
        "Wall time is the whole command; \"inside the call\" is the library's own timing (from entering "
        "convert_*, so it includes importing Megatron-Core and starting its world of one, ~5 s here). "
        f"Start-up alone (python importing megatron.core, transformers and the converter): {base_wall:.1f} s, "
        f"{base_rss:.2f} GiB RSS. HF -> mcore -> HF round trip bit-exact for every tensor: "
        f"{'yes' if exact else 'NO'}. Peak RSS is the converting process's resident high-water mark "
        "(os.wait4 ru_maxrss); the requirement is at most the model size + 1 GiB. "
        f"Load average when it finished: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the machine is shared; "
        "times scale with it, memory does not)."
    )
    default = args.preset == "qwen3-0.6b" and not args.layers
    key = "convert" if default else f"convert-{args.preset}" + (f"-{args.layers}l" if args.layers else "")
    command = f"python benchmarks/bench_convert.py --preset {args.preset}" + (f" --layers {args.layers}" if args.layers else "")
    write_section(key, "Checkpoint conversion (HF <-> Megatron-Core)" + ("" if default else f": {shaped}"), command, body)
    print(f"BENCHMARKS.md section '{key}' written")


if __name__ == "__main__":
    main()
