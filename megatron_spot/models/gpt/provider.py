"""Any GPT-style family on Megatron-Core's GPTModel: TransformerConfig, layer-spec choice, model
construction and the model's fit to a layout. What differs between families comes from the family's
config hooks (models/gpt/config.py: transformer_config_kwargs, gpt_model_kwargs, configure_model,
layout_problems); this file names no family.

Layer spec: Transformer Engine when it imports and a GPU is present (needed for FP8 and sequence
parallel); Megatron-Core's local spec otherwise (CPU, or GPUs without TE).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_spot.config.dtypes import TORCH_DTYPES
from megatron_spot.config.loader import ConfigError
from megatron_spot.config.schema import MoEConfig, ParallelConfig, PrecisionConfig, RecomputeConfig
from megatron_spot.models.gpt.config import GPTConfig
from megatron_spot.platform.device import compute_capability, has_cuda, move_to_device, transformer_engine_available

log = logging.getLogger(__name__)

_FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def validate_model_layout(cfg: GPTConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                          recompute: Optional[RecomputeConfig] = None, world_size: Optional[int] = None,
                          training: bool = True) -> None:
    """Check that the model fits the layout and the platform; raise before anything is allocated.

    world_size: accepted for callers' convenience and ignored (the world is platform/layout.py's business).
    training: False for forward-only use (scoring, evaluation), which some layouts allow."""
    tp = parallel.tensor_parallel
    # the world-size rules are platform/layout.py's (Layout.from_config); this checks only the model's fit
    problems = cfg.layout_problems(tp, parallel.pipeline_parallel, parallel.virtual_pipeline,
                                   parallel.expert_parallel, parallel.expert_tensor_parallel)
    if problems:
        raise ConfigError("; ".join(problems))
    if precision.dtype not in TORCH_DTYPES:
        raise ConfigError(f"precision.dtype={precision.dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
    te = transformer_engine_available()
    if precision.fp8:
        if precision.fp8 not in ("hybrid", "e4m3"):
            raise ConfigError(f"precision.fp8={precision.fp8!r}: choose hybrid or e4m3 (or null for no FP8)")
        if precision.fp8_recipe not in _FP8_RECIPES:
            raise ConfigError(f"precision.fp8_recipe={precision.fp8_recipe!r}: choose one of {', '.join(_FP8_RECIPES)}")
        if not te:
            raise ConfigError(
                "precision.fp8 needs Transformer Engine on a CUDA GPU, which is not available here; "
                "set precision.fp8=null (and precision.dtype=bf16 on GPUs) or install transformer-engine"
            )
        if precision.dtype == "fp32":
            raise ConfigError("precision.fp8 trains FP8 GEMMs inside BF16/FP16 training; set precision.dtype=bf16")
        if precision.fp8_recipe == "mxfp8" and compute_capability()[0] < 10:
            raise ConfigError("precision.fp8_recipe=mxfp8 needs a Blackwell GPU (sm_100+); use delayed/tensorwise/blockwise")
        if precision.fp8_bf16_first_layers + precision.fp8_bf16_last_layers > cfg.num_hidden_layers:
            raise ConfigError("precision.fp8_bf16_first_layers + fp8_bf16_last_layers exceed the number of layers")
    if parallel.sequence_parallel and not te:
        raise ConfigError(
            "parallel.sequence_parallel needs Transformer Engine on a CUDA GPU; set parallel.sequence_parallel=false"
        )
    if parallel.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
    if cfg.num_moe_experts and tp > 1 and not parallel.sequence_parallel and training:
        # Megatron-Core's MoELayer refuses to train so (each TP rank would route the same tokens)
        raise ConfigError(f"training a mixture-of-experts model at parallel.tensor_parallel={tp} needs "
                          "parallel.sequence_parallel=true (Transformer Engine on GPUs); on CPU use "
                          "parallel.tensor_parallel=1 with parallel.expert_parallel")
    if recompute is not None and recompute.granularity not in (None, "selective", "full"):
        raise ConfigError(f"recompute.granularity={recompute.granularity!r}: choose selective, full or null")
    if recompute is not None and recompute.method not in ("uniform", "block"):
        raise ConfigError(f"recompute.method={recompute.method!r}: choose uniform or block")


def build_transformer_config(cfg: GPTConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                             recompute: Optional[RecomputeConfig] = None, use_te: Optional[bool] = None,
                             moe: Optional[MoEConfig] = None, training: bool = True):
    """moe: the run's `moe:` section (load balancing, capacity); used by mixture-of-experts families only."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    recompute = recompute or RecomputeConfig()
    validate_model_layout(cfg, parallel, precision, recompute, training=training)
    use_te = transformer_engine_available() if use_te is None else use_te
    on_gpu = has_cuda()
    dtype = TORCH_DTYPES[precision.dtype]
    vpp = parallel.virtual_pipeline if (parallel.virtual_pipeline or 1) > 1 else None
    batch_p2p = parallel.batch_p2p_comm
    if batch_p2p is None:
        # gloo mixes both directions' messages to one peer in batched p2p with interleaving
        batch_p2p = on_gpu
    fp8_kwargs = {}
    if precision.fp8:
        fp8_kwargs = dict(
            fp8=precision.fp8, fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
        if precision.fp8_bf16_first_layers or precision.fp8_bf16_last_layers:
            fp8_kwargs.update(first_last_layers_bf16=True,
                              num_layers_at_start_in_bf16=precision.fp8_bf16_first_layers,
                              num_layers_at_end_in_bf16=precision.fp8_bf16_last_layers)
    recompute_kwargs = {}
    if recompute.granularity == "full":
        recompute_kwargs = dict(recompute_granularity="full", recompute_method=recompute.method,
                                recompute_num_layers=recompute.num_layers)
    elif recompute.granularity == "selective":
        recompute_kwargs = dict(recompute_granularity="selective")
    fused = on_gpu  # fusions need CUDA kernels (apex/TE/triton)
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=0.02,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        batch_p2p_comm=batch_p2p,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=fused and use_te,
        masked_softmax_fusion=fused and use_te,
        persist_layer_norm=False,
        bias_dropout_fusion=fused and use_te,
        apply_rope_fusion=fused and use_te,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel or parallel.tensor_parallel,
        **fp8_kwargs,
        **recompute_kwargs,
        **cfg.transformer_config_kwargs(),
        **cfg.moe_transformer_config_kwargs(moe or MoEConfig(), use_te),
    )


