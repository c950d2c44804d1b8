"""Child process for tests/gpu/test_train_cuda.py and the GPU check's moe step
(megatron_spot/gpu_check/steps/moe.py); a plain script: every mode runs in a fresh process so CPU and GPU
runs never share torch.distributed or CUDA state.

  python tests/gpu/train_child.py workspace DIR [PRESET]      tests/tiny.build_train_workspace: tiny HF model of
                                                               PRESET (qwen3-tiny) + tokenizer + pack + Megatron checkpoint
  python tests/gpu/train_child.py train DIR OUT SPEC [k=v ...] train with megatron_spot.train.run; SPEC local|te|auto
  python tests/gpu/train_child.py workspace-and-train PRESET DIR OUT SPEC [k=v ...]
                                                               both in one process (one start-up fewer); DIR/READY
                                                               appears when the workspace is complete
  python tests/gpu/train_child.py nccl OUT.json                one-rank NCCL start-up + vocab-parallel op over it

The device is whatever CUDA_VISIBLE_DEVICES leaves visible (the test hides the GPU for the CPU run).
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STEPS = 4
BETA = 0.5
LR = 2e-3  # large enough that log-probs move visibly in four steps, so parity is not parity of noise


READY = "READY"  # written last into a workspace folder, for a process waiting to train on it


def workspace(root: str, preset: str = "qwen3-tiny") -> None:
    from tests.tiny import build_train_workspace

    build_train_workspace(root, num_pairs=32, preset=preset)
    with open(os.path.join(root, READY + ".tmp"), "w") as f:
        f.write(preset)
    os.replace(os.path.join(root, READY + ".tmp"), os.path.join(root, READY))


def _choose_spec(spec: str) -> None:
    """Before anything imports Megatron-Core (which notes at import whether TE is there)."""
    if spec == "local":
        # hide Transformer Engine: the provider then picks Megatron-Core's local layer spec
        sys.modules["transformer_engine"] = None


def train(root: str, out: str, spec: str, extra: list) -> None:
    _choose_spec(spec)
    from megatron_spot.config import TrainConfig, load_config
    from megatron_spot.platform.device import transformer_engine_available
    from megatron_spot.platform import shutdown
    from megatron_spot.platform.device import has_cuda
    from megatron_spot.train import run

    import torch

    torch.set_float32_matmul_precision("highest")  # fp32 GEMMs, not TF32: the CPU comparison assumes fp32
    if spec == "te" and not transformer_engine_available():
        raise SystemExit("train_child: spec 'te' requested but Transformer Engine is not importable")
    overrides = [f"data.pack={root}/pack/pairs", f"model.init_checkpoint={root}/mcore", f"data.tokenizer={root}/hf",
                 f"run.output_dir={out}", "data.micro_batch_size=2", "data.global_batch_size=8",
                 "data.seq_length=128", "data.pad_to_multiple_of=8", "loss.objective=spot-bco", f"loss.beta={BETA}",
                 "loss.online_reference=true", f"optimizer.lr={LR}", "optimizer.warmup_fraction=0.25",
                 "optimizer.weight_decay=0.01", "optimizer.clip_grad=1.0", "run.epochs=1", f"run.train_steps={STEPS}",
                 "run.export_hf=false", "run.tensorboard=false", "precision.dtype=fp32", *extra]
    summary = run(load_config(TrainConfig, None, overrides))
    with open(os.path.join(out, "child.json"), "w") as f:
        json.dump({"device": "cuda" if has_cuda() else "cpu", "te": transformer_engine_available(),
                   "experts_module": summary.get("experts_module"),  # MoE: TEGroupedMLP or SequentialMLP
                   "history": summary["history"], "checkpoint": summary["checkpoint"]}, f, default=str)
    shutdown()


def nccl(out_json: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_spot import ops
    from megatron_spot.config.schema import ParallelConfig
    from megatron_spot.platform import initialize, shutdown

    info = initialize(ParallelConfig(), seed=0)
    x = torch.ones(4, device=info.device)
    dist.all_reduce(x)
    g = torch.Generator(device=info.device).manual_seed(0)
    logits = torch.randn(16, 2, 1000, device=info.device, generator=g)
    targets = torch.randint(0, 1000, (16, 2), device=info.device, generator=g)
    lp = ops.token_logprobs(logits, targets, tp_group=ps.get_tensor_model_parallel_group())
    exact = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    res = {"backend": info.backend, "device": str(info.device), "all_reduce": x.tolist(),
           "ops_backend": ops.active_backend(info.device), "max_abs_diff": float((lp.double() - exact).abs().max())}
    shutdown()
    with open(out_json, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "workspace":
        workspace(*sys.argv[2:4])
    elif mode == "train":
        train(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    elif mode == "workspace-and-train":
        _choose_spec(sys.argv[5])
        workspace(sys.argv[3], sys.argv[2])
        train(sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    elif mode == "nccl":
        nccl(sys.argv[2])
    else:
        raise SystemExit(f"train_child: unknown mode {mode!r} (workspace | train | workspace-and-train | nccl)")
