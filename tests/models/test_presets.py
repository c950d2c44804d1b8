"""Every family's presets (Qwen3, Qwen3-MoE, Llama 3.x), config validation, parameter counts and parity with transformers."""
import pytest
import torch

from megatron_spot.config import ConfigError, ParallelConfig, PrecisionConfig, RecomputeConfig
from megatron_spot.models import all_presets, load_model_config, validate_model_layout
from megatron_spot.models.qwen3 import PRESETS, Qwen3Config
from tests.multiprocess import run_on_ranks

# HF parameter counts of the released models (8B: from the model card / safetensors index)
EXPECTED = {"qwen3-8b": 8_190_735_360}
# Llama 3.x: the safetensors index totals / 2 bytes of the released bf16 checkpoints
EXPECTED_LLAMA = {"llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496, "llama3.2-1b": 1_235_814_400,
                  "llama3.2-3b": 3_212_749_824}


@pytest.mark.parametrize("name", sorted(EXPECTED_LLAMA))
def test_llama_parameter_counts_agree_with_transformers(name):
    import transformers

    from tests.tiny import hf_config_of

    cfg = load_model_config(name)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config_of(cfg))
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_parameters() == EXPECTED_LLAMA[name]
    assert cfg.tie_word_embeddings == name.startswith("llama3.2")
    assert cfg.rope_scaling.factor == (32.0 if name.startswith("llama3.2") else 8.0)


def test_preset_parameter_counts():
    assert load_model_config("qwen3-8b").num_parameters() == EXPECTED["qwen3-8b"]
    for name in PRESETS:
        cfg = load_model_config(name)
        assert cfg.tie_word_embeddings == (name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-tiny-tied"))
        assert cfg.padded_vocab_size % 128 == 0


def test_transformers_agrees_with_our_count_on_meta():
    import transformers

    cfg = load_model_config("qwen3-8b")
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.to_hf_dict()))
    assert sum(p.numel() for p in hf.parameters()) == EXPECTED["qwen3-8b"]


def test_real_config_json_and_errors(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen3-8b"]))
    assert load_model_config(str(tmp_path)) == load_model_config("qwen3-8b")
    with pytest.raises(ConfigError, match="unknown model preset.*qwen3-8b"):
        load_model_config("qwen3-8bb")
    bad = dict(PRESETS["qwen3-tiny"], attention_bias=True)
    with pytest.raises(ConfigError, match="attention_bias"):
        Qwen3Config.from_hf_dict(bad)
    with pytest.raises(ConfigError, match="unsupported architecture"):
        Qwen3Config.from_hf_dict(dict(PRESETS["qwen3-tiny"], model_type="llama", architectures=["LlamaForCausalLM"]))


@pytest.mark.parametrize("parallel, precision, match", [
    (ParallelConfig(tensor_parallel=3), PrecisionConfig(), "tensor_parallel=3 does not divide the .* attention heads"),
    (ParallelConfig(tensor_parallel=4), PrecisionConfig(), "tensor_parallel=4 does not divide the .* query groups"),
    (ParallelConfig(pipeline_parallel=3), PrecisionConfig(), "layers do not split into PP x VPP = 3 x 1"),
    (ParallelConfig(pipeline_parallel=2, virtual_pipeline=4), PrecisionConfig(), "virtual_pipeline"),
    (ParallelConfig(), PrecisionConfig(dtype="bf16", fp8="hybrid"), "Transformer Engine"),
    (ParallelConfig(tensor_parallel=2, sequence_parallel=True), PrecisionConfig(), "sequence_parallel"),
    (ParallelConfig(), PrecisionConfig(dtype="fp64"), "precision.dtype"),
])
def test_bad_layouts_fail_fast(parallel, precision, match):
    with pytest.raises(ConfigError, match=match):
        validate_model_layout(load_model_config("qwen3-tiny"), parallel, precision, RecomputeConfig())


def test_world_size_must_fit_layout():
    from megatron_spot.platform import validate_parallel_layout

    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        validate_parallel_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6)


# The released presets, each shrunk to tiny widths with the same architecture flags (litgpt's habit):
# query heads per KV group, tied embeddings, the q-projection width / hidden ratio (head_dim x heads is
# not the hidden size in 0.6B/4B/32B), the MLP ratio, norm eps and RoPE base. vocab 300 also exercises
# the padding to a multiple of 128.
RELEASED = [name for name in all_presets() if "tiny" not in name]


