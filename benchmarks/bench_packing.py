"""Packed pairs vs today's bucketed padding: padding fraction and non-pad tokens/s, same pairs and steps.

    python benchmarks/bench_packing.py [--pairs 48] [--steps 4]      (part of `make bench`)

Synthetic set with the spread of SPoT data: prompts 50-300 tokens (uniform), responses log-normal
clipped to 200-6000 tokens. Both runs train the tiny Qwen3 (fp32, one CPU process, TP1PP1) on the
same pairs for the same steps with the same sampler (length bucketing on, micro_batch_size 1):
"padded" pads every row of a step to the step's longest sequence (what the engine does without
packing); "packed" concatenates whole pairs into rows of at most --max-tokens tokens. Then the
released recipe (Qwen3-8B, 32 pairs per step, 2 pairs per micro-batch x 8 GPUs) is costed with the
analytical model for both layouts on the same length distribution.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from report import write_section  # noqa: E402

LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def synthetic_lengths(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(50, 301, n)
    resp = np.clip(rng.lognormal(mean=np.log(900), sigma=0.8, size=(n, 2)), 200, 6000).astype(int)
    return prompt, resp


def _text(rng, n):  # every " x" is one token of the tiny tokenizer (a single-letter word)
    return " ".join(rng.choice(LETTERS, n))


def build_workspace(root: str, pairs: int) -> dict:
    import torch
    import transformers

    from megatron_spot.checkpoint.hf_convert import convert_hf_to_mcore
    from megatron_spot.data import build_tiny_tokenizer, pack_pairs
    from megatron_spot.models import load_model_config

    rng = np.random.default_rng(1)
    prompt, resp = synthetic_lengths(pairs)
    rows = [{"prompt": _text(rng, int(p)), "chosen": _text(rng, int(c) - 1), "rejected": _text(rng, int(r) - 1)}
            for p, (c, r) in zip(prompt, resp)]
    src = os.path.join(root, "pairs.jsonl")
    with open(src, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    hf = os.path.join(root, "hf")
    build_tiny_tokenizer(hf, [" ".join(LETTERS)] * 20, vocab_size=512)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    cfg = load_model_config("qwen3-tiny").to_hf_dict()
    cfg.update(eos_token_id=tok.eos_token_id, torch_dtype="float32", max_position_embeddings=8192)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg)).save_pretrained(hf)
    prefix = os.path.join(root, "pack", "pairs")
    os.makedirs(os.path.dirname(prefix))
    pack_pairs([src], hf, prefix, preset="trl", max_length=8192, max_prompt_length=4096)
    convert_hf_to_mcore(hf, os.path.join(root, "mcore"), dtype="fp32", progress=False)
    return {"root": root, "hf": hf, "pack": prefix, "mcore": os.path.join(root, "mcore")}


def train(ws: dict, name: str, steps: int, extra: list) -> list:
    from megatron_spot.config import TrainConfig, load_config
    from megatron_spot.train import run

    overrides = [f"data.pack={ws['pack']}", f"model.init_checkpoint={ws['mcore']}", f"data.tokenizer={ws['hf']}",
                 f"run.output_dir={os.path.join(ws['root'], name)}", "data.micro_batch_size=1",
                 "data.global_batch_size=8", "data.seq_length=8192", "data.pad_to_multiple_of=64",
                 "model.max_sequence_length=8192", f"run.train_steps={steps}", "run.export_hf=false",
                 "run.tensorboard=false", "precision.dtype=fp32", "optimizer.lr=1e-4", *extra]
    return run(load_config(TrainConfig, None, overrides))["history"]


def measure(pairs: int, steps: int, max_tokens: int) -> dict:
    from megatron_spot.config import TrainConfig, load_config
    from megatron_spot.training.reference import score_reference

    root = tempfile.mkdtemp(prefix="bench_packing_")
    ws = build_workspace(root, pairs)
    score_reference(load_config(TrainConfig, None, [
        f"data.pack={ws['pack']}", f"model.init_checkpoint={ws['mcore']}", f"data.tokenizer={ws['hf']}",
        "data.micro_batch_size=1", "data.seq_length=8192", "model.max_sequence_length=8192",
        "precision.dtype=fp32"]), progress=False)
    out = {}
    for name, extra in (("padded", []), ("packed", ["data.packing=true",
                                                    f"data.max_tokens_per_micro_batch={max_tokens}",
                                                    "data.pad_to_multiple_of=8"])):
        hist = train(ws, name, steps, extra)
        steady = hist[1:] or hist
        out[name] = {
            "padding_fraction": statistics.mean(h["padding_fraction"] for h in hist),
            "tokens_per_s": statistics.median(h["tokens"] / h["step_time_s"] for h in steady),
            "step_time_s": statistics.median(h["step_time_s"] for h in steady),
            "peak_memory_gib": max(h.get("peak_memory_gib", 0.0) for h in hist),
            "losses": [h["loss"] for h in hist],
        }
    return out


def predicted_recipe(max_tokens: int = 16384, pairs: int = 4000) -> dict:
    """Qwen3-8B recipe on 8x H100: executed FLOPs of padded vs packed micro-batches over 4,000 pairs."""
    from megatron_spot.data.packing import plan_packed_micro_batches
    from megatron_spot.models import load_model_config
    from megatron_spot.profiling.analytical import attention_flops_per_token
    from megatron_spot.profiling.flops import matmul_params_per_token

    cfg = load_model_config("qwen3-8b")
    n = matmul_params_per_token(cfg)
    prompt, resp = synthetic_lengths(pairs, seed=7)
    seqs = np.stack([prompt + resp[:, 0], prompt + resp[:, 1]], axis=1)  # [pairs, 2]

    def flops(tokens, length):  # fwd+bwd of `tokens` tokens attending over sequences of `length`
        return 3.0 * tokens * (2.0 * n + attention_flops_per_token(cfg, int(length), causal=True))

    rng = np.random.default_rng(0)
    order = rng.permutation(pairs)
    padded = packed = real = padded_tokens = packed_tokens = 0.0
    for s in range(0, pairs - 31, 32):  # 32 pairs per step: 8 GPUs x 2 micro-batches x 2 pairs
        step = order[s:s + 32]
        step = step[np.argsort(seqs[step].max(1), kind="stable")]  # the sampler's length bucketing
        length = -(-int(seqs[step].max()) // 64) * 64  # every row of the step padded to one length
        padded += flops(64 * length, length)
        padded_tokens += 64 * length
        for gpu in range(8):
            mine = step[gpu::8]
            groups = [mine[i:i + 2] for i in range(0, len(mine), 2)]
            counts = np.array([seqs[g].sum() for g in groups])
            for run in plan_packed_micro_batches(counts, max_tokens):
                row = sum(counts[g] for g in run)
                packed_tokens += -(-row // 64) * 64
        for p in step:
            for L in seqs[p]:
                packed += flops(L, L)  # attention stays inside each sequence
                real += L
    peak, mfu = 989e12, 0.40
    return {"padding_padded": 1 - real / padded_tokens, "padding_packed": 1 - real / packed_tokens,
            "minutes_padded": padded * 2 / (8 * peak * mfu) / 60, "minutes_packed": packed * 2 / (8 * peak * mfu) / 60,
            "speedup": padded / packed}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=32, help="synthetic pairs (default 32: 4 steps of 8)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="data.max_tokens_per_micro_batch for packing")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    m = measure(args.pairs, args.steps, args.max_tokens)
    p = predicted_recipe(args.max_tokens)
    a, b = m["padded"], m["packed"]
    rel = float(np.max(np.abs(np.subtract(a["losses"], b["losses"])) / np.abs(a["losses"])))
    body = f"""Synthetic pairs: prompts 50-300 tokens, responses log-normal (median 900) clipped to 200-6000 tokens;
{args.pairs} pairs, {args.steps} steps of 8 pairs, tiny Qwen3 (fp32, TP1PP1, one process), length bucketing on.
Tokens/s counts non-pad tokens only (median over steps 2..N).

