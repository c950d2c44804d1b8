"""The qwen3_moe family: presets and parameter counts against transformers, config.json refusals, layout
rules, the router/expert mapping objects against the files transformers writes, and Megatron-Core's MoE
model (router, all-to-all dispatcher, SequentialMLP experts and grouped TEGroupedMLP experts) equal to
transformers' Qwen3MoeForCausalLM at EP1 and EP2 on 2 gloo ranks (CPU), with the step metrics (aux loss,
expert load), training at EP1/EP2 with either expert layout, and every load-balancing type and the z-loss
(values and router gradients) against their definitions recomputed from transformers' router logits."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_spot.config import ConfigError, MoEConfig, ParallelConfig, PrecisionConfig, RecomputeConfig
from megatron_spot.models import family_of, load_model_config, state_dict_adapter, validate_model_layout
from megatron_spot.models.qwen3_moe import PRESETS, Qwen3MoeConfig
from megatron_spot.models.qwen3_moe.mappings import ExpertFC2, ExpertGatedFC1, expert_rows
from tests.multiprocess import run_on_ranks
from tests.tiny import hf_config_of, hf_model_of

TINY = "qwen3-moe-tiny"


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("preset, active_billions", [("qwen3-30b-a3b", 3), ("qwen3-235b-a22b", 22)])
def test_released_presets_count_what_transformers_builds(preset, active_billions):
    """Total parameters equal transformers' Qwen3MoeForCausalLM built on the meta device from our
    config.json; active parameters (top-k experts) round to the released name's A3B / A22B."""
    import transformers

    cfg = load_model_config(preset)
    assert family_of(cfg).name == "qwen3_moe" and cfg.num_experts == 128 and cfg.num_experts_per_tok == 8
    assert cfg.norm_topk_prob and not cfg.tie_word_embeddings
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config_of(cfg))
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_parameters()
    assert round(cfg.active_parameters() / 1e9) == active_billions
    # the 6N of a token: its top-k experts, not all 128
    assert cfg.matmul_params_per_token() < cfg.active_parameters() < cfg.num_parameters() / 8