def shrunk(preset: str):
    from megatron_spot.models import replace

    full = load_model_config(preset)
    groups, head_dim = 2, 8
    heads = groups * (full.num_attention_heads // full.num_key_value_heads)
    q_width = heads * head_dim
    hidden = 8 * max(1, round(q_width * full.hidden_size / (full.num_attention_heads * full.head_dim) / 8))
    inter = 8 * max(1, round(hidden * full.intermediate_size / full.hidden_size / 8))
    moe = {}
    if full.num_moe_experts:  # 16 experts keep the released top-8 routing selective; the expert width ratio kept
        moe = dict(num_experts=16, moe_intermediate_size=8 * max(1, round(hidden * full.moe_intermediate_size
                                                                           / full.hidden_size / 8)))
    return replace(full, vocab_size=300, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                   num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
                   max_position_embeddings=256, **moe)


def test_shrunk_presets_keep_the_architecture_flags():
    for name in RELEASED:
        full, tiny = load_model_config(name), shrunk(name)
        assert tiny.tie_word_embeddings == full.tie_word_embeddings
        assert (tiny.num_attention_heads // tiny.num_key_value_heads
                == full.num_attention_heads // full.num_key_value_heads)
        assert (tiny.num_attention_heads * tiny.head_dim == tiny.hidden_size) == (
            full.num_attention_heads * full.head_dim == full.hidden_size), name
        assert tiny.rms_norm_eps == full.rms_norm_eps and tiny.rope_theta == full.rope_theta


def _single_rank(rank, world_size):
    from megatron_spot.models import build_model_chunks, build_transformer_config, meta_parameter_count
    from megatron_spot.models.gpt.state_dict import hf_to_mcore_state_dict, load_full_state_dict
    from megatron_spot.platform import cpu_compat, initialize
    from tests.tiny import hf_model, hf_model_of, hf_state_dict

    initialize(ParallelConfig(), seed=3)
    out = {"compat": cpu_compat.is_applied(), "cuda_factory": torch.empty(2, device="cuda").device.type,
           "count_8b": meta_parameter_count(load_model_config("qwen3-8b"))}
    models = {preset: hf_model(preset, seed=1) for preset in ("qwen3-tiny", "qwen3-tiny-tied")}
    models.update({preset: (shrunk(preset), None) for preset in RELEASED})
    for preset, (cfg, hf) in models.items():
        hf = hf if hf is not None else hf_model_of(cfg, seed=1)
        chunks = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), PrecisionConfig()))
        load_full_state_dict(chunks, hf_to_mcore_state_dict(hf_state_dict(hf), cfg))
        tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(40).unsqueeze(0).expand(3, 40)
        with torch.no_grad():
            ours = chunks[0].eval()(tokens, pos, None)[..., : cfg.vocab_size]
            ref = hf(tokens).logits
        out[preset] = {"diff": (ours - ref).abs().max().item(), "scale": ref.abs().max().item()}
        if "tiny" not in preset:
            continue
        # full activation recompute gives identical gradients
        grads = []
        for granularity in (None, "full"):
            tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig(), RecomputeConfig(granularity=granularity))
            model = build_model_chunks(cfg, tc)[0]
            load_full_state_dict([model], hf_to_mcore_state_dict(hf_state_dict(hf), cfg))
            model(tokens, pos, None).square().mean().backward()
            grads.append(model.decoder.layers[0].mlp.linear_fc1.weight.grad.clone())
        out[preset + "/recompute"] = (grads[0] - grads[1]).abs().max().item()
    return out


@pytest.fixture(scope="module")
def single_rank():
    """One process (world of 1) runs every parity case once."""
    return run_on_ranks(_single_rank, world_size=1)[0]


@pytest.mark.slow
def test_cpu_compat_and_8b_count_on_meta(single_rank):
    assert single_rank["compat"] and single_rank["cuda_factory"] == "cpu"
    assert single_rank["count_8b"] == EXPECTED["qwen3-8b"]  # 151,936 needs no vocab padding


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen3-tiny-tied"] + RELEASED)
def test_megatron_matches_transformers(single_rank, preset):
    """fp32 logits of Megatron-Core's GPTModel with our mapping vs transformers' model (same weights)."""
    result = single_rank[preset]
    assert result["scale"] > 0.1  # real logits, not a degenerate model
    assert result["diff"] <= 1e-5, result


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen3-tiny-tied"])
def test_full_recompute_gives_identical_gradients(single_rank, preset):
    assert single_rank[preset + "/recompute"] <= 1e-6, single_rank


@pytest.mark.gpu
def test_te_spec_fp8_forward_backward_on_gpu():
    """GPU only: TE layer spec, FP8 (delayed scaling) forward/backward over NCCL, world of 1."""
    from megatron_spot.models import build_model_chunks, build_transformer_config
    from megatron_spot.platform.device import transformer_engine_available
    from megatron_spot.platform import initialize

    if not transformer_engine_available():
        pytest.skip("Transformer Engine not installed")
    info = initialize(ParallelConfig(), seed=0)
    assert info.backend == "nccl"
    cfg = load_model_config("qwen3-tiny")
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig(dtype="bf16", fp8="hybrid"))
    model = build_model_chunks(cfg, tc)[0]
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, 64)
    model(tokens, pos, None).float().square().mean().backward()
    assert all(p.grad is not None or p.main_grad is not None for p in model.parameters() if p.requires_grad)
