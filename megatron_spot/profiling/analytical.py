"""Analytical model of a training step: FLOPs, memory per rank, pipeline bubble, step time.

Everything here is arithmetic on the config (no torch, no process group), so a CPU box can predict
an 8x or 64x H100 run. Conventions:

* FLOPs are matmul FLOPs (see :mod:`megatron_spot.profiling.flops`). *Model* FLOPs count causal
  attention as half of the full QK^T/AV products (the MFU convention). *Executed* FLOPs are what the
  kernels run: Megatron-Core's unfused (local-spec) attention multiplies the full s x s matrix, so
  its attention term is twice the model term; flash attention skips the masked half.
* Weights, gradients and optimizer states follow Megatron-Core's distributed optimizer
  (docs/source/api-guide/dist_optimizer.md in Megatron-LM): bf16/fp16 params with fp32 grads are
  2 + 4 bytes per parameter on every rank plus 12/DP bytes (fp32 main param + Adam m and v) sharded
  over the data-parallel group; fp32 params are 4 + 4 + 8/DP (the params themselves are the main copy).
  Without the distributed optimizer the last term is not divided by DP.
* Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
  Models" (MLSys 2023, arXiv:2205.05198), Sec. 4: per layer and micro-batch,
  ``sbh(34 + 5as/h)`` bytes for a 16-bit GPT layer (no TP), ``sbh(10 + 24/t + 5as/(ht))`` with TP,
  ``sbh/t (34 + 5as/h)`` with TP + sequence parallel, ``34 sbh / t`` (SP) or ``sbh(10 + 24/t)`` with
  selective recompute, and ``2 sbh`` (the layer input) with full recompute. The same per-tensor
  derivation is redone here for a Qwen3 / Llama layer (RMSNorm, GQA, qk-norm where present, SwiGLU, no dropout) -- see
  :func:`layer_activation_bytes`; :func:`korthikanti_gpt_layer_bytes` is the paper's formula itself.
* Mixture of experts: expert weights are split over EP x ETP instead of TP, and their gradients and
  optimizer state shard over the expert-data-parallel group (world / (ETP x EP x PP)); FLOPs count the
  top-k experts a token reaches (the active parameters). An MoE layer's activations are what Megatron-Core's
  MoELayer saves (:func:`moe_routed_activation_bytes`): the router's scores and top-k, the dispatcher's
  indices, and per routed token copy (top-k per token, balanced over the experts) its hidden state, the
  expert fc1 output (2 x moe_intermediate_size), the activation and its routing weight. The all-to-all
  volume (dispatch and combine, forward and backward) becomes time at a stated bandwidth
  (:func:`all_to_all_seconds`: NVLink when a rank's EP group fits in its node, the inter-node network per
  GPU for the share that leaves it), reported beside the step time, not overlapped with it (an upper bound).
* Pipelining (1F1B): stage i keeps min(PP - i, m) micro-batches of activations alive, so stage 0
  holds PP of them; the interleaved schedule keeps (1 + (PP-1)/(PP*VPP)) x PP micro-batches' worth of
  its layers (paper, Sec. 4.2.3). Bubble: (PP-1)/(m*VPP) of the ideal compute time (Narayanan et al.,
  SC'21), i.e. (PP-1)/(m*VPP + PP-1) of the step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_spot.models.gpt.config import GPTConfig
from megatron_spot.config.dtypes import BYTES_PER_ELEMENT
from megatron_spot.profiling.flops import matmul_params_per_token



@dataclass
class StepShape:
    """The shape of one training step for the analytical model (parallel sizes, batch, precision). Not the
    run's validated layout (that is megatron_spot.platform.Layout). micro_batch_size is in *pairs*."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    dp: int = 1
    # context parallel: each sequence is split over cp ranks (activations per rank / cp; the
    # distributed optimizer shards over DP x CP, as Megatron-Core's data-parallel-with-CP group does)
    cp: int = 1
    # mixture of experts: expert parallel and the tensor parallel inside each expert (None: = tp)
    ep: int = 1
    etp: Optional[int] = None
    micro_batch_size: int = 1
    num_micro_batches: int = 1
    seq_length: int = 2048
    dtype: str = "bf16"  # fp32 | bf16 | fp16
    fp8: bool = False
    recompute: Optional[str] = None  # None | selective | full
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    flash_attention: bool = True  # GPU/TE: fused attention, no s x s activations saved
    # model.fused_linear_loss: the loss head keeps 12 bytes of statistics per token instead of the logits
    # (ops.linear_token_logprobs), plus one logits chunk while it runs
    fused_linear_loss: bool = True

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """The expert-data-parallel size: world / (ETP x EP x PP) (Megatron-Core's expert grid)."""
        return max(1, self.world_size // (self.expert_tp * self.ep * self.pp))

    @property
    def rows(self) -> int:  # sequences per micro-batch
        return 2 * self.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.dp * self.num_micro_batches * self.rows * self.seq_length


# --------------------------------------------------------------------------------------------------
# FLOPs
def attention_flops_per_token(cfg: GPTConfig, seq_length: int, causal: bool = True) -> float:
    """Forward QK^T + AV FLOPs of one token (all layers); causal counts half."""
    full = 4.0 * seq_length * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return full / 2 if causal else full


def step_flops(cfg: GPTConfig, layout: StepShape, executed: bool = False, vocab: Optional[int] = None) -> float:
    """Training FLOPs of one optimizer step over all ranks.

    executed=False: model FLOPs (MFU convention: 3x forward, causal attention halved, no recompute).
    executed=True: what runs -- unfused attention computes the full s x s product, and full recompute
    adds one more forward.
    """
    n = matmul_params_per_token(cfg)
    if vocab is not None:  # padded vocabulary rows are multiplied too
        n += cfg.hidden_size * (vocab - cfg.vocab_size)
    causal = not executed or layout.flash_attention
    fwd = 2.0 * n + attention_flops_per_token(cfg, layout.seq_length, causal=causal)
    passes = 3.0 + (1.0 if executed and layout.recompute == "full" else 0.0)
    if executed and layout.recompute == "selective":  # core attention runs forward twice
        passes_attn = attention_flops_per_token(cfg, layout.seq_length, causal=causal)
        return layout.tokens_per_step * (passes * fwd + passes_attn)
    return layout.tokens_per_step * passes * fwd


# --------------------------------------------------------------------------------------------------
# Parameters and model-state memory
def layer_parameters(cfg: GPTConfig, tp: int = 1, ep: int = 1, etp: Optional[int] = None) -> int:
    # matmul weights are split by TP, routed experts by EP x ETP; norms (input/pre-MLP RMSNorm, q/k norms where
    # the family has them) are not split
    return layer_dense_parameters(cfg, tp) + layer_expert_parameters(cfg, ep, tp if etp is None else etp)


def layer_dense_parameters(cfg: GPTConfig, tp: int = 1) -> int:
    return (cfg.layer_matmul_parameters() - cfg.layer_expert_parameters()) // tp + cfg.layer_norm_parameters()


def layer_expert_parameters(cfg: GPTConfig, ep: int = 1, etp: int = 1) -> int:
    return cfg.layer_expert_parameters() // (ep * etp)


def stage_parameters(cfg: GPTConfig, layout: StepShape, stage: int) -> int:
    """Parameters held by a rank of pipeline stage `stage` (all its virtual chunks), padded vocab."""
    layers = cfg.num_hidden_layers // layout.pp
    n = layers * layer_parameters(cfg, layout.tp, layout.ep, layout.etp)
    emb = cfg.padded_vocab_size * cfg.hidden_size // layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        n += emb
    if last:
        n += cfg.hidden_size  # final norm
        if not (cfg.tie_word_embeddings and first):  # a tied output layer shares the embedding at PP=1
            n += emb
    return n


def model_state_bytes(cfg: GPTConfig, layout: StepShape, stage: int = 0) -> dict:
    n = stage_parameters(cfg, layout, stage)
    # routed experts' optimizer state shards over the expert-data-parallel group, the rest over DP x CP
    experts = cfg.num_hidden_layers // layout.pp * layer_expert_parameters(cfg, layout.ep, layout.expert_tp)
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    expert_shard = layout.expert_dp if layout.distributed_optimizer else 1
    per_param = 8 if layout.dtype == "fp32" else 12  # fp32 main copy (unless fp32 params) + Adam m and v
    opt = per_param * ((n - experts) / shard + experts / expert_shard)
    weights = (4 if layout.dtype == "fp32" else 2) * n
    out = {"parameters": n, "weights": weights, "grads": 4 * n, "optimizer": int(math.ceil(opt))}
    if experts:
        out["expert_parameters"] = experts
    return out


def all_to_all_bytes(cfg: GPTConfig, layout: StepShape) -> float:
    """Bytes one rank sends through the MoE token dispatcher in one step: for every MoE layer of its stage
    and micro-batch, its tokens x top-k hidden vectors go out (dispatch) and come back (combine), forward
    and again in backward; the share that stays on the rank, 1/EP, does not cross. 0 when dense or EP1."""
    top_k = getattr(cfg, "num_experts_per_tok", 0)
    if not cfg.layer_expert_parameters() or layout.ep == 1 or not top_k:
        return 0.0
    p = BYTES_PER_ELEMENT[layout.dtype]
    tokens = layout.rows * -(-layout.seq_length // layout.cp)  # this rank's tokens of one micro-batch
    if layout.sequence_parallel:
        tokens /= layout.tp
    layers = cfg.num_hidden_layers // layout.pp * cfg.moe_layer_fraction  # MoE layers of a stage (spread evenly)
    per_layer = 4 * tokens * top_k * cfg.hidden_size * p * (layout.ep - 1) / layout.ep
    return per_layer * layers * layout.num_micro_batches


def all_to_all_seconds(cfg: GPTConfig, layout: StepShape, gpus_per_node: int, intra_node_gb_s: float,
                       inter_node_gb_s: float) -> dict:
    """The all-to-all volume of one step (:func:`all_to_all_bytes`) as seconds on the wire.

    Megatron-Core's expert grid puts ETP innermost, so an EP group spans ETP x EP consecutive ranks: a rank
    has min(EP, gpus_per_node / ETP) - 1 EP peers in its own node (NVLink, `intra_node_gb_s` per GPU and
    direction) and the rest in other nodes (the network, `inter_node_gb_s` per GPU). Each peer receives an
    equal share (balanced routing). The two parts are added, and nothing overlaps them with compute: an
    upper bound at these bandwidths (GB = 1e9 bytes). Returns bytes and seconds of each part."""
    sent = all_to_all_bytes(cfg, layout)
    ep = layout.ep
    peers_in_node = min(ep, max(1, gpus_per_node // layout.expert_tp)) - 1
    inter_share = (ep - 1 - peers_in_node) / (ep - 1) if ep > 1 else 0.0
    intra, inter = sent * (1 - inter_share), sent * inter_share
    return {"intra_node_bytes": intra, "inter_node_bytes": inter, "intra_node_gb_s": intra_node_gb_s,
            "inter_node_gb_s": inter_node_gb_s, "gpus_per_node": gpus_per_node,
            "seconds": intra / (intra_node_gb_s * 1e9) + inter / (inter_node_gb_s * 1e9)}


# --------------------------------------------------------------------------------------------------
# Activations
def korthikanti_gpt_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                recompute: Optional[str] = None) -> float:
    """The paper's per-layer activation bytes for a 16-bit GPT layer (4h MLP, MHA, dropout)."""
    if recompute == "full":
        return 2.0 * s * b * h / (t if sp else 1)
    if recompute == "selective":
        return s * b * h * (34.0 / t if sp else 10.0 + 24.0 / t)
    if sp:
        return s * b * h / t * (34.0 + 5.0 * a * s / h)
    return s * b * h * (10.0 + 24.0 / t + 5.0 * a * s / (h * t))


def layer_activation_bytes(cfg: GPTConfig, layout: StepShape, softmax_fp32: bool = True) -> float:
    """Bytes one layer keeps for backward, per micro-batch, on one rank.

    Redoing the paper's count for Megatron-Core's GPT layer as Qwen3 and Llama use it (p = bytes per activation element,
    s tokens, b sequences, t = TP; "rep" terms are TP-replicated and divided by t under SP):
      attention: RMSNorm input p*sbh (rep), QKV-linear input p*sbh (rep), q/k before qk-norm
        p*sb(q+kv)/t (families with q/k norms), core attention (unfused): q and GQA-expanded k p*2sbq/t, softmax output
        (fp32 when attention_softmax_in_fp32, plus its p-byte cast) and expanded v p*sbq/t,
        output-projection input p*sbq/t;  flash attention instead keeps q, k, v and its output
        (p*sb(2q+2kv)/t) plus an fp32 log-sum-exp per head and row.
      MLP: RMSNorm input and fc1 input p*sbh each (rep), SwiGLU gate, silu(gate), up p*3sbf/t,
        fc2 input p*sbf/t; an MoE layer: the RMSNorm and router inputs (rep), then
        :func:`moe_routed_activation_bytes`.
    No dropout masks (neither family has dropout). Selective recompute drops the core-attention terms and
    keeps its inputs q, k, v; full recompute keeps only the layer input p*sbh (rep).
    """
    p = BYTES_PER_ELEMENT[layout.dtype]
    s, b, t = -(-layout.seq_length // layout.cp), layout.rows, layout.tp  # this rank's tokens of each sequence
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv, a = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_attention_heads
    rep = 1.0 / t if layout.sequence_parallel else 1.0
    if layout.recompute == "full":
        return p * s * b * h * rep
    qk_norm_in = (q + kv) / t if cfg.qk_layernorm else 0.0  # q/k kept before their RMSNorm (Qwen3)
    attn_in = p * s * b * (2 * h * rep + qk_norm_in)
    if layout.flash_attention:
        core = p * s * b * (2 * q + 2 * kv) / t + 4.0 * s * b * a / t
    else:
        sm = (4.0 + (p if p != 4 else 0)) if softmax_fp32 else float(p)
        core = p * s * b * 3 * q / t + sm * a * s * s * b / t
    if layout.recompute == "selective":
        core = p * s * b * (q + 2 * kv) / t
    proj_in = p * s * b * q / t
    mlp = p * s * b * (2 * h * rep + 4 * f / t)
    if is_moe(cfg):  # the same pre-MLP norm input and router input, then what the MoE layer keeps
        moe = p * s * b * 2 * h * rep + moe_routed_activation_bytes(cfg, layout)
        share = cfg.moe_layer_fraction  # (a Qwen3-MoE with dense layers: their share, spread evenly)
        mlp = share * moe + (1 - share) * mlp
    return attn_in + core + proj_in + mlp


def is_moe(cfg: GPTConfig) -> bool:
    return bool(cfg.num_moe_experts and getattr(cfg, "num_experts_per_tok", 0))


def moe_routed_activation_bytes(cfg: GPTConfig, layout: StepShape, fused_swiglu: Optional[bool] = None) -> float:
    """Bytes one MoE layer keeps for backward beyond its input (the normed hidden states, counted with the
    dense terms), per micro-batch, on one rank: Megatron-Core's MoELayer with the softmax router, the
    all-to-all dispatcher and its experts. With T this rank's tokens (its sequence share under SP), E experts,
    top-k, R = T x k x ETP routed token copies its experts process (balanced routing; ETP all-gathers them)
    and f = moe_intermediate_size / ETP:
      router: fp32 scores over all experts for the load-balancing loss 4TE, the top-k indices 8Tk and
        weights 4Tk, tokens per expert 8E;
      dispatch: the permutation's int64 token indices (a view of a T x E buffer) 8TE + 8Tk;
      experts: fc1 input p*Rh (the dispatched tokens), routing weights 4R, fc1 output p*2Rf and the fc2 input
        p*Rf (Transformer Engine's grouped MLP: one fused weighted-SwiGLU kernel keeps only its input);
        unfused (`fused_swiglu=False`, SequentialMLP on the CPU local spec) also gate + 0 offset, silu(gate)
        and silu(gate) * up, p*3Rf more.
    The dispatcher's send/receive buffers live only during the layer and are not counted.
    `fused_swiglu` None: fused when `layout.flash_attention` (the GPU/TE spec), unfused otherwise."""
    p = BYTES_PER_ELEMENT[layout.dtype]
    rep = 1.0 / layout.tp if layout.sequence_parallel else 1.0
    tokens = layout.rows * -(-layout.seq_length // layout.cp) * rep
    experts, top_k = cfg.num_moe_experts, cfg.num_experts_per_tok
    routed = tokens * top_k * layout.expert_tp
    f = cfg.moe_intermediate_size / layout.expert_tp
    fused = layout.flash_attention if fused_swiglu is None else fused_swiglu
    router = 4.0 * tokens * experts + 8.0 * tokens * top_k + 4.0 * tokens * top_k + 8.0 * experts
    dispatch = 8.0 * tokens * experts + 8.0 * tokens * top_k
    expert_mlp = p * routed * (cfg.hidden_size + 3 * f + (0 if fused else 3 * f)) + 4.0 * routed
    return router + dispatch + expert_mlp


def head_activation_bytes(cfg: GPTConfig, layout: StepShape) -> float:
    """Last stage extra: final-norm input, output-layer input, and what the loss head holds: the logits
    the fused log-prob keeps, or with the fused linear head its per-token statistics and one chunk."""
    p = BYTES_PER_ELEMENT[layout.dtype]
    s, b = -(-layout.seq_length // layout.cp), layout.rows
    logits = p * s * b * cfg.padded_vocab_size / layout.tp
    if layout.fused_linear_loss:
        from megatron_spot.ops.linear_token_logprobs import DEFAULT_CHUNK_BYTES

        head = 12.0 * s * b + min(float(DEFAULT_CHUNK_BYTES), logits)
    else:
        head = logits
    return p * s * b * 2 * cfg.hidden_size + head


def in_flight_micro_batches(layout: StepShape, stage: int) -> float:
    """Micro-batches whose activations a stage holds at its peak under 1F1B (interleaved or not)."""
    pp, m, vpp = layout.pp, layout.num_micro_batches, layout.vpp or 1
    if pp == 1:
        return 1.0
    if vpp > 1:
        return min(float(m), pp * (1 + (pp - 1) / (pp * vpp))) * (pp - stage) / pp if stage else \
            min(float(m), pp * (1 + (pp - 1) / (pp * vpp)))
    return float(min(pp - stage, m))


def activation_bytes(cfg: GPTConfig, layout: StepShape, stage: int = 0) -> float:
    layers = cfg.num_hidden_layers // layout.pp
    per_mb = layers * layer_activation_bytes(cfg, layout)
    if layout.recompute == "full":  # one layer's full activations exist while it is recomputed
        full = StepShape(**{**asdict(layout), "recompute": None})
        per_mb += layer_activation_bytes(cfg, full)
    if stage == layout.pp - 1:
        per_mb += head_activation_bytes(cfg, layout)
    return in_flight_micro_batches(layout, stage) * per_mb if stage != layout.pp - 1 or layout.pp == 1 else \
        per_mb


def memory_per_rank(cfg: GPTConfig, layout: StepShape) -> dict:
    """Predicted bytes per rank for every pipeline stage, and the largest (the one that must fit)."""
    stages = []
    for stage in range(layout.pp):
        ms = model_state_bytes(cfg, layout, stage)
        act = activation_bytes(cfg, layout, stage)
        total = ms["weights"] + ms["grads"] + ms["optimizer"] + act
        stages.append({"stage": stage, **ms, "activations": int(act), "total": int(total)})
    worst = max(stages, key=lambda r: r["total"])
    return {"stages": stages, "peak": worst}


# --------------------------------------------------------------------------------------------------
def bubble_fraction(pp: int, num_micro_batches: int, vpp: Optional[int] = None) -> float:
    """Pipeline bubble as a fraction of the ideal (bubble-free) compute time: (PP-1)/(m*VPP)."""
    return (pp - 1) / (num_micro_batches * (vpp or 1))


def bubble_share_of_step(pp: int, num_micro_batches: int, vpp: Optional[int] = None) -> float:
    """The same bubble as a share of the whole (bubbly) step time."""
    x = bubble_fraction(pp, num_micro_batches, vpp)
    return x / (1 + x)


@dataclass
class Prediction:
    layout: dict
    flops_per_step: float
    executed_flops_per_step: float
    tokens_per_step: int
    bubble_fraction: float
    memory: dict
    all_to_all_bytes_per_rank: float = 0.0  # MoE token dispatch + combine of one step (see all_to_all_bytes)
    all_to_all: Optional[dict] = None  # its time on the wire (all_to_all_seconds), when a world was given
    peak_tflops: Optional[float] = None
    assumed_mfu: Optional[float] = None
    step_time_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tflops_per_device: Optional[float] = None
    # the step with the all-to-all added, not overlapped (an upper bound); None for a dense model or EP1
    step_time_with_all_to_all_s: Optional[float] = None
    tokens_per_s_with_all_to_all: Optional[float] = None
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def predict(cfg: GPTConfig, layout: StepShape, peak_tflops: Optional[float] = None,
            assumed_mfu: Optional[float] = None, vocab: Optional[int] = None, gpus_per_node: Optional[int] = None,
            intra_node_gb_s: Optional[float] = None, inter_node_gb_s: Optional[float] = None) -> Prediction:
    """Analytical step: FLOPs, memory, bubble; with a peak and an assumed *compute* MFU (the fraction
    of peak the matmuls reach while they run), also step time = compute / (1 - bubble share).
    Gradient reduce-scatter / param all-gather are assumed overlapped (or small), optimizer time ignored.
    With gpus_per_node and both bandwidths (GB/s per GPU and direction), an MoE model's all-to-all also
    becomes seconds (all_to_all_seconds), and the step time is given a second time with it added."""
    flops = step_flops(cfg, layout)
    executed = step_flops(cfg, layout, executed=True, vocab=vocab)
    pred = Prediction(layout=asdict(layout), flops_per_step=flops, executed_flops_per_step=executed,
                      tokens_per_step=layout.tokens_per_step,
                      bubble_fraction=bubble_fraction(layout.pp, layout.num_micro_batches, layout.vpp),
                      memory=memory_per_rank(cfg, layout), all_to_all_bytes_per_rank=all_to_all_bytes(cfg, layout),
                      peak_tflops=peak_tflops, assumed_mfu=assumed_mfu)
    if peak_tflops and assumed_mfu:
        compute = executed / layout.world_size / (peak_tflops * 1e12 * assumed_mfu)
        pred.step_time_s = compute * (1 + pred.bubble_fraction)
        pred.tokens_per_s = layout.tokens_per_step / pred.step_time_s
        pred.tflops_per_device = flops / pred.step_time_s / layout.world_size / 1e12
    if pred.all_to_all_bytes_per_rank and gpus_per_node and intra_node_gb_s and inter_node_gb_s:
        pred.all_to_all = all_to_all_seconds(cfg, layout, gpus_per_node, intra_node_gb_s, inter_node_gb_s)
        if pred.step_time_s:
            pred.step_time_with_all_to_all_s = pred.step_time_s + pred.all_to_all["seconds"]
            pred.tokens_per_s_with_all_to_all = layout.tokens_per_step / pred.step_time_with_all_to_all_s
    return pred
