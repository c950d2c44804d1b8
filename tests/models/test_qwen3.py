"""Qwen3 presets, config validation, parameter counts and parity with transformers."""
import pytest
import torch

from megatron_spot.config import ConfigError, ParallelConfig, PrecisionConfig, RecomputeConfig
from megatron_spot.models.qwen3 import PRESETS, Qwen3Config, load_qwen3_config, validate_model_layout
from tests.multiprocess import run_on_ranks

# HF parameter counts of the released models (8B: from the model card / safetensors index)
EXPECTED = {"qwen3-8b": 8_190_735_360}


def test_preset_parameter_counts():
    assert load_qwen3_config("qwen3-8b").num_parameters() == EXPECTED["qwen3-8b"]
    for name in PRESETS:
        cfg = load_qwen3_config(name)
        assert cfg.tie_word_embeddings == (name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-tiny-tied"))
        assert cfg.padded_vocab_size % 128 == 0


def test_transformers_agrees_with_our_count_on_meta():
    import transformers

    cfg = load_qwen3_config("qwen3-8b")
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.to_hf_dict()))
    assert sum(p.numel() for p in hf.parameters()) == EXPECTED["qwen3-8b"]


def test_real_config_json_and_errors(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen3-8b"]))
    assert load_qwen3_config(str(tmp_path)) == load_qwen3_config("qwen3-8b")
    with pytest.raises(ConfigError, match="unknown model preset.*qwen3-8b"):
        load_qwen3_config("qwen3-8bb")
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
        validate_model_layout(load_qwen3_config("qwen3-tiny"), parallel, precision, RecomputeConfig())


def test_world_size_must_fit_layout():
    from megatron_spot.platform import validate_parallel_layout

    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        validate_parallel_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6)


def _single_rank(rank, world_size):
    from megatron_spot.models.qwen3 import build_model_chunks, build_transformer_config, meta_parameter_count
    from megatron_spot.models.qwen3.state_dict_adapter import hf_to_mcore_state_dict, load_full_state_dict
    from megatron_spot.platform import cpu_compat, initialize
    from tests.tiny import hf_model

    initialize(ParallelConfig(), seed=3)
    out = {"compat": cpu_compat.is_applied(), "cuda_factory": torch.empty(2, device="cuda").device.type,
           "count_8b": meta_parameter_count(load_qwen3_config("qwen3-8b"))}
    for preset in ("qwen3-tiny", "qwen3-tiny-tied"):
        cfg, hf = hf_model(preset, seed=1)
        chunks = build_model_chunks(cfg, build_transformer_config(cfg, ParallelConfig(), PrecisionConfig()))
        load_full_state_dict(chunks, hf_to_mcore_state_dict(hf.state_dict(), cfg))
        tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(40).unsqueeze(0).expand(3, 40)
        with torch.no_grad():
            ours = chunks[0].eval()(tokens, pos, None)[..., : cfg.vocab_size]
            ref = hf(tokens).logits
        out[preset] = (ours - ref).abs().max().item()
        # full activation recompute gives identical gradients
        grads = []
        for granularity in (None, "full"):
            tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig(), RecomputeConfig(granularity=granularity))
            model = build_model_chunks(cfg, tc)[0]
            load_full_state_dict([model], hf_to_mcore_state_dict(hf.state_dict(), cfg))
            model(tokens, pos, None).square().mean().backward()
            grads.append(model.decoder.layers[0].mlp.linear_fc1.weight.grad.clone())
        out[preset + "/recompute"] = (grads[0] - grads[1]).abs().max().item()
    return out


@pytest.mark.slow
def test_megatron_qwen3_matches_transformers_and_counts_8b_on_meta():
    out = run_on_ranks(_single_rank, world_size=1)[0]
    assert out["compat"] and out["cuda_factory"] == "cpu"
    assert out["count_8b"] == EXPECTED["qwen3-8b"]  # 151,936 needs no vocab padding
    for preset in ("qwen3-tiny", "qwen3-tiny-tied"):
        assert out[preset] <= 1e-5, out
        assert out[preset + "/recompute"] <= 1e-6, out


@pytest.mark.gpu
def test_te_spec_fp8_forward_backward_on_gpu():
    """GPU only: TE layer spec, FP8 (delayed scaling) forward/backward over NCCL, world of 1."""
    from megatron_spot.models.qwen3 import build_model_chunks, build_transformer_config, transformer_engine_available
    from megatron_spot.platform import initialize

    if not transformer_engine_available():
        pytest.skip("Transformer Engine not installed")
    info = initialize(ParallelConfig(), seed=0)
    assert info.backend == "nccl"
    cfg = load_qwen3_config("qwen3-tiny")
    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig(dtype="bf16", fp8="hybrid"))
    model = build_model_chunks(cfg, tc)[0]
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, 64)
    model(tokens, pos, None).float().square().mean().backward()
    assert all(p.grad is not None or p.main_grad is not None for p in model.parameters() if p.requires_grad)
