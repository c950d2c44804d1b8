"""Qwen3-MoE on Megatron-Core: logits equal transformers' Qwen3MoeForCausalLM at EP1 and EP2 (2 gloo ranks,
CPU), through the expert mapping objects (models/qwen3_moe/mappings.py) and the HF checkpoint files'
per-expert tensors (what transformers' save_pretrained writes)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from megatron_spot.models.qwen3_moe.mappings import (
    ExpertFC2,
    ExpertGatedFC1,
    Router,
    expert_rows,
    global_expert_name,
)
from tests.multiprocess import run_on_ranks
from tests.tiny import QWEN3_MOE_TINY, hf_moe_model


@dataclass(frozen=True)
class _MoeShape:
    """The fields of the tiny config the mappings read (the family config comes with the registry)."""
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    moe_intermediate_size: int

    @property
    def num_query_groups(self):
        return self.num_key_value_heads

    @property
    def padded_vocab_size(self):
        return (self.vocab_size + 127) // 128 * 128


TINY = _MoeShape(**{k: QWEN3_MOE_TINY[k] for k in _MoeShape.__dataclass_fields__})


def _transformer_config(hf: dict, tp=1, pp=1, ep=1, etp=1, aux_loss_coeff=0.0):
    """Test-local builder: Megatron-Core's MoE settings that equal HF's Qwen3-MoE block."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"], num_query_groups=hf["num_key_value_heads"],
        kv_channels=hf["head_dim"], normalization="RMSNorm", layernorm_epsilon=hf["rms_norm_eps"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        num_moe_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        # HF: softmax over all experts, top-k, renormalised when norm_topk_prob. Megatron without pre-softmax
        # takes the top-k logits and softmaxes them: the same renormalised probabilities.
        moe_router_score_function="softmax", moe_router_pre_softmax=not hf["norm_topk_prob"],
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False, moe_expert_capacity_factor=None,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, use_cpu_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def _mapping_rows(cfg: _MoeShape) -> list:
    """Dense Qwen3 rows (attention, norms, embeddings) + the MoE rows, one list for the whole model."""
    from megatron_spot.models.qwen3.state_dict_adapter import (
        EMBEDDING,
        FINAL_NORM,
        LAYER_MAPPINGS,
        OUTPUT_LAYER,
        TensorMapping,
    )

    rows = [TensorMapping(*EMBEDDING)]
    attention = [r for r in LAYER_MAPPINGS if ".mlp." not in r[0]]
    for i in range(4):
        rows += [TensorMapping(m.format(i=i), tuple(n.format(i=i) for n in hf), kind) for m, hf, kind in attention]
        rows += [m.at(i) for m in expert_rows(cfg.num_experts)]
    return rows + [TensorMapping(*FINAL_NORM), TensorMapping(*OUTPUT_LAYER)]


def _to_mcore(row, hf: dict, cfg: _MoeShape) -> torch.Tensor:
    from megatron_spot.models.qwen3.state_dict_adapter import to_mcore

    tensors = [hf[n] for n in row.hf]
    return row.to_mcore(tensors, cfg) if hasattr(row, "to_mcore") else to_mcore(row, tensors, cfg)


@torch.no_grad()
def _load(model, full: dict, rows: dict, cfg: _MoeShape) -> None:
    """Put unsharded Megatron tensors into this rank's model: global layer and expert numbers, TP/ETP shards."""
    from megatron.core import parallel_state as ps

    from megatron_spot.models.qwen3.state_dict_adapter import _global_name, _shard

    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    for local_name, param in model.named_parameters():
        rank_name = _global_name(model, local_name)  # global layer number, local expert number
        name = global_expert_name(rank_name, ep_rank, cfg.num_experts // ep)
        row, tensor = rows[name], full[name]
        if isinstance(row, (ExpertGatedFC1, ExpertFC2)):
            assert row.ep_rank(cfg, ep) == ep_rank and row.local_mcore(cfg, ep) == rank_name
            tensor = row.tp_shard(tensor, param.partition_dim, ps.get_expert_tensor_parallel_rank(),
                                  ps.get_expert_tensor_parallel_world_size())
        else:
            tensor = _shard(tensor, param, name, ps.get_tensor_model_parallel_rank(),
                            ps.get_tensor_model_parallel_world_size())
        param.copy_(tensor)


def _logits_worker(rank, world_size, hf_files: dict, tokens: list, refs: list):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_spot.config import ParallelConfig
    from megatron_spot.platform import initialize

    rows = {r.mcore: r for r in _mapping_rows(TINY)}
    full = {name: _to_mcore(row, hf_files, TINY) for name, row in rows.items()}
    out = {}
    for ep in (1, 2):
        info = initialize(ParallelConfig(expert_parallel=ep), seed=3)
        spec = get_gpt_layer_local_spec(num_experts=TINY.num_experts, moe_grouped_gemm=False, qk_layernorm=True,
                                        normalization="RMSNorm")
        model = GPTModel(config=_transformer_config(QWEN3_MOE_TINY, ep=ep), transformer_layer_spec=spec,
                         vocab_size=TINY.padded_vocab_size, max_sequence_length=1024, position_embedding_type="rope",
                         rotary_base=1_000_000)
        _load(model, full, rows, TINY)
        local_experts = len(model.decoder.layers[0].mlp.experts.local_experts)
        # each rank its own tokens: the all-to-all exchanges unequal numbers of tokens per expert
        x = tokens[rank]
        pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
        with torch.no_grad():
            logits = model.eval()(x, pos, None)[..., : TINY.vocab_size]
        out[ep] = {"diff": (logits - refs[rank]).abs().max().item(), "scale": refs[rank].abs().max().item(),
                   "local_experts": local_experts, "layout": info.layout.describe()}
    # training forwards at EP2 with an aux-loss coefficient: the step's load-balancing loss and expert load
    from megatron_spot.training.moe_metrics import MoEStepMetrics

    model = GPTModel(config=_transformer_config(QWEN3_MOE_TINY, ep=2, aux_loss_coeff=0.01), transformer_layer_spec=spec,
                     vocab_size=TINY.padded_vocab_size, max_sequence_length=1024, position_embedding_type="rope",
                     rotary_base=1_000_000)
    _load(model, full, rows, TINY)
    meter = MoEStepMetrics([model], num_layers=4, num_experts=TINY.num_experts)
    with torch.no_grad():  # not counted: no autograd (reference scoring, evaluation)
        model.train()(x, pos, None)
    model.train()(x, pos, None).sum().backward()
    out["metrics"] = meter.collect(num_micro_batches=1)
    return out


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """The tiny model's files as transformers writes them (per-expert tensors), its reference logits."""
    from safetensors.torch import load_file

    model = hf_moe_model()
    folder = tmp_path_factory.mktemp("qwen3_moe_hf")
    model.save_pretrained(folder)
    files = load_file(str(folder / "model.safetensors"))
    tokens = [torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(r)) for r in range(2)]
    with torch.no_grad():
        outputs = [model(t, output_router_logits=True) for t in tokens]
    return {"files": files, "tokens": tokens, "refs": [o.logits for o in outputs],
            "router_logits": [o.router_logits for o in outputs]}


def test_mapping_names_and_shapes_are_the_checkpoint_files(hf_checkpoint):
    """The HF side of every row is a tensor of save_pretrained's files with the shape the row states, and
    every file tensor is covered once."""
    files = hf_checkpoint["files"]
    covered = []
    for row in _mapping_rows(TINY):
        if hasattr(row, "hf_shapes"):
            assert [tuple(files[n].shape) for n in row.hf] == [tuple(s) for s in row.hf_shapes(TINY)], row.mcore
        covered += row.hf
    assert sorted(covered) == sorted(files)


def test_expert_mappings_round_trip_bit_exact(hf_checkpoint):
    files = hf_checkpoint["files"]
    for row in _mapping_rows(TINY):
        if not isinstance(row, (Router, ExpertGatedFC1, ExpertFC2)):
            continue
        mcore = row.to_mcore([files[n] for n in row.hf], TINY)
        assert tuple(mcore.shape) == row.mcore_shape(TINY)
        for name, back in zip(row.hf, row.to_hf(mcore, TINY)):
            assert torch.equal(back, files[name]), name


def test_expert_placement_over_ranks():
    """Megatron-Core's contiguous blocks: at EP4 with 8 experts, rank r holds experts 2r, 2r+1."""
    fc1 = [r.at(3) for r in expert_rows(8) if isinstance(r, ExpertGatedFC1)]
    assert [r.ep_rank(TINY, 4) for r in fc1] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert fc1[5].local_mcore(TINY, 4) == "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight"
    assert global_expert_name("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", 2, 2) == \
        "decoder.layers.0.mlp.experts.local_experts.5.linear_fc2.weight"
    assert global_expert_name("decoder.layers.0.mlp.router.weight", 2, 2) == "decoder.layers.0.mlp.router.weight"
    # ETP2: each expert's [gate; up] split as [gate_r; up_r], down_proj along its input dim
    full = torch.arange(2 * 4 * 3.0).view(8, 3)
    assert torch.equal(fc1[0].tp_shard(full, 0, 1, 2), torch.cat([full[2:4], full[6:8]]))


@pytest.fixture(scope="module")
def logits_at_ep1_and_ep2(hf_checkpoint):
    c = hf_checkpoint
    return run_on_ranks(_logits_worker, world_size=2, args=(c["files"], c["tokens"], c["refs"]))


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
def test_megatron_moe_matches_transformers(logits_at_ep1_and_ep2, ep):
    """fp32 logits of Megatron-Core's MoE GPTModel (router, all-to-all dispatcher, SequentialMLP experts)
    equal transformers' Qwen3MoeForCausalLM on the same weights, on both ranks' different tokens."""
    for rank, result in enumerate(logits_at_ep1_and_ep2):
        r = result[ep]
        assert r["local_experts"] == 8 // ep, r
        assert r["scale"] > 0.1, r  # real logits, not a degenerate model
        assert r["diff"] <= 1e-5, (rank, r)
    if ep == 2:
        assert "EP2" in logits_at_ep1_and_ep2[0][2]["layout"]


@pytest.mark.slow
def test_step_metrics_report_aux_loss_and_expert_load(hf_checkpoint, logits_at_ep1_and_ep2):
    """MoEStepMetrics at EP2 against the same quantities from transformers' router logits: tokens routed to
    each expert per layer summed over both ranks' tokens, and Megatron-Core's per-micro-batch
    switch loss E / (k T^2) * sum_e P_e c_e (P_e: summed router probabilities, c_e: tokens sent to e, over
    one rank's T tokens), averaged over layers and data-parallel ranks."""
    k, experts = QWEN3_MOE_TINY["num_experts_per_tok"], TINY.num_experts
    counts = torch.zeros(4, experts)
    aux = []
    for per_layer in hf_checkpoint["router_logits"]:  # one rank's tokens
        for layer, logits in enumerate(per_layer):
            probs = logits.float().softmax(dim=-1)
            chosen = torch.zeros_like(probs).scatter_(1, probs.topk(k, dim=-1).indices, 1.0)
            counts[layer] += chosen.sum(0)
            tokens = probs.shape[0]
            aux.append(experts / (k * tokens * tokens) * (probs.sum(0) * chosen.sum(0)).sum())
    expected_aux = torch.stack(aux).mean().item()
    for result in logits_at_ep1_and_ep2:
        metrics = result["metrics"]
        assert metrics["moe_aux_loss"] == pytest.approx(expected_aux, rel=1e-5)
        load = metrics["moe_expert_load"]
        assert [entry["layer"] for entry in load] == [0, 1, 2, 3]
        for entry, row in zip(load, counts):
            assert entry["max"] == row.max().item() and entry["mean"] == pytest.approx(row.mean().item())
            assert entry["max_over_mean"] == pytest.approx((row.max() / row.mean()).item())
    assert counts.max() > counts.mean() * 1.2  # a load worth measuring: not uniform by construction
