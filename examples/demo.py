#!/usr/bin/env python
"""`make demo`: the whole SPoT pipeline end to end on a CPU, nothing downloaded.

  1. rectify   synthetic arithmetic problems -> the "model's" wrong solutions -> offline calculator
               Oracle (through the real client, cache and verifier) -> filtered rectified pairs
  2. model     a tiny Qwen3-architecture model and a byte-level BPE tokenizer, created locally (HF format)
  3. pack      pairs -> Megatron indexed dataset (.bin/.idx + manifest)
  4. convert   HF -> Megatron-Core dist checkpoint
  5. score     reference log-probs with the frozen model (torchrun, TP2 x PP2, 4 CPU processes)
  6. train     SPoT-BCO at TP2 x PP2 on 4 processes, checkpoints, metrics.jsonl, HF export
  7. check     reload the export with transformers: the chosen-minus-rejected log-prob margin grew
  8. evaluate  the paper's sampling (temperature 0.7, top-p 0.8, thinking off) on held-out synthetic problems
               and tiny IFEval and Connect4 sets (examples/smoke_benchmarks.py), base vs trained (few
               problems, 2 trials, short answers: a smoke run of tools/evaluate.py and the paper's table)
Writes <out>/report.json and <out>/report.png (loss, reward accuracy and margin per step), and
<out>/eval/compare.png (accuracy before/after, std over trials as error bars).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def stage(n: int, text: str) -> None:
    print(f"\n=== [{n}/8] {text}", flush=True)


def torchrun(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def margins(hf_dir: str, dataset, pairs: range) -> list[float]:
    """Per pair: log pi(chosen) - log pi(rejected) (response tokens, EOS included) under an HF model."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i in pairs:
            prompt, chosen, rejected = (torch.as_tensor(x.astype("int64")) for x in dataset.pair(i))
            sums = []
            for resp in (chosen, rejected):
                ids = torch.cat([prompt, resp]).unsqueeze(0)
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                tgt = ids[0, 1:]
                sums.append(logp[len(prompt) - 1:, :].gather(1, tgt[len(prompt) - 1:, None]).sum().item())
            out.append(sums[0] - sums[1])
    return out


