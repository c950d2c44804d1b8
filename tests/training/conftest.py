"""Shared fixtures of the training tests: one tiny model, tokenizer, pack and Megatron checkpoint for the
whole session (building them costs seconds; every test writes its runs into its own sub-folder)."""
import json
import os

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny HF Qwen3 + tokenizer, 32 packed pairs and the converted Megatron checkpoint."""
    import transformers

    from megatron_spot.checkpoint.hf_convert import convert_hf_to_mcore
    from megatron_spot.data import build_tiny_tokenizer, pack_pairs
    from megatron_spot.models.qwen3 import load_qwen3_config

    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    words = "the a one two three plus minus equals total so answer is step then we add take".split()
    pairs = []
    for i in range(32):
        prompt = f"Problem {i}: " + " ".join(rng.choice(words, 6))
        chosen = " ".join(rng.choice(words, int(rng.integers(4, 12)))) + f" answer {i}"
        rejected = " ".join(rng.choice(words, int(rng.integers(4, 12)))) + f" answer {i + 1}"
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    hf_dir = str(root / "hf")
    build_tiny_tokenizer(hf_dir, [p["prompt"] + " " + p["chosen"] + " " + p["rejected"] for p in pairs], vocab_size=512)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    cfg = load_qwen3_config("qwen3-tiny").to_hf_dict()
    cfg.update(eos_token_id=tok.eos_token_id, torch_dtype="float32")
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg)).save_pretrained(hf_dir)
    prefix = str(root / "pack" / "pairs")
    os.makedirs(os.path.dirname(prefix))
    pack_pairs([str(jsonl)], hf_dir, prefix, preset="trl")
    convert_hf_to_mcore(hf_dir, str(root / "mcore"), dtype="fp32", progress=False)
    return {"root": str(root), "hf": hf_dir, "pack": prefix, "mcore": str(root / "mcore")}


