"""Throughput profiling: run N SPoT training steps on synthetic pairs and compare with the analytical model.

  # one layout (a world of one, or under torchrun: world = tp x pp x dp)
  spot-profile --preset qwen3-tiny --steps 5 --seq-length 128 --json prof.json
  torchrun --nproc-per-node 4 -m megatron_spot.cli.profile_throughput --preset qwen3-tiny --tp 2 --pp 2
  # several layouts: one torchrun per layout, Markdown + CSV table and a PNG plot
  spot-profile --preset qwen3-tiny --sweep 1x1,2x1,1x2,2x2 --sweep-mbs 1,2 --out-dir sweep/
  # prediction only (no processes started): Qwen3-8B on 8x H100
  spot-profile --preset qwen3-8b --gpu H100 --nodes 1 --gpus-per-node 8 --tp 1 --pp 1 \
      --precision bf16 --seq-length 2048 --micro-batch-size 1 --num-micro-batches 4 --predict-only
  # a training recipe as it stands (model, layout, precision, recompute, batch), with key=value overrides
  spot-profile --config examples/qwen3_8b_spot.yaml --gpu H100 --predict-only data.micro_batch_size=2

With --config, the recipe supplies every setting the model, layout and batch flags describe
(model.preset / hf_config or the architecture of model.init_checkpoint when that folder exists, parallel.*, precision.*,
recompute.*, data.seq_length, data.micro_batch_size, model.fused_linear_loss, the micro-batches
per step = data.global_batch_size / (micro_batch_size x DP), and for --predict-only the world: world.nodes x
world.gpus_per_node); key=value overrides apply on top, the same dotted keys training takes, and a flag given
explicitly wins over both. The prediction names the world it answers for and where it came from.
For an MoE model it also turns the all-to-all volume into seconds (--intra-node-bandwidth inside a node,
--inter-node-bandwidth for what crosses nodes) and gives the step time with it added, unoverlapped.
Profiling always uses random weights and synthetic full-length pairs: the recipe's data.pack, reference
log-probs and checkpoint weights are not read.

`tools/profile_throughput.py` is the same command. The layout and micro-batch counts come from
training/plan.py's plan_run (the same checks as training); formatting is profiling/report.py's.
Exit codes (megatron_spot/cli): 0 ok, 2 bad input (unknown preset/GPU, layout that does not fit), 1 a run
failed, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile

import megatron_spot
from megatron_spot.cli import BAD_INPUT, FAILURE, INTERRUPTED, OK
from megatron_spot.cli.args import (non_negative_int, positive_float, positive_int, positive_int_list, step_range,
                                    unit_fraction)
from megatron_spot.profiling.report import GiB, markdown_table, print_prediction, print_report, sweep_row, write_sweep_tables

# the checkout holding the package, for torchrun children of an uninstalled tree
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(megatron_spot.__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="RECIPE.yaml",
                   help="a training recipe: its model, layout, precision, recompute and batch are profiled "
                        "(see below); flags given explicitly override it")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the recipe, as for training (needs --config), e.g. "
                        "parallel.tensor_parallel=4 data.micro_batch_size=2")
    p.add_argument("--preset", default=None, help="model preset of any family (qwen3-8b, llama3.1-8b-instruct, ...; README \"Model families\") or a HF config.json/folder (default qwen3-tiny)")
    p.add_argument("--tp", type=positive_int, default=None, help="tensor parallel size (default 1)")
    p.add_argument("--pp", type=positive_int, default=None, help="pipeline parallel size (default 1)")
    p.add_argument("--vpp", type=positive_int, default=None, help="virtual pipeline stages per rank (interleaved 1F1B)")
    p.add_argument("--dp", type=positive_int, default=None, help="data parallel size (default: world / (tp*pp))")
    p.add_argument("--steps", type=positive_int, default=5, help="measured training steps (default 5)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=1, help="steps run first and not measured (default 1)")
    p.add_argument("--seq-length", type=positive_int, default=None,
                   help="tokens per sequence (chosen and rejected each; default 128)")
    p.add_argument("--micro-batch-size", type=positive_int, default=None, help="pairs per micro-batch (2 sequences each; "
                                                                       "default 1)")
    p.add_argument("--num-micro-batches", type=positive_int, default=None, help="per DP rank and step (default: max(pp, 2))")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16", "fp8"],
                   help="default: fp32 on CPU, bf16 on GPU; fp8 = bf16 + Transformer Engine FP8 GEMMs")
    p.add_argument("--recompute", default=None, choices=["none", "selective", "full"],
                   help="activation recompute (default none): selective = core attention, full = whole layers")
    p.add_argument("--sequence-parallel", action="store_true", default=None,
                   help="Megatron sequence parallelism (Transformer Engine, TP > 1)")
    p.add_argument("--json", default=None, help="write the aggregate report here")
    p.add_argument("--trace", default=None, metavar="DIR", help="torch.profiler Chrome traces (one per rank)")
    p.add_argument("--trace-steps", type=step_range, default=None, metavar="A:B",
                   help="measured steps [A, B) to trace, 0 <= A < B <= --steps (default 0:2, or 0:1 with --steps 1)")
    p.add_argument("--sweep", default=None, help="layouts TPxPP[xDP], comma separated, e.g. 1x1,2x1,1x2,2x2: each is run under torchrun "
                   "and measured (not with --predict-only, which predicts one layout)")
    p.add_argument("--sweep-mbs", type=positive_int_list, default=None, help="micro-batch sizes to sweep, comma separated")
    p.add_argument("--out-dir", default="profile_sweep", help="sweep outputs (table.md, table.csv, plot.png)")
    p.add_argument("--gpu", default=None, help="GPU for MFU/prediction (H100, H200, A100, B200, ...)")
    p.add_argument("--nodes", type=positive_int, default=None,
                   help="predict-only: nodes in the cluster (default: the recipe's world.nodes, else 1)")
    p.add_argument("--gpus-per-node", type=positive_int, default=None,
                   help="predict-only: GPUs per node (default: the recipe's world.gpus_per_node, else 8)")
    p.add_argument("--intra-node-bandwidth", type=positive_float, default=None, metavar="GB/s",
                   help="predict-only, MoE: GPU-to-GPU bandwidth inside a node, per GPU and direction, for the "
                        "all-to-all time (default: the --gpu's NVLink, e.g. 450 for H100)")
    p.add_argument("--inter-node-bandwidth", type=positive_float, default=None, metavar="GB/s",
                   help="predict-only, MoE: network bandwidth between nodes per GPU and direction, for the "
                        "all-to-all share that leaves the node (default 50 = one 400 Gb/s NIC per GPU)")
    p.add_argument("--assumed-mfu", type=unit_fraction, default=None,
                   help="predict-only: fraction of peak the matmuls reach (default 0.40 BF16, 0.30 of FP8 peak)")
    p.add_argument("--predict-only", action="store_true", help="print the analytical prediction, run nothing")
    p.add_argument("--no-flop-count", action="store_true", help="skip the FlopCounterMode step")
    p.add_argument("--unfused-loss-head", action="store_true", default=None,
                   help="model.fused_linear_loss=false: Megatron's output layer + token_logprobs. The measured "
                        "FLOPs then equal the analytical count; the fused head (default) runs its GEMMs only on "
                        "response tokens and one of them inside a custom op FlopCounterMode cannot see")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random weights and synthetic pairs")
    return p.parse_args(argv)


# flag -> (the recipe's value, the default without a recipe)
_RECIPE_FIELDS = {
    "tp": (lambda c: c.parallel.tensor_parallel, 1),
    "pp": (lambda c: c.parallel.pipeline_parallel, 1),
    "vpp": (lambda c: c.parallel.virtual_pipeline, None),
    "sequence_parallel": (lambda c: c.parallel.sequence_parallel, False),
    "seq_length": (lambda c: c.data.seq_length, 128),
    "micro_batch_size": (lambda c: c.data.micro_batch_size, 1),
    "precision": (lambda c: "fp8" if c.precision.fp8 else c.precision.dtype, None),
    "recompute": (lambda c: c.recompute.granularity or "none", None),
    "unfused_loss_head": (lambda c: not c.model.fused_linear_loss, False),
}


def resolve_recipe(args):
    """Fill every flag left unset from the recipe (--config + overrides) or the defaults; returns the
    recipe (a TrainConfig, the base of the profiled run's config) or None."""
    from megatron_spot.config import ConfigError, TrainConfig, load_config

    if args.overrides and not args.config:
        raise ConfigError(f"key=value overrides ({args.overrides[0]}) need --config RECIPE.yaml")
    recipe = load_config(TrainConfig, args.config, args.overrides) if args.config else None
    for name, (from_recipe, default) in _RECIPE_FIELDS.items():
        if getattr(args, name) is None:
            setattr(args, name, from_recipe(recipe) if recipe is not None else default)
    if args.preset is None:
        args.preset = "qwen3-tiny"
        if recipe is not None:
            ckpt = recipe.model.init_checkpoint
            # the architecture the recipe trains: its checkpoint's when that folder is here (a converted
            # checkpoint carries the HF config.json beside its shards)
            args.preset = ckpt if ckpt and os.path.isdir(ckpt) else (recipe.model.hf_config or recipe.model.preset)
    if recipe is not None and recipe.parallel.context_parallel > 1 and not args.predict_only:
        raise ConfigError(f"parallel.context_parallel={recipe.parallel.context_parallel}: profiling runs use padded "
                          "synthetic rows, not packed ones; use --predict-only or parallel.context_parallel=1")
    return recipe


def check_outputs_and_trace(args) -> None:
    """Before anything runs: every path this run writes (utils/output_paths) and the traced steps."""
    from megatron_spot.config.loader import ConfigError
    from megatron_spot.utils.output_paths import check_output_dir, check_output_file

    if args.sweep and args.predict_only:
        raise ConfigError("--sweep measures each layout under torchrun and --predict-only predicts one layout "
                          "(--tp/--pp or the recipe's) without running: drop one of them")
    if args.json:
        check_output_file(args.json, "--json")
    if args.sweep and not args.predict_only:
        check_output_dir(args.out_dir, "--out-dir")
    if args.trace and not args.predict_only:
        check_output_dir(args.trace, "--trace")
        if args.trace_steps is None:
            args.trace_steps = (0, min(args.steps, 2))
        elif args.trace_steps[1] > args.steps:
            raise ConfigError(f"--trace-steps {args.trace_steps[0]}:{args.trace_steps[1]} goes past the {args.steps} "
                              f"measured steps (--steps {args.steps}); the trace would never be written")


def fail(msg: str, code: int = BAD_INPUT):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def _precision(args, on_gpu: bool):
    prec = args.precision or ("bf16" if on_gpu else "fp32")
    return ("bf16", True) if prec == "fp8" else (prec, False)


def _layout(args, model_cfg, world: int, on_gpu: bool, recipe=None):
    """(TrainConfig, analytical StepShape) of the run the arguments describe (on top of `recipe` when
    given), checked by plan_run."""
    import copy

    from megatron_spot.config.loader import ConfigError
    from megatron_spot.config.schema import TrainConfig
    from megatron_spot.platform import Layout
    from megatron_spot.profiling.analytical import StepShape
    from megatron_spot.training.plan import plan_run

    dtype, fp8 = _precision(args, on_gpu)
    cfg = copy.deepcopy(recipe) if recipe is not None else TrainConfig()
    cfg.model.preset, cfg.model.hf_config, cfg.model.init_checkpoint = args.preset, None, None  # random weights
    cfg.model.max_sequence_length = max(args.seq_length, 128, cfg.model.max_sequence_length if recipe else 0)
    par = cfg.parallel
    par.tensor_parallel, par.pipeline_parallel, par.virtual_pipeline = args.tp, args.pp, args.vpp
    par.sequence_parallel = bool(args.sequence_parallel)
    cfg.recompute.granularity = None if args.recompute in (None, "none") else args.recompute
    cfg.precision.dtype = dtype
    cfg.data.micro_batch_size, cfg.data.seq_length = args.micro_batch_size, args.seq_length
    cfg.data.packing = False  # synthetic full-length rows: no padding to remove
    cfg.model.fused_linear_loss = not args.unfused_loss_head
    cfg.precision.fp8 = "hybrid" if fp8 else None
    lay = Layout.from_config(cfg.parallel, world, allow_context_parallel=on_gpu or args.predict_only)
    if args.dp is not None and args.dp != lay.dp:
        raise ConfigError(f"--dp {args.dp} does not match world size {world} / (tp x pp x cp = "
                          f"{args.tp * args.pp * lay.cp}) = {lay.dp}")
    if args.num_micro_batches:
        cfg.data.global_batch_size = args.micro_batch_size * lay.dp * args.num_micro_batches
    elif recipe is None:
        cfg.data.global_batch_size = args.micro_batch_size * lay.dp * max(args.pp, 2)
    # else: the recipe's global batch, so its micro-batches per step = global / (micro-batch x DP)
    checked = cfg
    if args.predict_only:  # FP8/SP need TE here; a prediction for a GPU cluster must not check this box
        checked = copy.deepcopy(cfg)
        checked.parallel.sequence_parallel, checked.precision.fp8 = False, None
    # (an MoE model trains at TP > 1 only with sequence parallel: requested here, that is the GPU's to check)
    plan = plan_run(checked, world, model=model_cfg,
                    training_rules=not (args.predict_only and cfg.parallel.sequence_parallel))
    m = plan.micro_batches_per_step
    if args.vpp and args.vpp > 1 and m % args.pp:
        raise ConfigError(f"interleaved pipelines need --num-micro-batches ({m}) divisible by --pp ({args.pp})")
    layout = StepShape(tp=plan.layout.tp, pp=plan.layout.pp, vpp=args.vpp, dp=plan.layout.dp, cp=plan.layout.cp,
                       ep=plan.layout.ep, etp=plan.layout.etp, micro_batch_size=plan.micro_batch_size, num_micro_batches=m, seq_length=args.seq_length,
                       dtype=dtype, fp8=fp8, recompute=cfg.recompute.granularity,
                       sequence_parallel=bool(args.sequence_parallel),
                       distributed_optimizer=cfg.parallel.use_distributed_optimizer, flash_attention=on_gpu,
                       fused_linear_loss=cfg.model.fused_linear_loss)
    return cfg, layout


def resolve_world(args, recipe=None) -> dict:
    """The world a prediction answers for: each of --nodes / --gpus-per-node when given, else the recipe's
    world.nodes / world.gpus_per_node when it states them, else 1 node x 8 GPUs; with where each came from."""
    from megatron_spot.platform.layout import stated_world

    stated = stated_world(recipe.world) if recipe is not None else (None, None)
    out, kinds = {}, []
    for (name, default), from_recipe in zip((("nodes", 1), ("gpus_per_node", 8)), stated):
        given = getattr(args, name)
        out[name], kind = ((given, "flag") if given is not None else (from_recipe, "recipe") if from_recipe is not None
                           else (default, "default"))
        kinds.append(kind)
    out["size"] = out["nodes"] * out["gpus_per_node"]
    both = {"flag": "--nodes/--gpus-per-node", "recipe": "the recipe's world: section",
            "default": "the default: no --nodes/--gpus-per-node, no world: in the recipe"}
    one = {"flag": ("--nodes", "--gpus-per-node"), "recipe": ("world.nodes", "world.gpus_per_node"),
           "default": ("the default", "the default")}
    out["source"] = both[kinds[0]] if kinds[0] == kinds[1] else \
        f"nodes from {one[kinds[0]][0]}, GPUs per node from {one[kinds[1]][1]}"
    return out


def predict_only(args, model_cfg, recipe=None) -> dict:
    from megatron_spot.profiling.analytical import predict
    from megatron_spot.profiling.hardware import INTER_NODE_GB_S, gpu_spec, peak_tflops

    if not args.gpu:
        fail("--predict-only needs --gpu (one of the known GPUs, e.g. H100)")
    spec = gpu_spec(args.gpu)
    world = resolve_world(args, recipe)
    args.predict_only = True
    _, layout = _layout(args, model_cfg, world["size"], on_gpu=True, recipe=recipe)
    peak = peak_tflops(args.gpu, layout.fp8)
    mfu = args.assumed_mfu or (0.30 if layout.fp8 else 0.40)
    pred = predict(model_cfg, layout, peak_tflops=peak, assumed_mfu=mfu, gpus_per_node=world["gpus_per_node"],
                   intra_node_gb_s=args.intra_node_bandwidth or spec["intra_node_gb_s"],
                   inter_node_gb_s=args.inter_node_bandwidth or INTER_NODE_GB_S)
    d = pred.as_dict()
    d.update(gpu=spec["name"], gpu_memory_gib=spec["memory_gib"], world_size=world["size"], world=world)
    cap = spec["memory_gib"] * GiB
    d["fits"] = pred.memory["peak"]["total"] <= cap
    return d


def _torchrun(args, world: int, extra: list[str], json_path: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "megatron_spot.cli.profile_throughput", *extra, "--json", json_path]
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
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
    if args.unfused_loss_head:
        out.append("--unfused-loss-head")
    if args.sequence_parallel:
        out.append("--sequence-parallel")
    if args.config:  # the rest of the recipe (optimizer sharding, recompute method, ...) reaches the ranks too
        out += ["--config", args.config, *args.overrides]
    return out


def sweep(args, model_cfg, recipe=None) -> list[dict]:
    from megatron_spot.config.loader import ConfigError

    layouts = []
    for item in args.sweep.split(","):
        parts = item.strip().lower().split("x")
        try:
            tp, pp, dp = (int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 1)
        except (ValueError, IndexError):
            raise ConfigError(f"--sweep entry {item!r}: expected TPxPP or TPxPPxDP, e.g. 2x1") from None
        layouts.append((tp, pp, dp))
    mbs_list = args.sweep_mbs or [args.micro_batch_size]
    # check every layout before starting anything
    for tp, pp, dp in layouts:
        a = argparse.Namespace(**{**vars(args), "tp": tp, "pp": pp, "dp": dp, "predict_only": False})
        _layout(a, model_cfg, tp * pp * dp, on_gpu=False, recipe=recipe)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_spot.config.loader import ConfigError
    from megatron_spot.models import load_model_config

    from megatron_spot.utils.output_paths import OutputPathError

    try:
        check_outputs_and_trace(args)
        recipe = resolve_recipe(args)
        model_cfg = load_model_config(args.preset)
        if args.gpu:
            from megatron_spot.profiling.hardware import gpu_spec

            gpu_spec(args.gpu)
        if args.predict_only:
            d = predict_only(args, model_cfg, recipe)
            print_prediction(d, model_cfg)
            if args.json:
                _write_json(args.json, d)
            if not d["fits"]:
                fail(f"layout does not fit: predicted {d['memory']['peak']['total'] / GiB:.1f} GiB per GPU > "
                     f"{d['gpu_memory_gib']} GiB on {d['gpu']}; raise --tp/--pp, lower --micro-batch-size or "
                     f"--seq-length, or use --recompute full/selective")
            return OK
        if args.sweep:
            rows = sweep(args, model_cfg, recipe)
            print(markdown_table(rows))
            print(f"wrote {args.out_dir}/table.md, table.csv, plot.png")
            return FAILURE if any("error" in r for r in rows) else OK
        from megatron_spot.platform.device import has_cuda

        world = int(os.environ.get("WORLD_SIZE", "0"))
        want = args.tp * args.pp * (args.dp or 1)
        if world == 0 and want > 1:  # not under torchrun: launch one
            jpath = args.json or tempfile.mktemp(suffix=".json")
            argv_rest = _passthrough(args) + ["--tp", str(args.tp), "--pp", str(args.pp),
                                              "--micro-batch-size", str(args.micro_batch_size)]
            if args.trace:
                argv_rest += ["--trace", args.trace, "--trace-steps", "{}:{}".format(*args.trace_steps)]
            _layout(args, model_cfg, want, on_gpu=has_cuda(), recipe=recipe)
            proc = _torchrun(args, want, argv_rest, jpath)
            sys.stdout.write(proc.stdout)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-5000:])
                return FAILURE
            return OK
        world = world or 1
        cfg, layout = _layout(args, model_cfg, world, on_gpu=has_cuda(), recipe=recipe)
    except (ConfigError, OutputPathError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        print("profile_throughput: interrupted", file=sys.stderr)
        return INTERRUPTED
    from megatron_spot.profiling.runner import run_profile

    trace_steps = args.trace_steps if args.trace else None
    report = run_profile(cfg, model_cfg, steps=args.steps, warmup_steps=args.warmup_steps,
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
    return OK


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from megatron_spot.utils.atomic import atomic_file

    with atomic_file(path) as f:
        json.dump(obj, f, indent=1, default=float)


if __name__ == "__main__":
    sys.exit(main())
