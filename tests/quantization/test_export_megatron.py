"""Quantized export from a megatron_spot Megatron checkpoint (it carries a config.json too, so it must
be recognised by spot_checkpoint.json / torch_dist metadata), and the checks export makes on its inputs."""
import json
import os
import shutil

import pytest
import torch

from megatron_spot.quantization import QuantizationError, calibration_prompts, quantize_and_export
from tests.checkpoint.helpers import first_distcp


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_export_from_megatron_checkpoint_equals_export_from_its_hf_source(sources, tmp_path):
    """The Megatron checkpoint (fp32, converted from the HF folder) must quantize to exactly what the
    HF folder quantizes to: same weights in, same calibration prompts, same FP8 tensors and scales out."""
    assert os.path.isfile(os.path.join(sources["mcore"], "config.json"))  # the old detection's blind spot
    prompts = calibration_prompts(sources["pack"], 8, max_length=32)
    from_hf = quantize_and_export(sources["hf"], str(tmp_path / "from_hf"), prompts, fmt="fp8")
    from_mc = quantize_and_export(sources["mcore"], str(tmp_path / "from_mcore"), prompts, fmt="fp8")
    assert from_hf["source_format"] == "hf" and from_mc["source_format"] == "megatron"
    a, b = _tensors(from_hf["out"]), _tensors(from_mc["out"])
    assert set(a) == set(b) and any(t.dtype == torch.float8_e4m3fn for t in a.values())
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.uint8) if a[name].dtype ==
                                                              torch.float8_e4m3fn else a[name],
                                                              b[name].view(torch.uint8) if b[name].dtype ==
                                                              torch.float8_e4m3fn else b[name]), name
    cfg = json.load(open(os.path.join(from_mc["out"], "config.json")))
    assert cfg["quantization_config"]["quant_algo"] == "FP8"
    assert os.path.isfile(os.path.join(from_mc["out"], "tokenizer_config.json"))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_export_checks_its_inputs(sources, tmp_path):
    from megatron_spot.data import build_tiny_tokenizer, pack_pairs
    from megatron_spot.quantization.export import checkpoint_tokenizer_hash
    from tools.export_quantized import main

    # a pack made with another tokenizer is refused, for HF and Megatron sources alike
    other_tok = str(tmp_path / "other_tok")
    build_tiny_tokenizer(other_tok, ["different words entirely for a different vocabulary"], vocab_size=300)
    pack_pairs([os.path.join(sources["root"], "pairs.jsonl")], other_tok, str(tmp_path / "other_pack"))
    for ckpt in (sources["hf"], sources["mcore"]):
        with pytest.raises(QuantizationError, match="packed with tokenizer"):
            calibration_prompts(str(tmp_path / "other_pack"), 4, expected_tokenizer_hash=checkpoint_tokenizer_hash(ckpt))
        assert main(["--checkpoint", ckpt, "--pack", str(tmp_path / "other_pack"), "--out", str(tmp_path / "o")]) == 2
    prompts = calibration_prompts(sources["pack"], 4)
    # an output that is or contains the checkpoint is refused before anything is touched
    mc = shutil.copytree(sources["mcore"], str(tmp_path / "models" / "mcore"))
    for out in (mc, str(tmp_path / "models")):
        with pytest.raises(QuantizationError, match="choose an output folder outside it"):
            quantize_and_export(mc, out, prompts, overwrite=True)
    assert os.path.isfile(os.path.join(mc, "spot_checkpoint.json"))
    # a damaged Megatron checkpoint: one error naming the file, no output
    shard = first_distcp(mc)
    with open(shard, "r+b") as f:
        f.truncate(100)
    assert main(["--checkpoint", mc, "--pack", sources["pack"], "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()
    # neither HF nor Megatron
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantizationError, match="neither a Hugging Face checkpoint"):
        quantize_and_export(str(tmp_path / "empty"), str(tmp_path / "r"), prompts)
