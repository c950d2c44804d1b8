"""The analytical model against formulas and known numbers (no processes, fast)."""
import json
import math
import os

import pytest
import torch
import yaml

from megatron_spot.config.loader import ConfigError
from megatron_spot.models import load_model_config
from megatron_spot.profiling import (
    StepShape,
    bubble_fraction,
    bubble_share_of_step,
    korthikanti_gpt_layer_bytes,
    layer_activation_bytes,
    matmul_params_per_token,
    memory_per_rank,
    model_state_bytes,
    stage_parameters,
    step_flops,
)
from megatron_spot.profiling.hardware import gpu_spec, peak_tflops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bubble_fraction_formula():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(4, 8) == pytest.approx(3 / 8)
    assert bubble_fraction(4, 8, vpp=2) == pytest.approx(3 / 16)  # interleaving divides it by VPP
    assert bubble_share_of_step(2, 2) == pytest.approx(0.5 / 1.5)


def test_qwen3_8b_flops_per_token_matches_notes():
    cfg = load_model_config("qwen3-8b")
    assert matmul_params_per_token(cfg) == pytest.approx(7.568e9, rel=1e-3)
    lay = StepShape(seq_length=2048, micro_batch_size=1, num_micro_batches=1)  # 2 x 2048 tokens
    per_token = step_flops(cfg, lay) / lay.tokens_per_step
    # 6N + causal attention 6 * L * (heads*head_dim) * layers / 2 * 2 ... = 45.4 + 0.88e-3 * 2048 GFLOP
    assert per_token == pytest.approx(6 * 7.568e9 + 0.8847e6 * 2048, rel=2e-3)
    assert per_token == pytest.approx(47.2e9, rel=5e-3)
    # executed FLOPs with unfused attention double the attention term; full recompute adds a forward
    ex = step_flops(cfg, StepShape(seq_length=2048, flash_attention=False), executed=True) / lay.tokens_per_step
    assert ex == pytest.approx(per_token + 0.8847e6 * 2048, rel=2e-3)
    fr = step_flops(cfg, StepShape(seq_length=2048, recompute="full"), executed=True) / lay.tokens_per_step
    assert fr == pytest.approx(per_token * 4 / 3, rel=1e-6)


@pytest.mark.parametrize("preset", ["qwen3-8b", "qwen3-0.6b", "qwen3-tiny"])
def test_stage_parameters_add_up_to_the_model(preset):
    cfg = load_model_config(preset)
    pad = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert stage_parameters(cfg, StepShape(), 0) == cfg.num_parameters() + pad
    # PP=2: a tied model keeps a copy of the embedding on the last stage as its output layer
    two = StepShape(pp=2)
    extra = cfg.padded_vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0
    assert stage_parameters(cfg, two, 0) + stage_parameters(cfg, two, 1) == cfg.num_parameters() + pad + extra


def test_distributed_optimizer_bytes_per_parameter():
    cfg = load_model_config("qwen3-8b")
    n = stage_parameters(cfg, StepShape(), 0)
    ms = model_state_bytes(cfg, StepShape(dp=8, dtype="bf16"))
    # Megatron-LM dist optimizer table: bf16 params, fp32 grads -> 6 + 12/d bytes per parameter
    assert (ms["weights"] + ms["grads"] + ms["optimizer"]) / n == pytest.approx(6 + 12 / 8, rel=1e-6)
    ms1 = model_state_bytes(cfg, StepShape(dp=8, dtype="bf16", distributed_optimizer=False))
    assert (ms1["weights"] + ms1["grads"] + ms1["optimizer"]) / n == pytest.approx(18, rel=1e-6)


