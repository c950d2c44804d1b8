"""Convert checkpoints of every registered model family (Qwen3, Qwen3-MoE, Llama 3.x) between Hugging Face and Megatron-Core dist_checkpointing (torch_dist).

  hf-to-mcore  a HF model folder (config.json + model.safetensors, or sharded with
               model.safetensors.index.json) -> a Megatron-Core checkpoint that loads at any
               TP/PP/VPP/DP layout, with config.json and the tokenizer files beside it.
  mcore-to-hf  a Megatron-Core checkpoint (from hf-to-mcore or from training) -> a HF folder
               (safetensors, at most --max-shard-size per file, with the index), config.json,
               generation_config.json and tokenizer files, loadable by transformers, vLLM, SGLang.

Examples (`spot-convert` = `python tools/convert_checkpoint.py`):
  spot-convert hf-to-mcore --hf /models/Qwen3-8B --out ckpt/qwen3-8b-mcore
  spot-convert mcore-to-hf --ckpt runs/spot/checkpoints/step_0000100/model \\
      --out export/qwen3-8b-spot --dtype bf16

Conversions stream tensors: peak memory is about the model's size in its dtype plus ~1 GiB
(Qwen3-8B in bf16 converts on a 24 GiB machine). Outputs are written under <out>.tmp-* and
renamed when complete, so an interrupted run leaves no folder that looks like a checkpoint.
Exit codes (megatron_spot/cli): 0 ok, 2 bad input (a CheckpointError: bad path, tensors, layout, output over
input), 1 failure (an OS error while writing, e.g. a full disk), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from megatron_spot.cli import BAD_INPUT, FAILURE, INTERRUPTED, OK


def _size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (> 0)."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower()
    try:
        for unit in sorted(units, key=len, reverse=True):
            if t.endswith(unit):
                value = int(float(t[: -len(unit)]) * units[unit])
                break
        else:
            value = int(t)
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a size > 0 such as 5GB, 500MB or 2GiB, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 on success; 2 on bad flags or input (missing/unexpected tensors, shape mismatch, "
               "corrupt file, weights holding NaN/Inf, unsupported architecture, an output that exists, is a file "
               "or cannot be written: all checked before any work); 1 on an OS error while writing (a full disk); "
               "130 interrupted.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{hf-to-mcore,mcore-to-hf}")
    a = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> Megatron-Core dist checkpoint",
                       description="Convert a HF folder (Qwen3, Qwen3-MoE, Llama 3.x; the family comes from config.json) into a Megatron-Core dist checkpoint (torch_dist).")
    a.add_argument("--hf", required=True, metavar="DIR", help="HF checkpoint folder (config.json + *.safetensors)")
    a.add_argument("--out", required=True, metavar="DIR", help="output checkpoint folder (must not exist unless --force)")
    a.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"],
                   help="dtype of the stored weights (default: the source's, so fp32 round-trips bit-exact; "
                        "a change of precision is reported)")
    b = sub.add_parser("mcore-to-hf", help="Megatron-Core dist checkpoint -> Hugging Face folder",
                       description="Export a Megatron-Core model checkpoint as a HF folder of its family.")
    b.add_argument("--ckpt", required=True, metavar="DIR",
                   help="model checkpoint folder (hf-to-mcore output, or <run>/checkpoints/step_N/model)")
    b.add_argument("--out", required=True, metavar="DIR", help="output HF folder (must not exist unless --force)")
    b.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"],
                   help="dtype of the exported weights (default: the checkpoint's dtype)")
    b.add_argument("--max-shard-size", type=_size, default=5 * 10**9, metavar="BYTES",
                   help="largest safetensors file, e.g. 5GB (default), 2GB, 500MB; one file -> model.safetensors")
    for p in (a, b):
        p.add_argument("--force", action="store_true", help="replace an existing output folder")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megatron_spot.checkpoint.hf_convert import convert_hf_to_mcore, convert_mcore_to_hf, summary_line
    from megatron_spot.checkpoint.model_checkpoint import check_output_dir as check_checkpoint_output
    from megatron_spot.config.loader import ConfigError
    from megatron_spot.utils.output_paths import OutputPathError, check_output_dir

    try:
        # before reading or loading anything: an output that exists (without --force), is or holds the
        # input, is a file or cannot be written (the folder is published by a rename: its parent too)
        check_output_dir(args.out, "--out", published_whole=True)
        check_checkpoint_output(args.out, args.force, inputs=[args.hf if args.command == "hf-to-mcore" else args.ckpt])
        if args.command == "hf-to-mcore":
            summary = convert_hf_to_mcore(args.hf, args.out, dtype=args.dtype, progress=not args.no_progress,
                                          overwrite=args.force)
        else:
            summary = convert_mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, progress=not args.no_progress,
                                          max_shard_bytes=args.max_shard_size, overwrite=args.force)
        if args.no_progress:  # with the bar on, the library already printed it
            print(summary_line(args.command, summary), flush=True)
    except (ConfigError, OutputPathError) as exc:  # CheckpointError is a ConfigError: a user-fixable input problem
        print(f"convert_checkpoint {args.command}: error: {exc}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"convert_checkpoint {args.command}: interrupted; no output was written", file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:
        print(f"convert_checkpoint {args.command}: error: {exc}", file=sys.stderr)
        return FAILURE
    return OK


if __name__ == "__main__":
    sys.exit(main())
