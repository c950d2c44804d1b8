"""A plain-PyTorch reader of modelopt's FP8 HF export (what vLLM computes, without vLLM).

Used by tests and for spot checks on machines without an FP8 inference engine: every quantized
linear's weight is dequantized (fp8 e4m3 x weight_scale) and its input is fake-quantized with the
calibrated static ``input_scale`` (x / s -> e4m3 -> x s), i.e. W8A8 with per-tensor scales.
"""
from __future__ import annotations

import json
import os

import torch


def _fake_quant_input(scale: torch.Tensor):
    def hook(module, args):
        x = args[0]
        q = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale
        return (q.to(x.dtype),) + tuple(args[1:])

    return hook


def load_fp8_reference(folder: str, dtype: torch.dtype = torch.float32, quantize_inputs: bool = True):
    import transformers
    from safetensors import safe_open

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    qc = cfg.pop("quantization_config", None) or {}
    if qc.get("quant_algo", qc.get("quantization", {}).get("quant_algo")) not in ("FP8", None):
        raise ValueError(f"{folder}: not an FP8 export ({qc.get('quant_algo')})")
    for k in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(dtype).eval()
    tensors = {}
    files = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    for name in files:
        with safe_open(os.path.join(folder, name), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    state = {}
    input_scales = {}
    for k, t in tensors.items():
        if k.endswith(".weight_scale") or k.endswith(".input_scale"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors[k[: -len("weight")] + "weight_scale"].float()
            state[k] = (t.float() * scale).to(dtype)
            s_in = tensors.get(k[: -len("weight")] + "input_scale")
            if s_in is not None:
                input_scales[k[: -len(".weight")]] = s_in.float()
        else:
            state[k] = t.to(dtype)
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.get("tie_word_embeddings"))]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if quantize_inputs:
        for name, module in model.named_modules():
            if name in input_scales:
                module.register_forward_pre_hook(_fake_quant_input(input_scales[name]))
    model.quantized_modules = sorted(input_scales)
    return model