def layer_spec(cfg: GPTConfig, use_te: bool, grouped_experts: bool = False, dense: bool = False):
    """The transformer layer spec: Transformer Engine's or the local one; an MoE family's experts grouped
    (TEGroupedMLP) or sequential (SequentialMLP), as the TransformerConfig's moe_grouped_gemm says;
    `dense`: the spec of an MoE family's layers that have a dense MLP instead (cfg.moe_layers)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    kwargs = cfg.layer_spec_kwargs(use_te)
    if dense:
        kwargs.pop("num_experts", None)
    grouped_experts = bool(grouped_experts and kwargs.get("num_experts"))
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(moe_grouped_gemm=grouped_experts, **kwargs)
    from megatron_spot.models.gpt.packed_attention import PackedDotProductAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", **kwargs)
    # packed pairs (THD): the local spec's attention refuses PackedSeqParams; this drop-in honours them
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    if grouped_experts:  # TEGroupedMLP without TE: its grouped linears in plain PyTorch
        from megatron_spot.models.gpt.grouped_experts import grouped_moe_module_spec

        spec.submodules.mlp = grouped_moe_module_spec(cfg.num_moe_experts)
    return spec


def decoder_spec(cfg: GPTConfig, transformer_config, use_te: bool, vp_stage: Optional[int]):
    """What GPTModel builds its decoder from: one layer spec when every layer is alike; with dense layers among
    an MoE family's layers (cfg.moe_layers), the spec of each layer this pipeline stage (and virtual stage)
    builds, as Megatron-Core's get_gpt_decoder_block_spec slices them."""
    spec = layer_spec(cfg, use_te, grouped_experts=transformer_config.moe_grouped_gemm)
    moe_layers = cfg.moe_layers
    if moe_layers is None:
        return spec
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    dense = layer_spec(cfg, use_te, dense=True)
    first = get_transformer_layer_offset(transformer_config, vp_stage=vp_stage)
    count = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    # the final norm: what GPTModel's block uses for a single layer spec (transformer_block._get_block_submodules)
    return TransformerBlockSubmodules(layer_specs=[spec if moe_layers[i] else dense for i in range(first, first + count)],
                                      layer_norm=LayerNormImpl)


def build_model_chunks(cfg: GPTConfig, transformer_config, use_te: Optional[bool] = None,
                       max_sequence_length: Optional[int] = None, model_cls=None,
                       fused_linear_loss: bool = True) -> list:
    """Build this rank's GPTModel chunk(s) (one per virtual pipeline stage) on the current device.

    Parallel state must be initialised (megatron_spot.platform.initialize). `fused_linear_loss`
    (config `model.fused_linear_loss`) selects the loss head that never builds the logits
    (see megatron_spot.models.gpt.model).
    """
    from megatron.core import parallel_state as ps

    if model_cls is None:
        from megatron_spot.models.gpt.model import SpotGPTModel as model_cls
    use_te = transformer_engine_available() if use_te is None else use_te
    vpp = transformer_config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = model_cls(
            config=transformer_config,
            transformer_layer_spec=decoder_spec(cfg, transformer_config, use_te, stage),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=max_sequence_length or cfg.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            vp_stage=stage,
            **cfg.gpt_model_kwargs(),
        )
        cfg.configure_model(model)
        model.family_config = cfg  # what the state-dict helpers (TP split, model checks) read
        model.valid_vocab_size = cfg.vocab_size
        model.fused_linear_loss = bool(fused_linear_loss)
        chunks.append(move_to_device(model))
    return chunks


def meta_parameter_count(cfg: GPTConfig, parallel: Optional[ParallelConfig] = None) -> int:
    """Parameters of this rank's Megatron model, built on the meta device (no weights allocated).

    Parallel state must be initialised; at TP1PP1 this is the whole model (padded vocabulary).
    """
    parallel = parallel or ParallelConfig()
    tc = build_transformer_config(cfg, parallel, PrecisionConfig(dtype="bf16"), use_te=False, training=False)
    tc.perform_initialization = False
    tc.use_cpu_initialization = True  # factories without an explicit device follow the meta context
    with torch.device("meta"):
        chunks = build_model_chunks(cfg, tc, use_te=False)
    return sum(p.numel() for c in chunks for p in c.parameters())


def build_unsharded_model(cfg: GPTConfig, dtype: str) -> list:
    """The TP1PP1 model chunks in `dtype`, without random init (a converter overwrites every weight)."""
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig(dtype=dtype), training=False)
    tc.perform_initialization = False
    return build_model_chunks(cfg, tc)