def test_config_json_round_trip_and_refusals(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen3-30b-a3b"]))
    cfg = load_model_config(str(tmp_path))
    assert cfg == load_model_config("qwen3-30b-a3b")
    assert Qwen3MoeConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    tiny = PRESETS[TINY]
    for changes, match in [
        (dict(decoder_sparse_step=0), "decoder_sparse_step=0 must be an integer >= 1"),
        (dict(mlp_only_layers=[4]), r"mlp_only_layers=\[4\] must list layer numbers in \[0, 4\)"),
        (dict(mlp_only_layers=[0, 1, 2, 3]), "leave no MoE layer"),
        (dict(decoder_sparse_step=5), "leave no MoE layer"),
        (dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size"),
        (dict(num_experts=None), "missing field.*num_experts"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
        (dict(use_sliding_window=True, sliding_window=128), "sliding-window"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Qwen3MoeConfig.from_hf_dict(dict(tiny, **changes))


@pytest.mark.parametrize("changes, moe_layers", [
    (dict(decoder_sparse_step=2), (False, True, False, True)),
    (dict(mlp_only_layers=[0, 2]), (False, True, False, True)),
    (dict(decoder_sparse_step=3, mlp_only_layers=[1]), (False, False, True, False)),
])
def test_dense_layers_among_moe_layers_as_transformers_builds_them(changes, moe_layers, tmp_path):
    """decoder_sparse_step / mlp_only_layers: the same layers are MoE layers as in transformers'
    Qwen3MoeForCausalLM, whose parameter count (dense MLPs of intermediate_size elsewhere) ours equals; the
    mapping rows cover exactly the tensors transformers saves; Megatron-Core gets the per-layer pattern."""
    import transformers
    from safetensors.torch import load_file

    cfg = Qwen3MoeConfig.from_hf_dict(dict(PRESETS[TINY], **changes))
    assert cfg.moe_layers == moe_layers and cfg.moe_layer_fraction == sum(moe_layers) / 4
    assert Qwen3MoeConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config_of(cfg))
    assert tuple(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers) == moe_layers
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_parameters()
    hf_model_of(cfg, seed=0).save_pretrained(tmp_path)
    files = load_file(str(tmp_path / "model.safetensors"))
    assert state_dict_adapter.hf_shapes(cfg) == {n: tuple(t.shape) for n, t in files.items()}
    assert cfg.moe_transformer_config_kwargs(MoEConfig(), use_te=False)["moe_layer_freq"] == [int(m) for m in moe_layers]
    # a token's matmuls: attention everywhere, top-k experts in MoE layers, the whole MLP in dense ones
    all_moe = load_model_config(TINY)
    dense_mlp, top_k_experts = 3 * 64 * 128, 2 * 3 * 64 * 32 + 8 * 64  # (router included)
    assert cfg.matmul_params_per_token() == all_moe.matmul_params_per_token() + (4 - sum(moe_layers)) * (
        dense_mlp - top_k_experts)


@pytest.mark.parametrize("preset, parallel, match", [
    (TINY, ParallelConfig(expert_parallel=3), "expert_parallel=3 does not divide the 8 experts"),
    (TINY, ParallelConfig(tensor_parallel=2, expert_tensor_parallel=3), "expert_tensor_parallel=3 does not divide"),
    (TINY, ParallelConfig(tensor_parallel=2), "needs parallel.sequence_parallel=true"),
    ("qwen3-tiny", ParallelConfig(expert_parallel=2), "expert_parallel=2 needs a mixture-of-experts model"),
])
def test_bad_expert_layouts_fail_fast(preset, parallel, match):
    with pytest.raises(ConfigError, match=match):
        validate_model_layout(load_model_config(preset), parallel, PrecisionConfig(), RecomputeConfig())


def test_tensor_parallel_without_sequence_parallel_may_score():
    """Megatron-Core's MoELayer refuses TP > 1 without sequence parallel only in training."""
    validate_model_layout(load_model_config(TINY), ParallelConfig(tensor_parallel=2), PrecisionConfig(), training=False)


def test_moe_settings_reach_megatron():
    cfg = load_model_config(TINY)
    kw = cfg.moe_transformer_config_kwargs(MoEConfig(), use_te=False)
    assert (kw["num_moe_experts"], kw["moe_router_topk"], kw["moe_ffn_hidden_size"]) == (8, 2, 32)
    assert kw["moe_aux_loss_coeff"] == 0.001 and kw["moe_expert_capacity_factor"] is None  # released, dropless
    assert kw["moe_router_pre_softmax"] is False  # norm_topk_prob: softmax over the top-k logits
    assert cfg.moe_transformer_config_kwargs(MoEConfig(aux_loss_coeff=0.0), use_te=False)["moe_aux_loss_coeff"] == 0
    assert cfg.moe_transformer_config_kwargs(MoEConfig(z_loss_coeff=0.0), use_te=False)["moe_z_loss_coeff"] is None
    with pytest.raises(ConfigError, match="moe.z_loss_coeff=-0.1"):
        cfg.moe_transformer_config_kwargs(MoEConfig(z_loss_coeff=-0.1), use_te=False)
    with pytest.raises(ConfigError, match="moe.load_balancing='sinkhorn'"):
        cfg.moe_transformer_config_kwargs(MoEConfig(load_balancing="sinkhorn"), use_te=False)
    # expert layout: grouped (TEGroupedMLP) where Transformer Engine runs unless asked otherwise
    grouped = {(experts, te): cfg.moe_transformer_config_kwargs(MoEConfig(experts=experts), use_te=te)["moe_grouped_gemm"]
               for experts in ("auto", "grouped", "sequential") for te in (False, True)}
    assert grouped == {("auto", False): False, ("auto", True): True, ("grouped", False): True,
                       ("grouped", True): True, ("sequential", False): False, ("sequential", True): False}
    with pytest.raises(ConfigError, match="moe.experts='fused'"):
        cfg.moe_transformer_config_kwargs(MoEConfig(experts="fused"), use_te=False)


# ---------------------------------------------------------------------------------------------- mappings
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """The tiny model's files as transformers writes them (per-expert tensors), and its reference outputs
    on two batches (one per rank)."""
    from safetensors.torch import load_file

    cfg = load_model_config(TINY)
    model = hf_model_of(cfg, seed=0)
    folder = tmp_path_factory.mktemp("qwen3_moe_hf")
    model.save_pretrained(folder)
    files = load_file(str(folder / "model.safetensors"))
    tokens = [torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(r)) for r in range(2)]
    with torch.no_grad():
        outputs = [model(t, output_router_logits=True) for t in tokens]
    # with dense layers among the MoE ones (decoder_sparse_step 2: layers 1 and 3 MoE)
    mixed_model = hf_model_of(Qwen3MoeConfig.from_hf_dict(dict(PRESETS[TINY], decoder_sparse_step=2)), seed=5)
    mixed_folder = tmp_path_factory.mktemp("qwen3_moe_mixed_hf")
    mixed_model.save_pretrained(mixed_folder)
    with torch.no_grad():
        mixed = [mixed_model(t, output_router_logits=True) for t in tokens]
    return {"files": files, "tokens": tokens, "refs": [o.logits for o in outputs],
            "router_logits": [o.router_logits for o in outputs], "folder": str(folder),
            "mixed": {"files": load_file(str(mixed_folder / "model.safetensors")), "refs": [o.logits for o in mixed],
                      "router_logits": [[r for r in o.router_logits if r is not None] for o in mixed]}}


def test_mapping_covers_the_checkpoint_files(hf_checkpoint):
    """Every row's HF tensors are tensors of save_pretrained's files with the shapes the row states, and
    the rows cover every file tensor once (transformers 5 splits its fused experts when it saves)."""
    cfg, files = load_model_config(TINY), hf_checkpoint["files"]
    assert state_dict_adapter.hf_shapes(cfg) == {n: tuple(t.shape) for n, t in files.items()}
    assert state_dict_adapter.hf_tensor_problems({n: t.shape for n, t in files.items()}, cfg)[0] is None


def test_mappings_round_trip_bit_exact(hf_checkpoint):
    cfg, files = load_model_config(TINY), hf_checkpoint["files"]
    for row in state_dict_adapter.mapping_table(cfg):
        mcore = row.to_mcore([files[n] for n in row.hf], cfg)
        assert tuple(mcore.shape) == row.mcore_shape(cfg), row.mcore
        for name, back in zip(row.hf, row.to_hf(mcore, cfg)):
            assert torch.equal(back, files[name]), name


def test_expert_placement_over_ranks():
    """Megatron-Core's contiguous blocks: at EP4 with 8 experts, rank r holds experts 2r, 2r+1."""
    cfg = load_model_config(TINY)
    fc1 = [r.at(3) for r in expert_rows(8) if isinstance(r, ExpertGatedFC1)]
    assert [r.ep_rank(cfg, 4) for r in fc1] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert fc1[5].local_mcore(cfg, 4) == "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight"
    fc2 = [r.at(0) for r in expert_rows(8) if isinstance(r, ExpertFC2)]
    assert fc2[7].mcore == "decoder.layers.0.mlp.experts.local_experts.7.linear_fc2.weight"
    assert fc2[7].hf == ("model.layers.0.mlp.experts.7.down_proj.weight",)
    # ETP2: each expert's [gate; up] split as [gate_r; up_r]
    full = torch.arange(2 * 4 * 3.0).view(8, 3)
    assert torch.equal(fc1[0].tp_shard(full, 0, 1, 2), torch.cat([full[2:4], full[6:8]]))


# ---------------------------------------------------------------------------------------------- numerics
def _logits_worker(rank, world_size, hf_files: dict, tokens: list, refs: list, mixed_files: dict, mixed_refs: list):
    from megatron_spot.models import build_model_chunks, build_transformer_config
    from megatron_spot.platform import initialize
    from megatron_spot.training.moe_metrics import MoEStepMetrics

    cfg = load_model_config(TINY)
    full = state_dict_adapter.hf_to_mcore_state_dict(hf_files, cfg)
    x = tokens[rank]  # each rank its own tokens: the all-to-all exchanges unequal numbers per expert
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
    out = {}
    for ep, experts in ((1, "sequential"), (2, "sequential"), (1, "grouped"), (2, "grouped")):
        parallel = ParallelConfig(expert_parallel=ep)
        info = initialize(parallel, seed=3)
        tc = build_transformer_config(cfg, parallel, PrecisionConfig(),
                                      moe=MoEConfig(aux_loss_coeff=0.0, experts=experts))
        model = build_model_chunks(cfg, tc)[0]
        state_dict_adapter.load_full_state_dict([model], full)
        with torch.no_grad():
            logits = model.eval()(x, pos, None)[..., : cfg.vocab_size]
        module = model.decoder.layers[0].mlp.experts
        out[(ep, experts)] = {"diff": (logits - refs[rank]).abs().max().item(), "scale": refs[rank].abs().max().item(),
                              "local_experts": module.num_local_experts, "module": type(module).__name__,
                              "parameters": sorted(n for n, _ in module.named_parameters()),
                              "layout": info.layout.describe()}
    # training forwards at EP2 with an aux-loss coefficient: the step's load-balancing loss and expert load
    tc = build_transformer_config(cfg, parallel, PrecisionConfig(), moe=MoEConfig(aux_loss_coeff=0.01))
    model = build_model_chunks(cfg, tc)[0]
    state_dict_adapter.load_full_state_dict([model], full)
    meter = MoEStepMetrics([model], num_layers=cfg.num_hidden_layers, num_experts=cfg.num_experts)
    with torch.no_grad():  # not counted: no autograd (reference scoring, evaluation)
        model.train()(x, pos, None)
    model.train()(x, pos, None)  # a training forward (no backward: Megatron-Core's aux-loss scale is the
    out["metrics"] = meter.collect(num_micro_batches=1)  # pipeline schedule's to set, as in the engine below)
    meter.remove()
    out["balancing"] = {name: _balancing_metrics(cfg, full, parallel, x, pos, *case)
                        for name, case in BALANCING.items()}
    out["mixed"] = _mixed_layers(parallel, x, pos, mixed_files, mixed_refs[rank])
    # SPoT training through the engine at EP1 and EP2 (DP2 both), the same global batch
    from tests.tiny import random_pairs_batch

    global_batch = [random_pairs_batch(1, 8, 16, cfg.vocab_size, seed=100 + i) for i in range(4)]
    out["train"] = {(ep, name): _train(cfg, full, global_batch, ep, TRAIN_MOE[name])
                    for ep, name in ((1, "aux0"), (2, "aux0"), (2, "released"), (2, "grouped"), (2, "seq"),
                                     (2, "global"), (2, "z"), (2, "none"))}
    return out


def _mixed_layers(parallel, x, pos, hf_files, ref) -> dict:
    """A Qwen3-MoE with dense layers among its MoE ones (decoder_sparse_step 2: layers 1 and 3 MoE) at EP2:
    logits against transformers' model (`ref`), and a training forward's step metrics."""
    from megatron_spot.models import build_model_chunks, build_transformer_config
    from megatron_spot.training.moe_metrics import MoEStepMetrics

    cfg = Qwen3MoeConfig.from_hf_dict(dict(PRESETS[TINY], decoder_sparse_step=2))
    full = state_dict_adapter.hf_to_mcore_state_dict(hf_files, cfg)
    tc = build_transformer_config(cfg, parallel, PrecisionConfig(), moe=MoEConfig(aux_loss_coeff=0.01))
    model = build_model_chunks(cfg, tc)[0]
    state_dict_adapter.load_full_state_dict([model], full)
    meter = MoEStepMetrics([model], num_layers=cfg.num_hidden_layers, num_experts=cfg.num_experts,
                           moe_layer_freq=tc.moe_layer_freq)
    with torch.no_grad():
        logits = model.eval()(x, pos, None)[..., : cfg.vocab_size]
    model.train()(x, pos, None)
    metrics = meter.collect(num_micro_batches=1)
    meter.remove()
    return {"diff": (logits - ref).abs().max().item(), "scale": ref.abs().max().item(),
            "mlp": [type(layer.mlp).__name__ for layer in model.decoder.layers], "metrics": metrics}


# The load-balancing types and the z-loss on training forwards of each rank's rows (Megatron-Core's MoE config,
# micro-batches): global_aux_loss in two micro-batches of one row, for its running average over the global
# batch's micro-batches; the last with padding at the end of the second row, which the routers leave out.
PADDED = 5  # padding tokens at the end of row 1 in the "padded" case
BALANCING = {  # name: (MoE settings, micro-batches, padded)
    "seq": (MoEConfig(load_balancing="seq_aux_loss", aux_loss_coeff=0.01), 1, False),
    "global": (MoEConfig(load_balancing="global_aux_loss", aux_loss_coeff=0.01), 2, False),
    "z": (MoEConfig(load_balancing="none", aux_loss_coeff=0.01, z_loss_coeff=0.001), 1, False),
    "padded": (MoEConfig(aux_loss_coeff=0.01, z_loss_coeff=0.001), 1, True),
}


def _balancing_metrics(cfg, full, parallel, x, pos, moe, micro_batches, padded):
    from megatron_spot.models import build_model_chunks, build_transformer_config
    from megatron_spot.training.moe_metrics import MoEStepMetrics

    tc = build_transformer_config(cfg, parallel, PrecisionConfig(), moe=moe)
    model = build_model_chunks(cfg, tc)[0]
    state_dict_adapter.load_full_state_dict([model], full)
    meter = MoEStepMetrics([model], num_layers=cfg.num_hidden_layers, num_experts=cfg.num_experts)
    extra = {}
    if padded:  # Megatron-Core's padding mask [b, s]: True at padding
        extra["padding_mask"] = torch.zeros_like(x, dtype=torch.bool)
        extra["padding_mask"][1, -PADDED:] = True
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # what the pipeline schedule sets: here 1 per micro-batch
    for rows in x.chunk(micro_batches):
        logits = model.train()(rows, pos[: len(rows)], None, **extra)
        (logits * 0).sum().backward()  # no main loss: the routers' gradients are the losses' alone
    metrics = meter.collect(num_micro_batches=micro_batches)
    meter.remove()
    metrics["router_grads"] = [layer.mlp.router.weight.grad.clone() for layer in model.decoder.layers]
    return metrics


TRAIN_STEPS = 4
# the MoE settings of the engine runs below (experts: sequential unless named)
TRAIN_MOE = {"aux0": dict(aux_loss_coeff=0.0), "released": dict(aux_loss_coeff=None),
             "grouped": dict(aux_loss_coeff=0.0, experts="grouped"),
             "seq": dict(load_balancing="seq_aux_loss", aux_loss_coeff=0.01),
             "global": dict(load_balancing="global_aux_loss", aux_loss_coeff=0.01),
             "z": dict(aux_loss_coeff=0.0, z_loss_coeff=0.01),
             "none": dict(load_balancing="none", aux_loss_coeff=0.01)}


def _train(cfg, full, global_batch, ep, moe: dict):
    """Per-step losses and the last step's metrics of spot-bco training (fp32, AdamW, distributed optimizer)."""
    from megatron_spot.config import TrainConfig
    from megatron_spot.platform import initialize
    from megatron_spot.training.engine import Engine

    tc = TrainConfig()
    tc.parallel.expert_parallel = ep
    tc.loss.objective = "spot-bco"
    tc.optimizer.lr, tc.optimizer.warmup_fraction = 1e-3, 0.0
    tc.moe.experts = "sequential"
    for key, value in moe.items():
        setattr(tc.moe, key, value)
    info = initialize(tc.parallel, seed=7)
    engine = Engine(tc, cfg, total_steps=TRAIN_STEPS,
                    load_weights=lambda chunks: state_dict_adapter.load_full_state_dict(chunks, full))
    per_rank = len(global_batch) // info.dp
    mine = [dict(mb) for mb in global_batch[info.dp_rank * per_rank:(info.dp_rank + 1) * per_rank]]
    for mb, seq in zip(mine, engine.sequence_logps(mine)):  # reference = the starting model
        mb["ref_logps"] = seq.float()
    steps = [engine.train_step(mine) for _ in range(TRAIN_STEPS)]
    return {"losses": [s["loss"] for s in steps], "last": steps[-1], "dp": info.dp}


@pytest.fixture(scope="module")
def logits_at_ep1_and_ep2(hf_checkpoint):
    c = hf_checkpoint
    return run_on_ranks(_logits_worker, world_size=2,
                        args=(c["files"], c["tokens"], c["refs"], c["mixed"]["files"], c["mixed"]["refs"]))


@pytest.mark.slow
@pytest.mark.parametrize("experts", ["sequential", "grouped"])
@pytest.mark.parametrize("ep", [1, 2])
def test_megatron_moe_matches_transformers(logits_at_ep1_and_ep2, ep, experts):
    """fp32 logits of the family's Megatron-Core model (weights from the HF files through the mappings)
    equal transformers' Qwen3MoeForCausalLM, on both ranks' different tokens, with either expert layout:
    SequentialMLP (`local_experts.{e}`) or TEGroupedMLP (`weight{e}` of one grouped linear per layer)."""
    for rank, result in enumerate(logits_at_ep1_and_ep2):
        r = result[(ep, experts)]
        print(f"EP{ep} {experts} rank {rank}: max abs logit diff vs transformers {r['diff']:.3g}")
        assert r["local_experts"] == 8 // ep, r
        assert r["scale"] > 0.1, r  # real logits, not a degenerate model
        assert r["diff"] <= 1e-5, (rank, r)
    r = logits_at_ep1_and_ep2[0][(ep, experts)]
    if experts == "grouped":
        assert r["module"] == "TEGroupedMLP"
        assert r["parameters"] == sorted(f"linear_fc{i}.weight{e}" for i in (1, 2) for e in range(8 // ep))
    else:
        assert r["module"] == "SequentialMLP"
    if ep == 2:
        assert "EP2" in r["layout"]


@pytest.mark.slow
def test_step_metrics_report_aux_loss_and_expert_load(hf_checkpoint, logits_at_ep1_and_ep2):
    """MoEStepMetrics at EP2 against the same quantities from transformers' router logits: tokens routed to
    each expert per layer summed over both ranks' tokens, and Megatron-Core's per-micro-batch
    switch loss E / (k T^2) * sum_e P_e c_e (P_e: summed router probabilities, c_e: tokens sent to e, over
    one rank's T tokens), averaged over layers and data-parallel ranks."""
    cfg = load_model_config(TINY)
    k, experts = cfg.num_experts_per_tok, cfg.num_experts
    counts = torch.zeros(cfg.num_hidden_layers, experts)
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
        assert metrics["moe_expert_load_max"] == counts.max(dim=1).values.tolist()  # per layer
        assert metrics["moe_expert_load_mean"] == counts.mean().item() == 2 * 2 * 24 * k / experts  # ranks x rows x len
        assert metrics["moe_load_imbalance"] == pytest.approx((counts.max(dim=1).values / counts.mean()).max().item())
    assert counts.max() > counts.mean() * 1.2  # a load worth measuring: not uniform by construction


@pytest.mark.slow
def test_expert_parallel_trains_like_one_rank(logits_at_ep1_and_ep2):
    """With the aux-loss coefficient 0, spot-bco losses at EP2 equal EP1's step by step (fp32; the experts'
    gradients are summed in another order, nothing else differs); the released coefficient (0.001) adds
    the load-balancing loss's gradient and logs it with the expert load."""
    train = logits_at_ep1_and_ep2[0]["train"]
    ep1, ep2, released = train[(1, "aux0")], train[(2, "aux0")], train[(2, "released")]
    grouped = train[(2, "grouped")]
    assert ep1["dp"] == ep2["dp"] == 2
    assert len(set(ep1["losses"])) == TRAIN_STEPS  # it trains: every step's loss differs
    print(f"spot-bco losses EP1 {ep1['losses']} EP2 {ep2['losses']}: max diff "
          f"{max(abs(a - b) for a, b in zip(ep1['losses'], ep2['losses'])):.3g}")
    for a, b, c in zip(ep1["losses"], ep2["losses"], grouped["losses"]):
        assert abs(a - b) <= 1e-5, (ep1["losses"], ep2["losses"])
        assert abs(c - b) <= 1e-6, (grouped["losses"], ep2["losses"])  # the same matmuls, another module
    assert "moe_aux_loss" not in ep2["last"] and len(ep2["last"]["moe_expert_load_max"]) == 4
    assert released["last"]["moe_aux_loss"] > 0 and released["last"]["moe_load_imbalance"] >= 1.0
    assert released["losses"][0] == pytest.approx(ep2["losses"][0], abs=1e-6)  # aux loss: not in the SPoT loss
    assert released["losses"][1:] != ep2["losses"][1:]  # but its gradient moved the routers
    # every rank reports the same metrics
    assert [r["train"][(2, "released")]["last"]["moe_aux_loss"] for r in logits_at_ep1_and_ep2] == \
        [released["last"]["moe_aux_loss"]] * 2


def _switch(probs, tokens_per_expert, tokens, k):
    """Megatron-Core's switch_load_balancing_loss_func (moe_utils.py) without the coefficient:
    E / (k T^2) * sum_e P_e c_e (P_e: summed router probabilities of these tokens, c_e: tokens sent to e, T tokens)."""
    return (probs.sum(0) * tokens_per_expert).sum() * probs.shape[1] / (k * tokens * tokens)


def _balancing_terms(case, router_logits, rows, k):
    """Each rank's recorded loss per layer and micro-batch, [ranks, layers, micro-batches], recomputed from
    transformers' router logits (per rank, per layer: [rows x length, E], row-major) the way
    megatron/core/transformer/moe/router.py defines them (differentiable in the logits; the tokens per
    expert are counts):
    - aux (the "padded" case, padding left out): the switch loss of the rank's micro-batch;
    - seq: the switch loss of each sequence (row) on its own, averaged over the micro-batch's rows;
    - global: micro-batch j = row j of every rank; tokens per expert counted over all ranks' rows j and
      averaged over the micro-batches seen so far (Megatron's running average), T = all ranks' tokens of the
      micro-batch; each rank's term has its own tokens' probabilities (the terms add up over ranks);
    - z: mean over tokens of logsumexp(router logits)^2."""
    length = router_logits[0][0].shape[0] // rows
    valid = torch.ones(rows * length, dtype=torch.bool)
    if case == "padded":
        valid[rows * length - PADDED:] = False
    routed = [[(lg.float().softmax(-1), torch.zeros_like(lg, dtype=torch.float32).scatter_(
        1, lg.detach().topk(k, dim=-1).indices, 1.0)) for lg in rank] for rank in router_logits]
    terms = []
    for r, rank in enumerate(routed):
        per_layer = []
        for layer, (probs, chosen) in enumerate(rank):
            if case == "seq":
                per_layer.append([sum(_switch(probs[i * length:(i + 1) * length], chosen[i * length:(i + 1) * length]
                                              .sum(0), length, k) for i in range(rows)) / rows])
            elif case == "global":
                seen, slots = 0, []
                for j in range(rows):
                    seen = seen + sum(other[layer][1][j * length:(j + 1) * length].sum(0) for other in routed)
                    slots.append(_switch(probs[j * length:(j + 1) * length], seen / (j + 1),
                                         len(routed) * length, k))
                per_layer.append(slots)
            elif case == "z":
                per_layer.append([router_logits[r][layer].float().logsumexp(-1).square().mean()])
            else:  # padded: aux_loss and z-loss over the tokens that are not padding
                per_layer.append([_switch(probs[valid], chosen[valid].sum(0), int(valid.sum()), k),
                                  router_logits[r][layer][valid].float().logsumexp(-1).square().mean()])
        terms.append(torch.stack([torch.stack(t) for t in per_layer]))
    return torch.stack(terms)


@pytest.mark.slow
def test_load_balancing_types_match_their_formulas(hf_checkpoint, logits_at_ep1_and_ep2):
    """seq_aux_loss, global_aux_loss and the z-loss that Megatron-Core computes in our model at EP2 (what
    metrics.jsonl logs as moe_seq_aux_loss, moe_global_aux_loss, moe_z_loss) against their definitions
    (_balancing_terms) recomputed from transformers' router logits of both ranks' rows, reduced as Megatron-Core
    reports them (seq, z, aux: mean over ranks, layers, micro-batches; global: its terms summed over ranks,
    then the mean over layers and micro-batches); with padding at the end of a row, the switch loss, the
    z-loss and the expert load over the other tokens only."""
    cfg = load_model_config(TINY)
    k, experts, layers = cfg.num_experts_per_tok, cfg.num_experts, cfg.num_hidden_layers
    logits = hf_checkpoint["router_logits"]
    rows, length = hf_checkpoint["tokens"][0].shape
    ranks = len(logits)
    seq = _balancing_terms("seq", logits, rows, k).mean().item()
    global_running = _balancing_terms("global", logits, rows, k).sum(0).mean().item()
    z = _balancing_terms("z", logits, rows, k).mean().item()
    aux_padded, z_padded = _balancing_terms("padded", logits, rows, k).mean(dim=(0, 1)).tolist()
    # what they are not: the switch loss of each rank's micro-batch (aux_loss), global counts without the
    # running average, the padded rows' losses with the padding counted
    routed = [[(lg.softmax(-1), torch.zeros_like(lg).scatter_(1, lg.topk(k, dim=-1).indices, 1.0)) for lg in rank]
              for rank in logits]
    aux = sum(_switch(p, c.sum(0), rows * length, k).item() for rank in routed for p, c in rank) / (ranks * layers)
    global_per_slot = sum(_switch(torch.cat([rank[layer][0][j * length:(j + 1) * length] for rank in routed]),
                                  sum(rank[layer][1][j * length:(j + 1) * length].sum(0) for rank in routed),
                                  ranks * length, k).item()
                          for layer in range(layers) for j in range(rows)) / (layers * rows)
    values = [aux, seq, global_running, global_per_slot]
    assert min(abs(a - b) / a for i, a in enumerate(values) for b in values[i + 1:]) > 1e-3, values
    assert abs(aux_padded - aux) / aux > 1e-3 and abs(z_padded - z) / z > 1e-4  # the padding matters
    valid = torch.ones(rows * length, dtype=torch.bool)
    valid[rows * length - PADDED:] = False
    load_padded = torch.stack([sum(rank[layer][1][valid].sum(0) for rank in routed) for layer in range(layers)])
    print(f"aux {aux:.6f} seq {seq:.6f} global {global_running:.6f} (per micro-batch counts {global_per_slot:.6f}) "
          f"z {z:.4f}; padded: aux {aux_padded:.6f} z {z_padded:.4f}")
    for result in logits_at_ep1_and_ep2:
        got = result["balancing"]
        assert got["seq"]["moe_seq_aux_loss"] == pytest.approx(seq, rel=1e-5)
        assert got["global"]["moe_global_aux_loss"] == pytest.approx(global_running, rel=1e-5)
        assert got["z"]["moe_z_loss"] == pytest.approx(z, rel=1e-5)
        # each type logs under its own name only; load_balancing=none: no load-balancing loss at all
        assert [m for m in got["seq"] if m.startswith("moe_") and m.endswith("_loss")] == ["moe_seq_aux_loss"]
        assert [m for m in got["global"] if m.startswith("moe_") and m.endswith("_loss")] == ["moe_global_aux_loss"]
        assert [m for m in got["z"] if m.startswith("moe_") and m.endswith("_loss")] == ["moe_z_loss"]
        padded = got["padded"]
        assert padded["moe_aux_loss"] == pytest.approx(aux_padded, rel=1e-5)
        assert padded["moe_z_loss"] == pytest.approx(z_padded, rel=1e-5)
        assert padded["moe_expert_load_max"] == load_padded.max(dim=1).values.tolist()
        assert padded["moe_expert_load_mean"] == ranks * (rows * length - PADDED) * k / experts


@pytest.fixture(scope="module")
def hf_model_for_gradients():
    """hf_checkpoint's model again (same seed), built once for the gradient checks."""
    return hf_model_of(load_model_config(TINY), seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BALANCING))
def test_load_balancing_gradients_match_their_formulas(hf_checkpoint, logits_at_ep1_and_ep2, hf_model_for_gradients,
                                                       case):
    """The gradient each loss adds: every router's weight gradient on each rank (no main loss) equals the
    gradient of sum over layers and micro-batches of coefficient x _balancing_terms, by autograd through
    transformers' model on the rank's rows (1e-4 of the largest entry)."""
    cfg = load_model_config(TINY)
    moe, _, _ = BALANCING[case]
    coeffs = {"z": [moe.z_loss_coeff], "padded": [moe.aux_loss_coeff, moe.z_loss_coeff]}.get(case, [moe.aux_loss_coeff])
    model = hf_model_for_gradients
    counts_from = hf_checkpoint["router_logits"]  # the other ranks' routing (global_aux_loss counts all ranks)
    rows = hf_checkpoint["tokens"][0].shape[0]
    for rank, tokens in enumerate(hf_checkpoint["tokens"]):
        model.zero_grad()
        mine = model(tokens, output_router_logits=True).router_logits
        logits = [list(mine) if r == rank else [lg.detach() for lg in counts_from[r]] for r in range(len(counts_from))]
        terms = _balancing_terms(case, logits, rows, cfg.num_experts_per_tok)[rank]  # [layers, micro-batches]
        (terms * torch.tensor(coeffs)).sum().backward()  # padded: [aux, z] per layer; else micro-batches
        got = logits_at_ep1_and_ep2[rank]["balancing"][case]["router_grads"]
        for layer, g in enumerate(got):
            want = model.model.layers[layer].mlp.gate.weight.grad
            scale = want.abs().max().item()
            assert scale > 0 and (g - want).abs().max().item() <= 1e-4 * scale, (case, rank, layer, scale)


@pytest.mark.slow
@pytest.mark.parametrize("name, logged", [("seq", "moe_seq_aux_loss"), ("global", "moe_global_aux_loss"),
                                          ("z", "moe_z_loss")])
def test_balancing_losses_move_the_routers(logits_at_ep1_and_ep2, name, logged):
    """Training at EP2 with seq_aux_loss, global_aux_loss (coefficient 0.01) or the z-loss (0.01, no aux loss):
    the first step's SPoT loss is the coefficient-0 run's (these losses are not part of it), later steps differ
    (their gradient moved the routers), and the step's metrics log the loss under its own name on every rank."""
    runs = [r["train"] for r in logits_at_ep1_and_ep2]
    base, got = runs[0][(2, "aux0")], runs[0][(2, name)]
    assert got["losses"][0] == pytest.approx(base["losses"][0], abs=1e-6)
    differs = [abs(a - b) > 1e-6 for a, b in zip(got["losses"][1:], base["losses"][1:])]
    assert all(differs), (got["losses"], base["losses"])
    assert [m for m in got["last"] if m.startswith("moe_") and m.endswith("_loss")] == [logged]
    assert got["last"][logged] > 0
    assert [r[(2, name)]["last"][logged] for r in runs] == [got["last"][logged]] * len(runs)


@pytest.mark.slow
def test_load_balancing_none_trains_like_coefficient_zero(logits_at_ep1_and_ep2):
    """moe.load_balancing=none with a coefficient set: no load-balancing loss and the very same training as
    coefficient 0 (bit-exact)."""
    train = logits_at_ep1_and_ep2[0]["train"]
    assert train[(2, "none")]["losses"] == train[(2, "aux0")]["losses"]
    assert not [m for m in train[(2, "none")]["last"] if m.startswith("moe_") and m.endswith("_loss")]


@pytest.mark.slow
def test_dense_layers_among_moe_layers_compute_what_transformers_does(hf_checkpoint, logits_at_ep1_and_ep2):
    """decoder_sparse_step 2 at EP2: Megatron-Core builds MLP / MoE layers where transformers does, the logits
    equal its model's, and the step metrics cover the two MoE layers only: the aux loss is their mean switch
    loss (from transformers' router logits), the expert load one entry per MoE layer."""
    cfg = load_model_config(TINY)
    k, experts = cfg.num_experts_per_tok, cfg.num_experts
    aux, max_load = [], None
    for rank, result in enumerate(logits_at_ep1_and_ep2):
        r = result["mixed"]
        print(f"decoder_sparse_step=2 EP2 rank {rank}: max abs logit diff vs transformers {r['diff']:.3g}")
        assert r["mlp"] == ["MLP", "MoELayer", "MLP", "MoELayer"]
        assert r["scale"] > 0.1 and r["diff"] <= 1e-5, r
        router_logits = hf_checkpoint["mixed"]["router_logits"][rank]
        assert len(router_logits) == 2
        counts = []
        for logits in router_logits:
            probs = logits.float().softmax(dim=-1)
            chosen = torch.zeros_like(probs).scatter_(1, probs.topk(k, dim=-1).indices, 1.0)
            tokens = probs.shape[0]
            aux.append(experts / (k * tokens * tokens) * (probs.sum(0) * chosen.sum(0)).sum())
            counts.append(chosen.sum(0))
        max_load = torch.stack(counts) if max_load is None else max_load + torch.stack(counts)
    metrics = logits_at_ep1_and_ep2[0]["mixed"]["metrics"]
    assert metrics["moe_aux_loss"] == pytest.approx(torch.stack(aux).mean().item(), rel=1e-5)
    assert metrics["moe_expert_load_max"] == max_load.max(dim=1).values.tolist()

