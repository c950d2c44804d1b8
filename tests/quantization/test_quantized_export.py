"""Quantized export on a tiny transformers Qwen3: FP8 on CPU, loads back, outputs near the original."""
import json
import os

import pytest
import torch

from megatron_spot.quantization import QuantizationError, calibration_prompts, load_fp8_reference, quantize_and_export


def test_fp8_export_loads_back_and_stays_close(sources, tmp_path):
    """FP8 E4M3 per-tensor weights and activations (3 mantissa bits: ~6% relative step) on a random
    4-layer model: logits stay within 20% of the largest |logit| (max abs) and cosine >= 0.99 of the
    unquantized model's on the calibration prompts."""
    hf, pack, model = sources["hf"], sources["pack"], sources["model"]
    prompts = calibration_prompts(pack, 16, max_length=64)
    assert len(prompts) == 16
    out = tmp_path / "fp8"
    summary = quantize_and_export(hf, str(out), prompts, fmt="fp8")
    assert summary["calibration_prompts"] == 16
    cfg = json.load(open(out / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert cfg["quantization_config"]["quant_algo"] == "FP8"
    assert json.load(open(out / "hf_quant_config.json"))["quantization"]["quant_algo"] == "FP8"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "F8_E4M3"
        assert "model.layers.0.self_attn.q_proj.input_scale" in f.keys()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # atomic: no temp folder left behind
    q = load_fp8_reference(str(out))
    assert len(q.quantized_modules) == 4 * 7
    worst_cos, worst_rel = 1.0, 0.0
    with torch.no_grad():
        for p in prompts:
            ref = model(p[None]).logits.float()
            got = q(p[None]).logits.float()
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
            worst_cos, worst_rel = min(worst_cos, cos), max(worst_rel, rel)
    print("fp8 worst max-abs rel", worst_rel, "worst cosine", worst_cos)
    assert worst_rel < 0.20, worst_rel
    assert worst_cos > 0.99, worst_cos


def test_bad_inputs(sources, tmp_path):
    hf, pack = sources["hf"], sources["pack"]
    prompts = calibration_prompts(pack, 4)
    with pytest.raises(QuantizationError, match="nvfp4 needs a CUDA GPU"):
        quantize_and_export(hf, str(tmp_path / "a"), prompts, fmt="nvfp4")
    with pytest.raises(QuantizationError, match="blocks of 128.*hidden_size=64"):
        quantize_and_export(hf, str(tmp_path / "b"), prompts, fmt="int4_awq")
    with pytest.raises(QuantizationError, match="unknown quantization format"):
        quantize_and_export(hf, str(tmp_path / "c"), prompts, fmt="int3")
    with pytest.raises(QuantizationError, match="does not exist"):
        quantize_and_export(str(tmp_path / "nope"), str(tmp_path / "d"), prompts)
    with pytest.raises(QuantizationError, match="outside the model's vocabulary"):
        quantize_and_export(hf, str(tmp_path / "e"), [torch.tensor([1, 2, 9999])])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    with pytest.raises(QuantizationError, match="not empty"):
        quantize_and_export(hf, str(busy), prompts)
    assert (busy / "x").read_text() == "keep"
    from tools.export_quantized import main

    assert main(["--checkpoint", hf, "--pack", str(tmp_path / "nopack"), "--out", str(tmp_path / "f")]) == 2


@pytest.mark.gpu
def test_nvfp4_export_on_gpu(sources, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("NVFP4 fake quantization needs a CUDA GPU")
    # the GPU acceptance machine carries no modelopt (its wheels and scipy/pulp exceed the kit's budget)
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    hf, pack = sources["hf"], sources["pack"]
    s = quantize_and_export(hf, str(tmp_path / "nvfp4"), calibration_prompts(pack, 8), fmt="nvfp4")
    cfg = json.load(open(os.path.join(s["out"], "config.json")))
    assert cfg["quantization_config"]["quant_algo"] == "NVFP4"