| layout | padding fraction | non-pad tokens/s | step time (s) | peak memory so far (GiB; one process, padded run first) |
|---|---|---|---|---|
| today: rows padded to the step's longest | {a['padding_fraction']:.1%} | {a['tokens_per_s']:,.0f} | {a['step_time_s']:.2f} | {a['peak_memory_gib']:.2f} |
| packed, {args.max_tokens} tokens per micro-batch | {b['padding_fraction']:.1%} | {b['tokens_per_s']:,.0f} | {b['step_time_s']:.2f} | {b['peak_memory_gib']:.2f} |

Packed / padded non-pad tokens/s: **{b['tokens_per_s'] / a['tokens_per_s']:.2f}x**. Per-step losses of the two runs
differ by at most {rel:.1e} relative: the same pairs and objective, with fp32 noise of sequence sums over ~2k-token
responses (an fp32 sum near 1e4 has a 1e-3 ulp) carried through the updates; on short pairs the tests find 1e-5 or
better (`tests/training/test_packing.py`). (Targets: packed padding <= 2%, and no slower than today on CPU.)

Predicted for the released recipe (Qwen3-8B, 4,000 pairs x 2 epochs, 32 pairs per step = 8 GPUs x 2 micro-batches
x 2 pairs, same length distribution, H100 BF16 at 40% MFU, executed FLOPs incl. causal attention per sequence):

| layout | padding fraction | training time (min) |
|---|---|---|
| rows padded to the step's longest | {p['padding_padded']:.1%} | {p['minutes_padded']:.1f} |
| packed, {args.max_tokens} tokens per micro-batch | {p['padding_packed']:.1%} | {p['minutes_packed']:.1f} |

Predicted speed-up from packing: {p['speedup']:.2f}x (fewer FLOPs on padding; same MFU assumed for both, so GEMM
efficiency gains of the larger packed rows are not counted).
"""
    write_section("packing", "Packed pairs vs padded rows", "python benchmarks/bench_packing.py", body)
    print(body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": m, "predicted": p}, f, indent=2)


if __name__ == "__main__":
    main()
