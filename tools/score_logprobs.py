#!/usr/bin/env python
"""Compute reference log-probs of every packed pair with the frozen starting model.

    torchrun --nproc-per-node N tools/score_logprobs.py --config examples/qwen3_8b_spot.yaml \
        data.pack=data/pairs model.init_checkpoint=ckpt/qwen3-8b-mcore

Uses the same recipe/overrides as training (any TP/PP/DP layout; the layout need not match
training's). Writes <pack>.ref_logps.npy/.json (or data.ref_logprobs), which training checks
against the pack's fingerprint. Sequence log-prob = sum over response tokens (EOS included).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (the same one training uses)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.pack=... ")
    parser.add_argument("--force", action="store_true",
                        help="recompute even if a sidecar for this pack and model already exists")
    args = parser.parse_args(argv)

    from megatron_spot.config import ConfigError, TrainConfig, load_config
    from megatron_spot.platform import shutdown
    from megatron_spot.training.reference import score_reference

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        path = score_reference(cfg, force=args.force)
        if path and os.environ.get("RANK", "0") == "0":
            print(f"reference log-probs: {path}")
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        try:
            shutdown()
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