def test_activation_model_against_the_paper():
    # Korthikanti et al. formula for GPT-3 175B-like sizes: 34 sbh + 5 a s^2 b per layer at t=1
    s, b, h, a = 2048, 1, 12288, 96
    assert korthikanti_gpt_layer_bytes(s, b, h, a) == s * b * h * 34 + 5 * a * s * s * b
    assert korthikanti_gpt_layer_bytes(s, b, h, a, t=8, sp=True) == pytest.approx(s * b * h / 8 * (34 + 5 * a * s / h))
    assert korthikanti_gpt_layer_bytes(s, b, h, a, recompute="full") == 2 * s * b * h
    cfg = load_model_config("qwen3-8b")
    lay = dict(seq_length=4096, micro_batch_size=1, dtype="bf16", flash_attention=False)
    none, sel, full = (layer_activation_bytes(cfg, StepShape(**lay, recompute=r)) for r in (None, "selective", "full"))
    assert full < sel < none
    tp = layer_activation_bytes(cfg, StepShape(**lay, tp=4))
    sp = layer_activation_bytes(cfg, StepShape(**lay, tp=4, sequence_parallel=True))
    assert sp < tp < none
    # 1F1B: stage 0 holds PP micro-batches, the last stage one (plus the logits)
    mem = memory_per_rank(cfg, StepShape(pp=4, num_micro_batches=8, seq_length=2048))
    assert mem["stages"][0]["activations"] > mem["stages"][2]["activations"]


def test_gpu_table_and_bad_names():
    assert peak_tflops("H100") == 989.0 and peak_tflops("h100-sxm", fp8=True) == 1979.0
    with pytest.raises(ConfigError, match="unknown GPU 'X100'.*Did you mean 'H100'"):
        gpu_spec("X100")
    with pytest.raises(ConfigError, match="no FP8"):
        peak_tflops("A100", fp8=True)
    from megatron_spot.profiling.hardware import GPU_PEAK_TFLOPS

    assert GPU_PEAK_TFLOPS["H100"]["bf16"] == 989.0


