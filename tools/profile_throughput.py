#!/usr/bin/env python
"""Throughput profiling: run N SPoT training steps on synthetic pairs and compare with the analytical model.

  # one layout (a world of one, or under torchrun: world = tp x pp x dp)
  python tools/profile_throughput.py --preset qwen3-tiny --steps 5 --seq-length 128 --json prof.json
  torchrun --nproc-per-node 4 tools/profile_throughput.py --preset qwen3-tiny --tp 2 --pp 2
  # several layouts: one torchrun per layout, Markdown + CSV table and a PNG plot
  python tools/profile_throughput.py --preset qwen3-tiny --sweep 1x1,2x1,1x2,2x2 --sweep-mbs 1,2 --out-dir sweep/
  # prediction only (no processes started): Qwen3-8B on 8x H100
  python tools/profile_throughput.py --preset qwen3-8b --gpu H100 --nodes 1 --gpus-per-node 8 --tp 1 --pp 1 \
      --precision bf16 --seq-length 2048 --micro-batch-size 1 --num-micro-batches 4 --predict-only

Exit codes: 0 ok, 2 bad input (unknown preset/GPU, layout that does not fit), 1 a run failed.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GiB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-tiny", help="model preset or HF config.json/folder")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved 1F1B)")
    p.add_argument("--dp", type=int, default=None, help="data parallel size (default: world / (tp*pp))")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sequence (chosen and rejected each)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch (2 sequences each)")
    p.add_argument("--num-micro-batches", type=int, default=None, help="per DP rank and step (default: max(pp, 2))")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16", "fp8"],
                   help="default: fp32 on CPU, bf16 on GPU; fp8 = bf16 + Transformer Engine FP8 GEMMs")
    p.add_argument("--recompute", default=None, choices=["none", "selective", "full"])
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--json", default=None, help="write the aggregate report here")
    p.add_argument("--trace", default=None, metavar="DIR", help="torch.profiler Chrome traces (one per rank)")
    p.add_argument("--trace-steps", default="0:2", metavar="A:B", help="measured steps [A, B) to trace")
    p.add_argument("--sweep", default=None, help="layouts TPxPP[xDP], comma separated, e.g. 1x1,2x1,1x2,2x2")
    p.add_argument("--sweep-mbs", default=None, help="micro-batch sizes to sweep, comma separated")
    p.add_argument("--out-dir", default="profile_sweep", help="sweep outputs (table.md, table.csv, plot.png)")
    p.add_argument("--gpu", default=None, help="GPU for MFU/prediction (H100, H200, A100, B200, ...)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--assumed-mfu", type=float, default=None,
                   help="predict-only: fraction of peak the matmuls reach (default 0.40 BF16, 0.30 of FP8 peak)")
    p.add_argument("--predict-only", action="store_true", help="print the analytical prediction, run nothing")
    p.add_argument("--no-flop-count", action="store_true", help="skip the FlopCounterMode step")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def _precision(args, on_gpu: bool):
    prec = args.precision or ("bf16" if on_gpu else "fp32")
    return ("bf16", True) if prec == "fp8" else (prec, False)


def _layout(args, qwen3, world: int, on_gpu: bool):
    from megatron_spot.config.loader import ConfigError
    from megatron_spot.config.schema import ParallelConfig, PrecisionConfig, RecomputeConfig
    from megatron_spot.models.qwen3 import validate_model_layout
    from megatron_spot.platform import validate_parallel_layout
    from megatron_spot.profiling.analytical import Layout

    dtype, fp8 = _precision(args, on_gpu)
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vpp,
                              sequence_parallel=args.sequence_parallel)
    recompute = RecomputeConfig(granularity=None if args.recompute in (None, "none") else args.recompute)
    validate_parallel_layout(parallel, world)
    mp = args.tp * args.pp
    dp = world // mp
    if args.dp is not None and args.dp != dp:
        raise ConfigError(f"--dp {args.dp} does not match world size {world} / (tp x pp = {mp}) = {dp}")
    precision = PrecisionConfig(dtype=dtype)
    if not args.predict_only:  # FP8/SP need TE here; a prediction for a GPU cluster must not check this box
        precision.fp8 = "hybrid" if fp8 else None
        validate_model_layout(qwen3, parallel, precision, recompute, world)
    else:
        validate_model_layout(qwen3, ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp,
                                                    virtual_pipeline=args.vpp), PrecisionConfig(dtype=dtype),
                              recompute, world)
    m = args.num_micro_batches or max(args.pp, 2)
    if args.vpp and args.vpp > 1 and m % args.pp:
        raise ConfigError(f"interleaved pipelines need --num-micro-batches ({m}) divisible by --pp ({args.pp})")
    layout = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp, dp=dp, micro_batch_size=args.micro_batch_size,
                    num_micro_batches=m, seq_length=args.seq_length, dtype=dtype, fp8=fp8,
                    recompute=recompute.granularity, sequence_parallel=args.sequence_parallel,
                    flash_attention=on_gpu)
    return parallel, precision, recompute, layout


def predict_only(args, qwen3) -> dict:
    from megatron_spot.profiling.analytical import predict
    from megatron_spot.profiling.hardware import gpu_spec, peak_tflops

    if not args.gpu:
        fail("--predict-only needs --gpu (one of the known GPUs, e.g. H100)")
    spec = gpu_spec(args.gpu)
    world = args.nodes * args.gpus_per_node
    args.predict_only = True
    _, _, _, layout = _layout(args, qwen3, world, on_gpu=True)
    peak = peak_tflops(args.gpu, layout.fp8)
    mfu = args.assumed_mfu or (0.30 if layout.fp8 else 0.40)
    pred = predict(qwen3, layout, peak_tflops=peak, assumed_mfu=mfu)
    d = pred.as_dict()
    d.update(gpu=spec["name"], gpu_memory_gib=spec["memory_gib"], world_size=world)
    cap = spec["memory_gib"] * GiB
    d["fits"] = pred.memory["peak"]["total"] <= cap
    return d


def print_prediction(d: dict, qwen3) -> None:
    L = d["layout"]
    print(f"Prediction: {d.get('gpu', '?')} x {d['world_size']}, TP{L['tp']} PP{L['pp']}"
          f"{' VPP' + str(L['vpp']) if L['vpp'] else ''} DP{L['dp']}, {L['dtype']}{' + FP8' if L['fp8'] else ''}, "
          f"mbs {L['micro_batch_size']} pairs x {L['num_micro_batches']} micro-batches, seq {L['seq_length']}")
    print(f"  tokens/step {d['tokens_per_step']:,}  model FLOPs/step {d['flops_per_step']:.3e}  "
          f"bubble {d['bubble_fraction']:.1%} of compute")
    if d.get("step_time_s"):
        print(f"  at {d['assumed_mfu']:.0%} of {d['peak_tflops']:.0f} TFLOP/s: step {d['step_time_s']:.3f} s, "
              f"{d['tokens_per_s']:,.0f} tokens/s ({d['tokens_per_s'] / d['world_size']:,.0f} per GPU), "
              f"{d['tflops_per_device']:.0f} model TFLOP/s per GPU")
    for st in d["memory"]["stages"]:
        print(f"  stage {st['stage']}: weights {st['weights'] / GiB:.2f} GiB, grads {st['grads'] / GiB:.2f}, "
              f"optimizer {st['optimizer'] / GiB:.2f}, activations {st['activations'] / GiB:.2f} -> "
              f"{st['total'] / GiB:.2f} GiB")


def print_report(r: dict) -> None:
    L = r["layout"]
    print(f"Measured: TP{L['tp']} PP{L['pp']}{' VPP' + str(L['vpp']) if L['vpp'] else ''} DP{L['dp']} "
          f"({r['world_size']} ranks), {L['dtype']}, mbs {L['micro_batch_size']} pairs x "
          f"{L['num_micro_batches']}, seq {L['seq_length']}")
    for s in r["steps"]:
        mfu = f", MFU {s['mfu']:.1%}" if s.get("mfu") is not None else ""
        print(f"  step {s['step']}: {s['step_time_s']:.3f} s, {s['tokens_per_s']:,.0f} tok/s "
              f"({s['tokens_per_s_per_device']:,.0f}/device), {s['tflops_per_device']:.4f} TFLOP/s/device{mfu}")
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (unknown peak; pass --gpu)"
    print(f"  mean: {r['step_time_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s "
          f"({r['tokens_per_s_per_device']:,.0f} per device), {r['tflops_per_device']:.4f} TFLOP/s per device, "
          f"MFU {mfu} vs {r['peak_source']}"
          + (f" = {r['peak_tflops_per_device']:.3f} TFLOP/s" if r.get("peak_tflops_per_device") else ""))
    sp = r["time_split_s"]
    tot = sum(sp.values()) or 1.0
    print("  time split (mean over ranks, s/step): " + ", ".join(
        f"{k[:-2]} {v:.3f} ({v / tot:.0%})" for k, v in sp.items()))
    f = r["flops_per_step"]
    if f["measured"]:
        print(f"  FLOPs/step: measured {f['measured']:.4e}, predicted {f['predicted']:.4e} "
              f"({f['measured'] / f['predicted'] - 1:+.2%}); model FLOPs {f['model']:.4e}")
    m = r["peak_memory_bytes"]
    print(f"  peak memory (max rank): measured {m['measured'] / GiB:.4f} GiB, predicted {m['predicted'] / GiB:.4f} GiB"
          f" ({m['measured_by']})")
    pr = r["predicted"]
    print(f"  predicted bubble: {pr['bubble_fraction']:.1%} of compute ({pr['bubble_share_of_step']:.1%} of the "
          f"step); measured pipeline wait {sp.get('pipeline_bubble_s', 0) / tot:.1%} of the step")
    for mr in r["memory_per_rank"]:
        print(f"    rank {mr['rank']} (tp{mr['tp_rank']} pp{mr['pp_rank']} dp{mr['dp_rank']}): weights "
              f"{mr['weights'] / 2**20:.2f} MiB, grads {mr['grads'] / 2**20:.2f}, optimizer "
              f"{mr['optimizer'] / 2**20:.2f}, activations {mr['activation_bytes'] / 2**20:.2f}, RSS "
              f"{mr['rss_bytes'] / 2**20:.0f} MiB")


def _torchrun(args, world: int, extra: list[str], json_path: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           os.path.abspath(__file__), *extra, "--json", json_path]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _passthrough(args) -> list[str]:
    out = ["--preset", args.preset, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
           "--seq-length", str(args.seq_length), "--seed", str(args.seed)]
    for flag, val in (("--precision", args.precision), ("--recompute", args.recompute), ("--gpu", args.gpu),
                      ("--vpp", args.vpp), ("--num-micro-batches", args.num_micro_batches)):
        if val is not None:
            out += [flag, str(val)]
    if args.no_flop_count:
        out.append("--no-flop-count")
    return out


def sweep(args, qwen3) -> list[dict]:
    from megatron_spot.config.loader import ConfigError

    layouts = []
    for item in args.sweep.split(","):
        parts = item.strip().lower().split("x")
        try:
            tp, pp, dp = (int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 1)
        except (ValueError, IndexError):
            raise ConfigError(f"--sweep entry {item!r}: expected TPxPP or TPxPPxDP, e.g. 2x1") from None
        layouts.append((tp, pp, dp))
    mbs_list = [int(x) for x in (args.sweep_mbs or str(args.micro_batch_size)).split(",")]
    # check every layout before starting anything
    for tp, pp, dp in layouts:
        a = argparse.Namespace(**{**vars(args), "tp": tp, "pp": pp, "dp": dp, "predict_only": False})
        _layout(a, qwen3, tp * pp * dp, on_gpu=False)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for tp, pp, dp in layouts:
        for mbs in mbs_list:
            name = f"TP{tp}PP{pp}" + (f"DP{dp}" if dp > 1 else "") + f"_mbs{mbs}"
            jpath = os.path.join(args.out_dir, f"{name}.json")
            extra = _passthrough(args) + ["--tp", str(tp), "--pp", str(pp), "--micro-batch-size", str(mbs)]
            print(f"== {name}: torchrun x {tp * pp * dp}", flush=True)
            proc = _torchrun(args, tp * pp * dp, extra, jpath)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                rows.append({"layout": name, "error": f"exit {proc.returncode}"})
                continue
            with open(jpath) as f:
                r = json.load(f)
            rows.append(sweep_row(name, tp, pp, dp, mbs, r))
            print("   " + ", ".join(f"{k}={v}" for k, v in rows[-1].items() if k != "layout"), flush=True)
    write_sweep_tables(rows, args.out_dir)
    return rows


def sweep_row(name, tp, pp, dp, mbs, r) -> dict:
    sp = r["time_split_s"]
    return {
        "layout": name, "tp": tp, "pp": pp, "dp": dp, "mbs": mbs,
        "step_s": round(r["step_time_s"], 4), "tokens_per_s": round(r["tokens_per_s"], 1),
        "tokens_per_s_per_device": round(r["tokens_per_s_per_device"], 1),
        "tflops_per_device": round(r["tflops_per_device"], 5), "mfu": round(r["mfu"], 4) if r.get("mfu") else None,
        "flops_measured": r["flops_per_step"]["measured"], "flops_predicted": r["flops_per_step"]["predicted"],
        "mem_measured_mib": round(r["peak_memory_bytes"]["measured"] / 2**20, 2),
        "mem_predicted_mib": round(r["peak_memory_bytes"]["predicted"] / 2**20, 2),
        "bubble_predicted": round(r["predicted"]["bubble_share_of_step"], 3),
        "bubble_measured": round(sp["pipeline_bubble_s"] / max(1e-9, sum(sp.values())), 3),
        "fwd_s": round(sp["forward_s"], 4), "bwd_s": round(sp["backward_s"], 4), "loss_s": round(sp["loss_s"], 4),
        "opt_s": round(sp["optimizer_s"], 4), "comm_s": round(sp["communication_s"], 4),
    }


def markdown_table(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    head = ("| layout | mbs | s/step | tokens/s | tokens/s/device | TFLOP/s/device | MFU | FLOPs/step measured / "
            "predicted | peak mem MiB measured / predicted | bubble measured / predicted | fwd / bwd / loss / opt / "
            "comm s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in ok:
        fl = (f"{r['flops_measured']:.3e} / {r['flops_predicted']:.3e}" if r["flops_measured"] else
              f"- / {r['flops_predicted']:.3e}")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        body += (f"| {r['layout'].split('_')[0]} | {r['mbs']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['tokens_per_s_per_device']:,.0f} | {r['tflops_per_device']:.4f} | {mfu} | {fl} | "
                 f"{r['mem_measured_mib']:.2f} / {r['mem_predicted_mib']:.2f} | {r['bubble_measured']:.0%} / "
                 f"{r['bubble_predicted']:.0%} | {r['fwd_s']:.3f} / {r['bwd_s']:.3f} / {r['loss_s']:.3f} / "
                 f"{r['opt_s']:.3f} / {r['comm_s']:.3f} |\n")
    for r in rows:
        if "error" in r:
            body += f"| {r['layout']} | failed: {r['error']} |\n"
    return head + body


def write_sweep_tables(rows: list[dict], out_dir: str) -> None:
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown_table(rows))
    ok = [r for r in rows if "error" not in r]
    if ok:
        with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ok[0]))
            w.writeheader()
            w.writerows(ok)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(1, 2, figsize=(10, 4))
            labels = [r["layout"].replace("_", "\n") for r in ok]
            ax[0].bar(labels, [r["tokens_per_s"] for r in ok])
            ax[0].set_ylabel("tokens/s (all ranks)")
            ax[0].set_title("throughput")
            x = range(len(ok))
            ax[1].bar([i - 0.2 for i in x], [r["mem_measured_mib"] for r in ok], 0.4, label="measured")
            ax[1].bar([i + 0.2 for i in x], [r["mem_predicted_mib"] for r in ok], 0.4, label="predicted")
            ax[1].set_xticks(list(x), labels)
            ax[1].set_ylabel("peak memory per rank (MiB)")
            ax[1].legend()
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, "plot.png"), dpi=100)
            plt.close(fig)
        except Exception as exc:  # a plot is a convenience; the tables are the result
            print(f"warning: no plot ({exc})", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_spot.config.loader import ConfigError
    from megatron_spot.models.qwen3 import load_qwen3_config

    try:
        qwen3 = load_qwen3_config(args.preset)
        if args.gpu:
            from megatron_spot.profiling.hardware import gpu_spec

            gpu_spec(args.gpu)
        if args.predict_only:
            d = predict_only(args, qwen3)
            print_prediction(d, qwen3)
            if args.json:
                _write_json(args.json, d)
            if not d["fits"]:
                fail(f"layout does not fit: predicted {d['memory']['peak']['total'] / GiB:.1f} GiB per GPU > "
                     f"{d['gpu_memory_gib']} GiB on {d['gpu']}; raise --tp/--pp, lower --micro-batch-size or "
                     f"--seq-length, or use --recompute full/selective")
            return 0
        if args.sweep:
            rows = sweep(args, qwen3)
            print(markdown_table(rows))
            print(f"wrote {args.out_dir}/table.md, table.csv, plot.png")
            return 1 if any("error" in r for r in rows) else 0
        from megatron_spot.platform.device import has_cuda

        world = int(os.environ.get("WORLD_SIZE", "0"))
        want = args.tp * args.pp * (args.dp or 1)
        if world == 0 and want > 1:  # not under torchrun: launch one
            jpath = args.json or tempfile.mktemp(suffix=".json")
            argv_rest = _passthrough(args) + ["--tp", str(args.tp), "--pp", str(args.pp),
                                              "--micro-batch-size", str(args.micro_batch_size)]
            if args.trace:
                argv_rest += ["--trace", args.trace, "--trace-steps", args.trace_steps]
            _layout(args, qwen3, want, on_gpu=has_cuda())
            proc = _torchrun(args, want, argv_rest, jpath)
            sys.stdout.write(proc.stdout)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-5000:])
                return 1
            return 0
        world = world or 1
        parallel, precision, recompute, layout = _layout(args, qwen3, world, on_gpu=has_cuda())
    except ConfigError as exc:
        fail(str(exc))
    from megatron_spot.config.schema import TrainConfig
    from megatron_spot.profiling.runner import run_profile

    cfg = TrainConfig()
    cfg.model.preset = args.preset
    cfg.model.max_sequence_length = max(args.seq_length, 128)
    cfg.parallel, cfg.precision, cfg.recompute = parallel, precision, recompute
    cfg.data.micro_batch_size, cfg.data.seq_length = args.micro_batch_size, args.seq_length
    trace_steps = tuple(int(x) for x in args.trace_steps.split(":")) if args.trace else None
    report = run_profile(cfg, qwen3, steps=args.steps, warmup_steps=args.warmup_steps,
                         num_micro_batches=layout.num_micro_batches, trace_dir=args.trace, trace_steps=trace_steps,
                         gpu=args.gpu, count_flops=not args.no_flop_count, seed=args.seed, progress=True)
    if report is not None:
        print_report(report)
        if args.trace:
            print(f"  Chrome traces: {args.trace}/trace_rank*.json (open in chrome://tracing or Perfetto)")
        if args.json:
            _write_json(args.json, report)
    from megatron_spot.platform import shutdown

    shutdown()
    return 0


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from megatron_spot.utils.atomic import atomic_file

    with atomic_file(path) as f:
        json.dump(obj, f, indent=1, default=float)


if __name__ == "__main__":
    sys.exit(main())