def plot(metrics: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ["loss", "rewards/accuracy", "rewards/margin"],
                              ["SPoT-BCO loss", "reward accuracy (r+ > r-)", "reward margin r+ - r-"]):
        values = [m[key] for m in metrics]
        ax.plot(steps, values, marker="o", ms=3, alpha=0.35, label="per step (one batch)")
        smooth, acc = [], None
        for v in values:  # exponential moving average: each step sees a different batch
            acc = v if acc is None else 0.8 * acc + 0.2 * v
            smooth.append(acc)
        ax.plot(steps, smooth, lw=2, label="moving average")
        ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle("megatron_spot CPU demo: tiny Qwen3, TP2 x PP2, 4 processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "demo_out"), help="output folder (replaced)")
    parser.add_argument("--problems", type=int, default=192, help="synthetic problems to rectify")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-problems", type=int, default=6, help="held-out problems for stage 8")
    parser.add_argument("--eval-trials", type=int, default=2, help="trials per problem in stage 8")
    parser.add_argument("--eval-max-tokens", type=int, default=24, help="max new tokens in stage 8")
    args = parser.parse_args()
    t0 = time.time()
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)

    stage(1, "rectification pipeline with the offline Oracle (examples/offline_oracle.py)")
    from examples.offline_oracle import run_offline_demo

    pairs_path = run_offline_demo(os.path.join(out, "rectify"), num_problems=args.problems, seed=0, progress=True)
    with open(os.path.join(out, "rectify", "report.json")) as f:
        rect_report = json.load(f)
    with open(pairs_path) as f:
        texts = [json.loads(line) for line in f]
    print(f"rectified pairs: {len(texts)} -> {pairs_path}")

    stage(2, "tiny Qwen3 model + tokenizer, created locally in Hugging Face format")
    import torch
    import transformers

    from megatron_spot.data import build_tiny_tokenizer
    from megatron_spot.models import load_model_config

    hf_dir = os.path.join(out, "hf_base")
    corpus = [t["prompt"] + "\n" + t["chosen"] + "\n" + t["rejected"] for t in texts]
    build_tiny_tokenizer(hf_dir, corpus, vocab_size=512)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    qcfg = load_model_config("qwen3-tiny")
    hf_cfg = qcfg.to_hf_dict()
    hf_cfg.update(vocab_size=512, eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id,
                  torch_dtype="float32")
    torch.manual_seed(0)
    base = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_cfg))
    base.save_pretrained(hf_dir)
    print(f"model: {sum(p.numel() for p in base.parameters()):,} parameters, tokenizer: {len(tok)} tokens -> {hf_dir}")

    stage(3, "pack pairs into a Megatron indexed dataset")
    from megatron_spot.data import PairDataset, pack_pairs

    prefix = os.path.join(out, "data", "pairs")
    os.makedirs(os.path.dirname(prefix))
    pack_pairs([pairs_path], hf_dir, prefix, preset="rectify", apply_chat_template=True,
                          max_length=1024, max_prompt_length=512, progress=True)
    dataset = PairDataset(prefix)
    print(f"packed {len(dataset)} pairs, longest {int(dataset.lengths().max())} tokens -> {prefix}.bin/.idx")

    stage(4, "convert HF -> Megatron-Core dist checkpoint")
    mcore_dir = os.path.join(out, "mcore")
    # conversion starts a one-process world; run it in its own interpreter like the CLI does
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "hf-to-mcore",
                    "--hf", hf_dir, "--out", mcore_dir, "--dtype", "fp32"], check=True, cwd=ROOT)

    recipe = os.path.join(ROOT, "examples", "tiny_cpu_spot.yaml")
    overrides = [f"data.pack={prefix}", f"model.init_checkpoint={mcore_dir}", f"data.tokenizer={hf_dir}",
                 f"run.output_dir={os.path.join(out, 'run')}", f"run.epochs={args.epochs}"]
    stage(5, "score reference log-probs (TP2 x PP2, 4 processes)")
    torchrun(4, [os.path.join(ROOT, "tools", "score_logprobs.py"), "--config", recipe, *overrides])

    stage(6, "train SPoT-BCO (TP2 x PP2, 4 processes) and export to Hugging Face format")
    torchrun(4, ["-m", "megatron_spot.train", "--config", recipe, *overrides])

    stage(7, "reload the export with transformers and compare margins")
    run_dir = os.path.join(out, "run")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    sample = range(min(len(dataset), 64))
    before = margins(hf_dir, dataset, sample)
    after = margins(os.path.join(run_dir, "hf"), dataset, sample)
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    report = {
        "seconds": round(time.time() - t0, 1),
        "rectification": rect_report,
        "pairs": len(dataset),
        "steps": len(metrics),
        "first_step": metrics[0], "last_step": metrics[-1],
        "margin_logp_chosen_minus_rejected": {"before": mean_before, "after": mean_after,
                                              "pairs_measured": len(before)},
        "margin_grew": mean_after > mean_before,
        "hf_export": os.path.join(run_dir, "hf"),
    }
    plot(metrics, os.path.join(out, "report.png"))
    print(f"\nmean log-prob margin (chosen - rejected) over {len(before)} pairs: "
          f"{mean_before:+.3f} before -> {mean_after:+.3f} after training")
    print(f"loss {metrics[0]['loss']:.4f} -> {metrics[-1]['loss']:.4f}; reward accuracy "
          f"{metrics[0]['rewards/accuracy']:.2f} -> {metrics[-1]['rewards/accuracy']:.2f}")

    stage(8, "evaluate base and trained models with the paper's sampling (tools/evaluate.py, smoke size)")
    from megatron_spot.rectify import evaluate as E
    from examples.offline_oracle import write_problems_jsonl
    from examples.smoke_benchmarks import write_connect4_smoke, write_ifeval_smoke

    eval_dir = os.path.join(out, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    benches = {"arith": write_problems_jsonl(os.path.join(eval_dir, "arith_heldout.jsonl"), args.eval_problems, seed=1),
               "ifeval": write_ifeval_smoke(os.path.join(eval_dir, "ifeval.jsonl")),
               "connect4": write_connect4_smoke(os.path.join(eval_dir, "connect4.jsonl"))}
    docs = []
    for label, model in (("base", hf_dir), ("spot", os.path.join(run_dir, "hf"))):
        cfg = E.EvalConfig(output_dir=os.path.join(eval_dir, label), benchmarks=benches,
                           trials={k: args.eval_trials for k in benches}, max_tokens=args.eval_max_tokens,
                           max_tokens_for=E.PAPER_PROTOCOL["max_tokens_for"], local_model=model,
                           local_batch_size=args.eval_problems * args.eval_trials, progress=False)
        docs.append(E.evaluate(cfg))
    table = E.compare(docs[0], docs[1], os.path.join(out, "eval", "compare.png"))
    print(table)
    report["evaluation"] = {"table": table.splitlines(), "base": docs[0]["benchmarks"], "spot": docs[1]["benchmarks"]}
    report["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"report: {os.path.join(out, 'report.json')}  plots: {os.path.join(out, 'report.png')}, "
          f"{os.path.join(out, 'eval', 'compare.png')}  ({report['seconds']:.0f} s)")
    if not report["margin_grew"]:
        print("error: the margin did not grow", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