def test_hf_flop_count_matches_the_model():
    """torch's FlopCounterMode on a transformers tiny Qwen3 forward+backward vs the analytical count.

    Both count matmul FLOPs only (no norms/softmax), and eager attention multiplies the full s x s
    matrix, so `executed=True` with unfused attention must agree exactly (tolerance 0.1% for rounding).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from tests.tiny import hf_model

    cfg, model = hf_model("qwen3-tiny")
    model.train()
    L, rows = 48, 4
    x = torch.randint(2, cfg.vocab_size, (rows, L))
    with FlopCounterMode(display=False) as fc:
        model(x).logits.float().logsumexp(-1).sum().backward()
    lay = StepShape(seq_length=L, micro_batch_size=rows // 2, num_micro_batches=1, dtype="fp32", flash_attention=False)
    predicted = step_flops(cfg, lay, executed=True)
    assert fc.get_total_flops() == pytest.approx(predicted, rel=1e-3)


def test_cli_predict_only_bad_input(capsys):
    from tools.profile_throughput import main

    for argv, msg in (
        (["--preset", "qwen3-8x", "--gpu", "H100", "--predict-only"], "Did you mean 'qwen3-8b'"),
        (["--preset", "qwen3-8b", "--gpu", "X100", "--predict-only"], "unknown GPU"),
        (["--preset", "qwen3-8b", "--gpu", "H100", "--tp", "3", "--predict-only"], "not divisible"),
        (["--preset", "qwen3-32b", "--gpu", "H100", "--tp", "1", "--seq-length", "4096", "--predict-only"],
         "does not fit"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    assert main(["--preset", "qwen3-8b", "--gpu", "H100", "--tp", "2", "--seq-length", "2048",
                 "--predict-only", "--recompute", "selective"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_context_parallel_splits_activations_and_shards_optimizer():
    """CP: a rank holds 1/cp of each sequence's activations, and the distributed optimizer shards over
    DP x CP (Megatron-Core's data-parallel-with-context-parallel group); FLOPs per step are unchanged."""
    from megatron_spot.profiling.analytical import activation_bytes

    cfg = load_model_config("qwen3-8b")
    base = dict(tp=2, dp=1, micro_batch_size=1, dtype="bf16", sequence_parallel=True)
    cp4 = StepShape(**base, cp=4, seq_length=32768)
    assert cp4.world_size == 8
    assert activation_bytes(cfg, cp4) == activation_bytes(cfg, StepShape(**base, seq_length=8192))
    assert model_state_bytes(cfg, cp4)["optimizer"] == model_state_bytes(cfg, StepShape(**{**base, "dp": 4}))["optimizer"]
    assert step_flops(cfg, cp4) == step_flops(cfg, StepShape(**base, seq_length=32768))


def test_cli_profiles_a_training_recipe_with_overrides(capsys, tmp_path):
    """--config: the recipe's model, layout, precision, recompute and batch are what is predicted;
    key=value overrides apply on top and an explicit flag wins over both."""
    from tools.profile_throughput import main

    recipe = os.path.join(ROOT, "examples", "qwen3_8b_spot.yaml")
    with open(recipe) as f:
        spec = yaml.safe_load(f)
    d, par = spec["data"], spec["parallel"]
    json_path = str(tmp_path / "prediction.json")
    assert main(["--config", recipe, "--gpu", "H100", "--predict-only", "--json", json_path]) == 0
    with open(json_path) as f:
        pred = json.load(f)
    lay = pred["layout"]
    assert (lay["tp"], lay["pp"], lay["dp"]) == (par["tensor_parallel"], par["pipeline_parallel"],
                                                 8 // par["tensor_parallel"])
    assert lay["micro_batch_size"] == d["micro_batch_size"] and lay["seq_length"] == d["seq_length"]
    assert lay["num_micro_batches"] == d["global_batch_size"] // (d["micro_batch_size"] * lay["dp"])
    assert lay["recompute"] == spec["recompute"]["granularity"] and lay["dtype"] == spec["precision"]["dtype"]
    assert lay["sequence_parallel"] is par["sequence_parallel"] and lay["fused_linear_loss"] is True
    capsys.readouterr()
    # an override changes the layout; a flag beats the same key's override
    assert main(["--config", recipe, "--gpu", "H100", "--predict-only", "parallel.tensor_parallel=4"]) == 0
    assert "TP4 PP1 DP2" in capsys.readouterr().out
    assert main(["--config", recipe, "--gpu", "H100", "--predict-only", "--tp", "8",
                 "parallel.tensor_parallel=4"]) == 0
    assert "TP8 PP1 DP1" in capsys.readouterr().out
    for argv, msg in (
        (["--config", recipe, "--gpu", "H100", "--predict-only", "parallel.tensor_parallel=3"], "not divisible"),
        (["--config", recipe, "--gpu", "H100", "--predict-only", "data.micro_batch_sise=2"], "micro_batch_size"),
        (["--gpu", "H100", "--predict-only", "data.micro_batch_size=2"], "need --config"),
        (["--config", recipe + ".missing", "--gpu", "H100", "--predict-only"], "config file not found"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, argv


def test_fused_loss_head_holds_no_logits_in_the_prediction():
    from megatron_spot.ops.linear_token_logprobs import DEFAULT_CHUNK_BYTES
    from megatron_spot.profiling.analytical import head_activation_bytes

    cfg = load_model_config("qwen3-8b")
    fused = StepShape(seq_length=8192, dtype="bf16", tp=2)
    unfused = StepShape(seq_length=8192, dtype="bf16", tp=2, fused_linear_loss=False)
    tokens = 8192 * fused.rows
    logits = 2 * tokens * cfg.padded_vocab_size / 2
    assert head_activation_bytes(cfg, unfused) - head_activation_bytes(cfg, fused) == pytest.approx(
        logits - DEFAULT_CHUNK_BYTES - 12 * tokens)


def test_expert_parallel_splits_expert_weights_and_their_optimizer_state():
    """Qwen3-30B-A3B on 8 ranks: at EP8 a rank holds 1/8 of the experts, and their optimizer state is not
    sharded further (expert-DP = 8 / EP = 1) while the dense part's still is over DP8; FLOPs count the top-8
    experts only, whatever the layout; the all-to-all moves each token's top-8 hidden vectors 4 times
    (dispatch, combine; forward, backward) per MoE layer, 7/8 of them off the rank."""
    from megatron_spot.profiling.analytical import all_to_all_bytes

    cfg = load_model_config("qwen3-30b-a3b")
    base = dict(tp=1, pp=1, dp=8, micro_batch_size=1, seq_length=4096, dtype="bf16")
    ep1, ep8 = StepShape(**base), StepShape(**base, ep=8)
    assert (ep1.expert_dp, ep8.expert_dp) == (8, 1)
    m1, m8 = model_state_bytes(cfg, ep1), model_state_bytes(cfg, ep8)
    experts = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert m1["parameters"] == cfg.num_parameters() + cfg.hidden_size * (cfg.padded_vocab_size - cfg.vocab_size) * 2
    assert m1["parameters"] - m8["parameters"] == experts - experts // 8 == 7 * m8["expert_parameters"]
    assert m1["optimizer"] == math.ceil(12 * m1["parameters"] / 8)
    assert m8["optimizer"] == math.ceil(12 * ((m8["parameters"] - experts // 8) / 8 + experts // 8))
    assert step_flops(cfg, ep1) == step_flops(cfg, ep8)
    assert step_flops(cfg, ep1) < 6 * ep1.tokens_per_step * cfg.active_parameters() * 1.2  # 6N over active N
    tokens = 2 * 4096  # chosen + rejected of one pair per micro-batch
    assert all_to_all_bytes(cfg, ep1) == 0
    assert all_to_all_bytes(cfg, ep8) == 4 * tokens * 8 * cfg.hidden_size * 2 * 7 / 8 * cfg.num_hidden_layers


def test_dense_layers_among_moe_layers_count_as_dense():
    """Qwen3-30B-A3B made half dense (decoder_sparse_step 2): the dense layers' MLP weights, FLOPs and
    activations are a dense Qwen3 MLP's (intermediate_size), the all-to-all runs through the MoE half only."""
    from megatron_spot.models.qwen3_moe import PRESETS, Qwen3MoeConfig
    from megatron_spot.profiling.analytical import all_to_all_bytes

    moe = load_model_config("qwen3-30b-a3b")
    half = Qwen3MoeConfig.from_hf_dict(dict(PRESETS["qwen3-30b-a3b"], decoder_sparse_step=2))
    layers, h = moe.num_hidden_layers, moe.hidden_size
    routed = moe.num_experts * (3 * h * moe.moe_intermediate_size + h)  # experts + router of one MoE layer
    dense = 3 * h * moe.intermediate_size
    assert moe.num_parameters() - half.num_parameters() == layers // 2 * (routed - dense)
    top_k = moe.num_experts_per_tok * 3 * h * moe.moe_intermediate_size + moe.num_experts * h
    assert moe.matmul_params_per_token() - half.matmul_params_per_token() == layers // 2 * (top_k - dense)
    shape = StepShape(seq_length=4096, micro_batch_size=1, dtype="bf16", ep=8, dp=8)
    assert all_to_all_bytes(half, shape) == all_to_all_bytes(moe, shape) / 2
    dense_twin = load_model_config("qwen3-8b")  # (a dense layer's activation terms: same formula, its own sizes)
    assert half.moe_layer_fraction == 0.5 and dense_twin.moe_layer_fraction == 0.0
    assert layer_activation_bytes(half, shape) == pytest.approx(
        (layer_activation_bytes(moe, shape) + _dense_layer_bytes(moe, shape)) / 2)


def _dense_layer_bytes(cfg, shape):
    """layer_activation_bytes of `cfg`'s attention with a dense MLP of intermediate_size (no TP/SP)."""
    p, tokens = 2, shape.seq_length * shape.rows
    return _attention_terms(cfg, shape) + p * tokens * (2 * cfg.hidden_size + 4 * cfg.intermediate_size)


# ---------------------------------------------------------------------------------------------- MoE activations
def _saved_moe_tensors(rank, world_size):
    """Bytes autograd keeps from one forward of a tiny Megatron-Core MoE layer (layer 0's MLP: router,
    all-to-all dispatcher, SequentialMLP or grouped TEGroupedMLP experts; fp32, CPU), at EP1 and at EP2,
    per (experts, EP): every tensor saved for
    backward and still held when the forward returns (one saved in a branch the forward drops is not),
    counted once per storage (views share one), the layer's own weights excluded."""
    import weakref

    from megatron_spot.config import MoEConfig, ParallelConfig, PrecisionConfig
    from megatron_spot.models import build_model_chunks, build_transformer_config
    from megatron_spot.platform import initialize

    cfg = load_model_config("qwen3-moe-tiny")
    out = {}
    for experts, ep in ((e, ep) for e in ("sequential", "grouped") for ep in (1, 2)):
        parallel = ParallelConfig(expert_parallel=ep)
        initialize(parallel, seed=3)
        tc = build_transformer_config(cfg, parallel, PrecisionConfig(), moe=MoEConfig(experts=experts))  # fp32, aux loss
        model = build_model_chunks(cfg, tc)[0].train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        torch.manual_seed(rank)  # each rank its own tokens: the all-to-all moves unequal numbers
        x = torch.randn(MOE_SEQ, MOE_ROWS, cfg.hidden_size, requires_grad=True)
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _ = model.decoder.layers[0].mlp(x)
        held = {}
        for ref in saved:
            t = ref()
            if t is not None:
                held.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        out[experts, ep] = sum(held.values())
        del y
    return out


MOE_SEQ, MOE_ROWS = 64, 2


def test_moe_activation_formula_counts_what_the_layer_saves():
    """moe_routed_activation_bytes (unfused SwiGLU, as the CPU runs both expert modules) plus the layer's
    input (the router's input) equals what autograd keeps from a tiny MoE layer's forward, with sequential
    and with grouped experts (the same bytes: measured equal for both). EP1: exactly,
    up to one fp32 scalar of the load-balancing loss (4 bytes; measured 313,412 bytes = formula + 4). EP2:
    routing is not balanced per rank (measured 296,964 and 329,860 bytes), but the ranks together process
    every routed copy once, so their sum is the formula's twice (+ 2 x 4 bytes): the all-to-all keeps
    nothing the formula misses."""
    from megatron_spot.profiling.analytical import moe_routed_activation_bytes
    from tests.multiprocess import run_on_ranks

    cfg = load_model_config("qwen3-moe-tiny")
    counted = run_on_ranks(_saved_moe_tensors, world_size=2, timeout_s=300)
    for experts, ep in counted[0]:
        shape = StepShape(dtype="fp32", micro_batch_size=MOE_ROWS // 2, seq_length=MOE_SEQ, ep=ep, dp=2,
                          flash_attention=False)
        per_rank = 4 * MOE_SEQ * MOE_ROWS * cfg.hidden_size + moe_routed_activation_bytes(cfg, shape, fused_swiglu=False)
        total = sum(c[experts, ep] for c in counted)
        assert 0 <= total - 2 * per_rank <= 2 * 4, (experts, ep, total, per_rank)
        if ep == 1:  # each rank routes its own tokens alone: the same count
            assert counted[0][experts, ep] == counted[1][experts, ep]


def test_moe_layer_activations_replace_the_dense_mlp_terms():
    """Qwen3-30B-A3B: an MoE layer keeps the dense layer's attention terms and norm/router inputs, then per
    routed copy (top-8 per token) its hidden state, fc1 output (2 x 768), fc2 input (768) and routing weight
    (the fused weighted SwiGLU on GPUs), plus the router's and dispatcher's per-token bookkeeping; under
    sequence parallel a rank routes 1/TP of the tokens, ETP all-gathers them and splits each expert."""
    from megatron_spot.profiling.analytical import moe_routed_activation_bytes

    cfg = load_model_config("qwen3-30b-a3b")
    h, f, k, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.num_experts
    base = dict(seq_length=4096, micro_batch_size=1, dtype="bf16", ep=8, dp=8)
    T = 2 * 4096
    gpu = StepShape(**base)
    bookkeeping = (4 * E + 8 * k + 4 * k) + (8 * E + 8 * k)  # router: scores, top-k ids, weights; dispatch ids
    per_token = 2 * k * (h + 3 * f) + 4 * k + bookkeeping
    assert moe_routed_activation_bytes(cfg, gpu) == pytest.approx(T * per_token + 8 * E)
    cpu = StepShape(**{**base, "flash_attention": False})
    assert moe_routed_activation_bytes(cfg, cpu) - moe_routed_activation_bytes(cfg, gpu) == 2 * T * k * 3 * f
    # the layer = the dense attention + norm/router inputs + the routed part (the dense MLP's 4f terms gone)
    dense_mlp = 2 * T * (2 * h + 4 * cfg.intermediate_size)
    routed_mlp = 2 * T * 2 * h + moe_routed_activation_bytes(cfg, gpu)
    assert layer_activation_bytes(cfg, gpu) == pytest.approx(
        _attention_terms(cfg, gpu) + routed_mlp)
    assert routed_mlp > dense_mlp  # per token 8 x (h + 3f) = 8 x 4352 elements vs the dense formula's 4 x 6144
    # TP4 + SP, ETP1: 1/4 of the tokens routed here; ETP4 gathers them back and splits f by 4
    sp = dict(base, tp=4, dp=2, sequence_parallel=True)
    etp1, etp4 = StepShape(**sp, etp=1), StepShape(**sp, etp=4)
    assert moe_routed_activation_bytes(cfg, etp1) == pytest.approx((T / 4) * per_token + 8 * E)
    routed4 = T * k  # = T/4 tokens x k x ETP4
    assert moe_routed_activation_bytes(cfg, etp4) == pytest.approx(
        2 * routed4 * (h + 3 * f / 4) + 4 * routed4 + (T / 4) * bookkeeping + 8 * E)


def _attention_terms(cfg, shape):
    """The attention half of layer_activation_bytes (flash attention, no TP/SP): norm + QKV inputs,
    q/k before qk-norm, q/k/v/output kept by flash attention with its fp32 log-sum-exp, projection input."""
    p, s, b = 2, shape.seq_length, shape.rows
    h, q, kv, a = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.num_attention_heads
    return p * s * b * (2 * h + (q + kv)) + p * s * b * (2 * q + 2 * kv) + 4 * s * b * a + p * s * b * q


def test_all_to_all_time_inside_a_node_and_across_nodes():
    """The all-to-all volume at NVLink speed when the EP group fits in a node; across nodes the share sent
    to peers in other nodes goes at the network's speed (Megatron-Core's expert grid: EP groups are runs of
    consecutive ranks at ETP1); predict() reports the step with and without it."""
    from megatron_spot.profiling.analytical import all_to_all_bytes, all_to_all_seconds, predict

    cfg = load_model_config("qwen3-30b-a3b")
    ep8 = StepShape(dp=8, ep=8, seq_length=4096, dtype="bf16")
    sent = all_to_all_bytes(cfg, ep8)
    inside = all_to_all_seconds(cfg, ep8, gpus_per_node=8, intra_node_gb_s=450.0, inter_node_gb_s=50.0)
    assert inside["inter_node_bytes"] == 0 and inside["seconds"] == pytest.approx(sent / 450e9)
    # 4 GPUs per node: of the 7 peers, 3 share the node, 4 are elsewhere
    split = all_to_all_seconds(cfg, ep8, gpus_per_node=4, intra_node_gb_s=450.0, inter_node_gb_s=50.0)
    assert split["inter_node_bytes"] == pytest.approx(sent * 4 / 7)
    assert split["seconds"] == pytest.approx(sent * 3 / 7 / 450e9 + sent * 4 / 7 / 50e9)
    # ETP2 x EP8 over 8-GPU nodes: an EP group spans 16 ranks, 4 of its members in each node
    etp2 = StepShape(tp=2, dp=8, ep=8, etp=2, seq_length=4096, dtype="bf16", sequence_parallel=True)
    assert all_to_all_seconds(cfg, etp2, 8, 450.0, 50.0)["inter_node_bytes"] == pytest.approx(
        all_to_all_bytes(cfg, etp2) * 4 / 7)
    pred = predict(cfg, ep8, peak_tflops=989.0, assumed_mfu=0.4, gpus_per_node=8, intra_node_gb_s=450.0,
                   inter_node_gb_s=50.0)
    assert pred.step_time_with_all_to_all_s == pytest.approx(pred.step_time_s + sent / 450e9)
    assert pred.tokens_per_s_with_all_to_all == pytest.approx(ep8.tokens_per_step / pred.step_time_with_all_to_all_s)
    dense = predict(load_model_config("qwen3-8b"), StepShape(dp=8), peak_tflops=989.0, assumed_mfu=0.4,
                    gpus_per_node=8, intra_node_gb_s=450.0, inter_node_gb_s=50.0)
    assert dense.all_to_all is None and dense.step_time_with_all_to_all_s is None


def test_cli_answers_for_the_world_a_recipe_states(capsys, tmp_path):
    """A recipe's world: (nodes x GPUs per node) is the world --predict-only answers for with no flags;
    --nodes / --gpus-per-node override it field by field; without either, 1 x 8. The output and --json
    say which world was used and where it came from."""
    from tools.profile_throughput import main

    recipe = os.path.join(ROOT, "examples", "qwen3_235b_a22b_spot.yaml")
    with open(recipe) as f:
        spec = yaml.safe_load(f)
    nodes, per_node = spec["world"]["nodes"], spec["world"]["gpus_per_node"]

    def predict(*argv):
        path = str(tmp_path / "p.json")
        assert main(["--gpu", "H100", "--predict-only", "--json", path, *argv]) == 0
        with open(path) as f:
            return json.load(f), capsys.readouterr().out

    pred, out = predict("--config", recipe)
    assert pred["world"] == {"nodes": nodes, "gpus_per_node": per_node, "size": nodes * per_node,
                             "source": "the recipe's world: section"}
    assert pred["world_size"] == nodes * per_node == 64
    assert pred["layout"]["dp"] == 64 // spec["parallel"]["tensor_parallel"]
    assert f"world: {nodes} node(s) x {per_node} GPUs = 64 (the recipe's world: section)" in out
    # the EP64 group spans the 8 nodes: 7 of 63 peers share a node; the rest goes at 50 GB/s
    a2a = pred["all_to_all"]
    assert a2a["gpus_per_node"] == per_node and a2a["inter_node_gb_s"] == 50.0 and a2a["intra_node_gb_s"] == 450.0
    assert a2a["inter_node_bytes"] == pytest.approx(pred["all_to_all_bytes_per_rank"] * 56 / 63)
    assert pred["step_time_with_all_to_all_s"] == pytest.approx(pred["step_time_s"] + a2a["seconds"])
    assert "not overlapped (upper bound)" in out
    # a flag overrides its field only
    pred, out = predict("--config", recipe, "--nodes", "16", "parallel.expert_parallel=128", "--inter-node-bandwidth",
                        "25")
    assert pred["world_size"] == 128 and pred["world"]["source"] == "nodes from --nodes, GPUs per node from world.gpus_per_node"
    assert pred["all_to_all"]["inter_node_gb_s"] == 25.0
    # no world stated, no flags: one node of 8
    pred, out = predict("--config", os.path.join(ROOT, "examples", "qwen3_8b_spot.yaml"), "world.nodes=null",
                        "world.gpus_per_node=null")
    assert pred["world_size"] == 8 and pred["world"]["source"].startswith("the default")
    with pytest.raises(SystemExit) as e:
        main(["--config", recipe, "--gpu", "H100", "--predict-only", "world.nodes=0"])
    assert e.value.code == 2 and "world.nodes=0 must be an integer >= 1" in capsys.readouterr().err
