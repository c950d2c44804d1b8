"""Quantize a trained Qwen3 checkpoint with NVIDIA ModelOpt and export an HF folder vLLM/TensorRT-LLM load.

  spot-export-quantized --checkpoint runs/spot/hf --pack data/pairs --out runs/spot/hf-fp8 \
      --format fp8 --num-prompts 256
  vllm serve runs/spot/hf-fp8            # reads quantization_config (quant_method: modelopt) from config.json

--checkpoint is an HF Qwen3 folder (config.json + safetensors) or a megatron_spot Megatron checkpoint
(converted to HF in a temporary folder first). Formats: fp8 (per-tensor FP8 E4M3 weights and
activations; CPU or GPU), nvfp4 (GPU only), int4_awq (CPU or GPU; needs 128-multiple layer widths).
Exit codes (megatron_spot/cli): 0 ok, 2 bad input, 1 failure, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from megatron_spot.cli import BAD_INPUT, INTERRUPTED, OK
from megatron_spot.cli.args import positive_int


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF Qwen3 folder or megatron_spot Megatron checkpoint")
    p.add_argument("--pack", required=True, help="pack prefix (tools/pack_pairs.py output) for calibration prompts")
    p.add_argument("--out", required=True, help="output folder (written atomically; must not hold files unless --force)")
    p.add_argument("--format", default="fp8", choices=["fp8", "nvfp4", "int4_awq"])
    p.add_argument("--num-prompts", type=positive_int, default=256, help="calibration prompts (default 256)")
    p.add_argument("--max-prompt-length", type=positive_int, default=512,
                   help="calibration prompt tokens, the end of longer prompts kept (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration prompts per forward (default 8)")
    p.add_argument("--export-dtype", default="bf16", choices=["bf16", "fp16"], help="dtype of unquantized tensors")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message=".*transformers .* is not tested.*")
    from megatron_spot.platform.device import requested_device
    from megatron_spot.quantization import QuantizationError, calibration_prompts, quantize_and_export
    from megatron_spot.quantization.export import checkpoint_tokenizer_hash
    from megatron_spot.utils.output_paths import check_output_dir

    try:  # flags and paths first, before the pack or the model is read
        if args.device is not None:
            try:
                requested_device(args.device)
            except ValueError as exc:
                raise ValueError(f"--device: {exc}") from None
        check_output_dir(args.out, "--out", published_whole=True)
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
            raise ValueError(f"--out {args.out} already exists and is not empty (pass --force)")
    except ValueError as exc:  # OutputPathError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    try:
        if not os.path.exists(args.pack + ".idx") and not os.path.exists(args.pack + ".bin"):
            raise QuantizationError(f"no pack at {args.pack} (expected {args.pack}.bin/.idx from tools/pack_pairs.py)")
        if not os.path.isdir(args.checkpoint):
            raise QuantizationError(f"checkpoint folder {args.checkpoint} does not exist")
        # the pack must hold the checkpoint's token ids: its tokenizer is checked against the one
        # stored with the checkpoint (HF folder or Megatron checkpoint, both carry tokenizer files)
        expected = checkpoint_tokenizer_hash(args.checkpoint)
        if expected is None:
            logging.warning("%s stores no tokenizer files: cannot check that %s was packed with its tokenizer",
                            args.checkpoint, args.pack)
        prompts = calibration_prompts(args.pack, args.num_prompts, args.max_prompt_length,
                                      expected_tokenizer_hash=expected)
        summary = quantize_and_export(args.checkpoint, args.out, prompts, fmt=args.format,
                                      export_dtype=args.export_dtype, overwrite=args.force,
                                      batch_size=args.batch_size, device=args.device)
    except QuantizationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("export_quantized: interrupted; no output was written", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # conversion errors etc. carry their own message
        name = type(exc).__name__
        if name in ("CheckpointError", "ConfigError", "PackFormatError"):
            print(f"error: {exc}", file=sys.stderr)
            return BAD_INPUT
        raise  # anything else is a failure (exit 1) with its traceback
    print(json.dumps(summary, indent=2))
    return OK


if __name__ == "__main__":
    sys.exit(main())
