"""HF (or megatron_spot Megatron) checkpoint -> calibrate on pack prompts -> ModelOpt quantize -> HF export.

The output is what ``modelopt.torch.export.export_hf_checkpoint`` writes: safetensors with quantized
weights (FP8 E4M3 + per-tensor ``weight_scale``/``input_scale`` for FP8; packed 4-bit + block scales for
NVFP4 / INT4-AWQ), a ``quantization_config`` (quant_method "modelopt") inside config.json, and
hf_quant_config.json. vLLM (``--quantization modelopt`` is picked up from the config) and TensorRT-LLM
load these folders. The folder appears atomically (temporary sibling folder + rename).

CPU support (modelopt 0.47): FP8 per-tensor calibrates, fake-quantizes and exports on CPU.
NVFP4 calibrates on CPU but its fake-quant forward asserts CUDA tensors (dynamic block quantization),
so NVFP4 is GPU-only here. INT4-AWQ runs on CPU (slowly), but packing needs every linear input
dimension to be a multiple of the 128-element block (real Qwen3 sizes are; tiny test models are not).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Optional

import torch

from megatron_spot.platform.device import has_cuda, requested_device
from megatron_spot.utils.atomic import make_temp_dir, publish_dir

log = logging.getLogger("megatron_spot.quantization")

# format -> (modelopt config name, needs CUDA, weight block size or None)
FORMATS = {
    "fp8": ("FP8_DEFAULT_CFG", False, None),
    "nvfp4": ("NVFP4_DEFAULT_CFG", True, 16),
    "int4_awq": ("INT4_AWQ_CFG", False, 128),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


class QuantizationError(ValueError):
    """Bad input to the quantized export, with a message that says what to change."""


def check_format(fmt: str, hf_config: dict, on_gpu: bool) -> None:
    if fmt not in FORMATS:
        raise QuantizationError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _, needs_cuda, block = FORMATS[fmt]
    if needs_cuda and not on_gpu:
        raise QuantizationError(
            f"{fmt} needs a CUDA GPU: modelopt's NVFP4 fake quantization (dynamic block quantization) only "
            "runs on CUDA tensors. Use --format fp8 on CPU, or run this on a GPU")
    if block:
        h, f = hf_config["hidden_size"], hf_config["intermediate_size"]
        q = hf_config["num_attention_heads"] * (hf_config.get("head_dim") or h // hf_config["num_attention_heads"])
        bad = {k: v for k, v in (("hidden_size", h), ("intermediate_size", f), ("q/o projection width", q))
               if v % block}
        if bad:
            raise QuantizationError(
                f"{fmt} packs weights in blocks of {block} input elements, but "
                + ", ".join(f"{k}={v}" for k, v in bad.items()) + f" is not a multiple of {block}")


def checkpoint_tokenizer_hash(src: str) -> Optional[str]:
    """The tokenizer hash of the files stored with a checkpoint (HF or Megatron), None if it has none."""
    from megatron_spot.data import tokenizer_hash
    from megatron_spot.data.tokenization import HF_TOKENIZER_FILES

    folder = _model_folder(src)
    if os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in HF_TOKENIZER_FILES):
        return tokenizer_hash(folder)
    return None


def calibration_prompts(pack_prefix: str, num: int, max_length: int = 512, seed: int = 0,
                        expected_tokenizer_hash: Optional[str] = None) -> list[torch.Tensor]:
    """Prompt token arrays of `num` pairs from a pack (spread over the pack), each cut to max_length tokens.

    expected_tokenizer_hash: the checkpoint's tokenizer (checkpoint_tokenizer_hash); a pack packed
    with another tokenizer is refused (its ids would calibrate on the wrong tokens)."""
    import numpy as np

    from megatron_spot.data import PackFormatError, PairDataset, TokenizerMismatchError

    try:
        ds = PairDataset(pack_prefix, expected_tokenizer_hash=expected_tokenizer_hash)
    except (PackFormatError, TokenizerMismatchError) as exc:
        raise QuantizationError(str(exc)) from None
    if len(ds) == 0:
        raise QuantizationError(f"pack {pack_prefix} has no pairs to calibrate on")
    n = min(num, len(ds))
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    out = []
    for i in sorted(idx.tolist()):
        prompt = np.asarray(ds.pair(int(i))[0])[-max_length:]  # keep the end: the part next to the response
        if len(prompt):
            out.append(torch.from_numpy(prompt.astype("int64")))
    return out


def _model_folder(path: str) -> str:
    """A training checkpoint (step_N/ with model/ and trainer_state.json) -> its model folder."""
    if os.path.isfile(os.path.join(path, "trainer_state.json")) and os.path.isdir(os.path.join(path, "model")):
        return os.path.join(path, "model")
    return path


def _is_megatron_checkpoint(path: str) -> bool:
    """By what Megatron checkpoints have and HF folders do not: our spot_checkpoint.json or torch_dist's
    .metadata. (Every megatron_spot checkpoint also carries a config.json, for AutoTokenizer.)"""
    from megatron_spot.checkpoint.hf_convert import METADATA_NAME

    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, METADATA_NAME))
                                    or os.path.isfile(os.path.join(path, ".metadata")))


def _load_hf(src: str, device: torch.device, dtype: torch.dtype):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(src)
    from megatron_spot.models import families

    supported = [f.model_type for f in families()]
    if getattr(cfg, "model_type", None) not in supported:
        raise QuantizationError(f"{src}: model_type={getattr(cfg, 'model_type', None)!r}; expected one of "
                                f"{', '.join(supported)}")
    if getattr(cfg, "quantization_config", None):
        raise QuantizationError(f"{src} is already quantized ({cfg.quantization_config.get('quant_method')}); "
                                "start from the unquantized checkpoint")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def quantize_and_export(src: str, out_dir: str, prompts: list[torch.Tensor], fmt: str = "fp8",
                        export_dtype: str = "bf16", overwrite: bool = False, batch_size: int = 8,
                        device: Optional[str] = None) -> dict:
    """Quantize the checkpoint at `src` with modelopt, calibrating on `prompts`, and export to `out_dir`."""
    t0 = time.perf_counter()
    if not os.path.isdir(src):
        raise QuantizationError(f"checkpoint folder {src} does not exist")
    if not prompts:
        raise QuantizationError("no calibration prompts (give a pack with pairs, and --num-prompts >= 1)")
    from megatron_spot.checkpoint.errors import CheckpointError
    from megatron_spot.checkpoint.hf_convert import check_output_not_input

    out_dir = os.path.abspath(out_dir)
    try:
        check_output_not_input(out_dir, [src])
    except CheckpointError as exc:
        raise QuantizationError(str(exc)) from None
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise QuantizationError(f"output {out_dir} already exists and is not empty (pass --force)")
    if device is not None:
        try:
            device = str(requested_device(device))  # `cuda` on a machine without one: refused here, not at .to()
        except ValueError as exc:
            raise QuantizationError(str(exc)) from None
    on_gpu = has_cuda() if device is None else device.startswith("cuda")
    dev = torch.device(device or ("cuda" if on_gpu else "cpu"))
    src = _model_folder(src)
    work = make_temp_dir(out_dir)  # scratch + the output's temp; removes temps of killed runs
    try:
        hf_src = src
        if _is_megatron_checkpoint(src):  # a megatron_spot Megatron checkpoint: HF first
            from megatron_spot.checkpoint.hf_convert import convert_mcore_to_hf

            hf_src = os.path.join(work, "hf")
            convert_mcore_to_hf(src, hf_src, dtype="fp32" if not on_gpu else "bf16", progress=False)
        elif not os.path.isfile(os.path.join(src, "config.json")):
            raise QuantizationError(f"{src}: neither a Hugging Face checkpoint (config.json) nor a megatron_spot "
                                    "Megatron checkpoint (spot_checkpoint.json)")
        with open(os.path.join(hf_src, "config.json")) as f:
            hf_cfg = json.load(f)
        check_format(fmt, hf_cfg, on_gpu)
        # calibrate in bf16 on GPUs (what inference runs), fp32 on CPU (bf16 CPU matmuls are slow)
        model = _load_hf(hf_src, dev, torch.bfloat16 if on_gpu else torch.float32)
        vocab = model.config.vocab_size
        for p in prompts:
            if int(p.max()) >= vocab or int(p.min()) < 0:
                raise QuantizationError(f"calibration prompt token id {int(p.max())} outside the model's vocabulary "
                                        f"({vocab}); was the pack tokenized for this model?")
        n_tokens = sum(len(p) for p in prompts)
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

        def forward_loop(m):
            with torch.no_grad():
                for i in range(0, len(prompts), batch_size):
                    chunk = prompts[i:i + batch_size]
                    length = max(len(p) for p in chunk)
                    ids = torch.zeros(len(chunk), length, dtype=torch.long)
                    mask = torch.zeros(len(chunk), length, dtype=torch.long)
                    for r, p in enumerate(chunk):  # left padding: every prompt ends at the last column
                        ids[r, length - len(p):] = p
                        mask[r, length - len(p):] = 1
                    m(input_ids=ids.to(dev), attention_mask=mask.to(dev))

        qcfg = getattr(mtq, FORMATS[fmt][0])
        t1 = time.perf_counter()
        model = mtq.quantize(model, qcfg, forward_loop=forward_loop)
        t_cal = time.perf_counter() - t1
        tmp_out = os.path.join(work, "out")
        from megatron_spot.config.dtypes import torch_dtype

        dtype = torch_dtype(export_dtype)  # bf16 | fp16 (the CLI offers those two)
        export_hf_checkpoint(model, dtype=dtype, export_dir=tmp_out)
        for name in _TOKENIZER_FILES:  # tokenizer files next to the weights, as vLLM expects
            p = os.path.join(hf_src, name)
            if os.path.exists(p) and not os.path.exists(os.path.join(tmp_out, name)):
                shutil.copy2(p, tmp_out)
        summary = {
            "format": fmt, "modelopt_config": FORMATS[fmt][0], "source": os.path.abspath(src),
            "calibration_prompts": len(prompts), "calibration_tokens": int(n_tokens),
            "calibration_s": round(t_cal, 2), "export_dtype": export_dtype, "device": str(dev),
            "files": sorted(os.listdir(tmp_out)),
        }
        summary["source_format"] = "megatron" if hf_src != src else "hf"
        with open(os.path.join(tmp_out, "megatron_spot_quantization.json"), "w") as f:
            json.dump(summary, f, indent=2)
        publish_dir(tmp_out, out_dir)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        summary["out"] = out_dir
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
