"""Dataclass configs: one tree for a run, loaded from YAML with dotted key=value overrides.

Every field has a default that runs the tiny CPU demo; recipes in examples/ override them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    # A preset name of any model family (megatron_spot.models.all_presets(): qwen3-8b, llama3.1-8b-instruct,
    # ...) or a path to a Hugging Face
    # config.json / checkpoint folder; the folder's config.json wins when both are given.
    preset: str = "qwen3-tiny"
    hf_config: Optional[str] = None
    # Megatron checkpoint to start from (written by `tools/convert_checkpoint.py hf-to-mcore`).
    # Empty: random initialisation (only sensible for tests and profiling).
    init_checkpoint: Optional[str] = None
    max_sequence_length: int = 8192
    # Loss head that never builds the [tokens, V/tp] logits (ops.linear_token_logprobs, chunked
    # output GEMM); false = Megatron's output layer, then ops.token_logprobs on the full logits.
    fused_linear_loss: bool = True


@dataclass
class MoEConfig:
    """Mixture-of-experts training settings (ignored for dense models)."""
    # load-balancing loss: aux_loss (Switch-style, per micro-batch; what Qwen3-MoE's router_aux_loss_coef
    # means), seq_aux_loss (per sequence), global_aux_loss (over the global batch), or none
    load_balancing: str = "aux_loss"
    # its coefficient; None = the model's config.json router_aux_loss_coef (0.001 for the released Qwen3-MoE)
    aux_loss_coeff: Optional[float] = None
    z_loss_coeff: Optional[float] = None  # router z-loss (ST-MoE); None = off
    # tokens per expert capped at capacity_factor x (tokens x top-k / experts), the rest dropped;
    # None = dropless (every token reaches its top-k experts, as in transformers)
    capacity_factor: Optional[float] = None
    # how each MoE layer's experts run: grouped (Megatron-Core's TEGroupedMLP, every local expert's weights
    # `weight{e}` of one grouped linear: Transformer Engine's grouped GEMM on GPUs, a plain-PyTorch twin
    # without TE), sequential (SequentialMLP, one MLP module per expert), or auto (grouped where Transformer
    # Engine runs, sequential otherwise). Same numbers either way; checkpoints load into both.
    experts: str = "auto"


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # virtual pipeline stages per rank (interleaved 1F1B); None = not interleaved
    virtual_pipeline: Optional[int] = None
    context_parallel: int = 1
    # mixture-of-experts models only: ranks the experts of each MoE layer are spread over (the all-to-all
    # token dispatcher's group), and the tensor-parallel size inside each expert; None = tensor_parallel
    # (Megatron-Core's default)
    expert_parallel: int = 1
    expert_tensor_parallel: Optional[int] = None
    sequence_parallel: bool = False  # Transformer Engine only
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # gloo mixes messages to one peer when p2p ops are batched with interleaved pipelines
    # (see README); None = False on CPU, True on GPU.
    batch_p2p_comm: Optional[bool] = None


@dataclass
class WorldConfig:
    """The machines a recipe is written for: nodes x GPUs per node is the world size its parallel layout
    divides. null = whatever the launcher gives. `spot-profile --config RECIPE --predict-only` answers for
    this world (--nodes / --gpus-per-node override it); training stops at start-up when the launched world
    size differs from nodes x gpus_per_node (the launchers do not read this section: start as many)."""
    nodes: Optional[int] = None  # machines (torchrun --nnodes, SLURM --nodes)
    gpus_per_node: Optional[int] = None  # ranks per machine (torchrun --nproc-per-node, SLURM --gpus-per-node)


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    fp8: Optional[str] = None  # None | hybrid | e4m3 (Transformer Engine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8 (Blackwell)
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # keep the first/last N transformer layers in BF16 when training in FP8
    fp8_bf16_first_layers: int = 0
    fp8_bf16_last_layers: int = 0


@dataclass
class RecomputeConfig:
    granularity: Optional[str] = None  # None | selective | full
    method: str = "uniform"  # uniform | block (full recompute only)
    num_layers: int = 1


@dataclass
class DataConfig:
    # prefix of a pack written by tools/pack_pairs.py (<prefix>.bin/.idx/.manifest.json)
    pack: Optional[str] = None
    # reference log-probs written by tools/score_logprobs.py; default: beside the pack
    ref_logprobs: Optional[str] = None
    tokenizer: Optional[str] = None
    micro_batch_size: int = 2  # pairs per micro-batch (2x sequences: chosen + rejected)
    global_batch_size: int = 32  # pairs per optimizer step
    seq_length: int = 8192  # longest prompt+response; longer pairs are an error at load
    pad_to_multiple_of: int = 64
    shuffle: bool = True
    bucket_by_length: bool = True
    # Pad-free packing: each micro-batch is ONE row of whole sequences (the chosen and rejected of each
    # pair, pairs never split) up to max_tokens_per_micro_batch tokens, attention kept inside each
    # sequence (cu_seqlens / THD). micro_batch_size then only sets the group of pairs whose mean reward
    # is one spot-bco delta update (TRL's rule), so losses do not depend on the token budget.
    packing: bool = False
    max_tokens_per_micro_batch: int = 16384


@dataclass
class LossConfig:
    # one objective or a weighted sum: spot-bco | spot-bce | dpo | reward-sft | sft, e.g. "spot-bco:1,sft:0.1"
    objective: str = "spot-bco"
    beta: float = 0.1
    label_smoothing: float = 0.0
    # recompute the reference with a frozen copy of the starting model instead of a precomputed sidecar
    online_reference: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adam"  # AdamW (decoupled weight decay)
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: str = "cosine"  # cosine | linear | constant
    warmup_fraction: float = 0.05


@dataclass
class RunConfig:
    output_dir: str = "runs/spot"
    epochs: int = 2
    train_steps: Optional[int] = None  # cap on optimizer steps (None: epochs x steps per epoch)
    seed: int = 1234
    log_interval: int = 1
    save_interval: int = 0  # 0: only at the end
    # resume from this run folder / checkpoint; "auto": from the newest complete checkpoint of
    # run.output_dir when it has one, else start fresh (what a launcher's automatic restart needs)
    load: Optional[str] = None
    # Every process group's timeout (NCCL and gloo; NCCL's asynchronous error handling is on): a rank
    # waiting this long in one collective for a dead or stuck peer fails instead of hanging the job.
    collective_timeout_s: float = 600.0
    # Step watchdog (platform/watchdog.py): a rank that completes no training step (or checkpoint save)
    # within step_timeout_s, or no first step within startup_timeout_s of joining the process group
    # (model build, checkpoint load, first step; also the bound on the final HF export), writes every
    # thread's stack, names itself in one line and exits 1 so the launcher acts. 0: off.
    # startup_timeout_s also bounds how long ranks wait for each other to join the process group (each
    # runs its input checks first) and for rank 0's checkpoint publish and export.
    step_timeout_s: float = 1800.0
    startup_timeout_s: float = 3600.0
    export_hf: bool = True  # export the final policy as a Hugging Face checkpoint
    tensorboard: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
