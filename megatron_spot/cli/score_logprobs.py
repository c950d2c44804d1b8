"""Compute reference log-probs of every packed pair with the frozen starting model.

    torchrun --nproc-per-node N -m megatron_spot.cli.score_logprobs --config examples/qwen3_8b_spot.yaml \
        data.pack=data/pairs model.init_checkpoint=ckpt/qwen3-8b-mcore

Uses the same recipe/overrides as training (any TP/PP/DP layout; the layout need not match
training's). Writes <pack>.ref_logps.npy/.json (or data.ref_logprobs), which training checks
against the pack's fingerprint. Sequence log-prob = sum over response tokens (EOS included).
`spot-score` and `tools/score_logprobs.py` are the same command. Exit codes (megatron_spot/cli): 0 ok,
2 bad input (config, pack, checkpoint, layout), 1 failure, 130 interrupted.
"""
import argparse
import os
import sys

from megatron_spot.cli import BAD_INPUT, INTERRUPTED, OK


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
        return BAD_INPUT
    except KeyboardInterrupt:
        print("score_logprobs: interrupted; no sidecar was written", file=sys.stderr)
        return INTERRUPTED
    finally:
        try:
            shutdown()
        except Exception:
            pass
    return OK


if __name__ == "__main__":
    sys.exit(main())
