"""Shared fixtures: tiny HF checkpoints (Qwen3 tied / untied / vocab 300 / real 151,936 vocab; Llama 3 tied and
untied; Qwen3-MoE, also with dense layers), converted once."""
from __future__ import annotations

import pytest

from tests.checkpoint import helpers


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """name -> dict(hf=folder, mcore=fp32 conversion, model=transformers model, ref=logits, tok, pos)."""
    from megatron_spot.checkpoint import hf_convert
    from megatron_spot.checkpoint.hf_convert import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("ckpts")
    # store tensors above 32 KiB in row chunks, as a real model's embedding is (128 MiB chunks), so
    # every load below (TP1, TP2PP2, VPP) reads chunked storage
    saved_chunk_bytes, hf_convert.SAVE_CHUNK_BYTES = hf_convert.SAVE_CHUNK_BYTES, 32 * 1024
    cases = {
        "untied": dict(preset="qwen3-tiny"),
        "tied": dict(preset="qwen3-tiny-tied", seed=1),
        # vocab not a multiple of 128 -> padded rows; written as 3 shards with an index
        "vocab300": dict(preset="qwen3-tiny-tied", seed=2, vocab_size=300, max_shard_size="200KB"),
        "vocab151936": dict(preset="qwen3-tiny", seed=3, vocab_size=151936),
        # the second family (Llama 3: llama3 RoPE scaling, no q/k norm), untied and tied (sharded input)
        "llama": dict(preset="llama3-tiny", seed=4),
        "llama-tied": dict(preset="llama3-tiny-tied", seed=5, vocab_size=300, max_shard_size="200KB"),
        # mixture of experts (Qwen3-MoE: router + 8 experts per layer, per-expert HF tensors; sharded input)
        "moe": dict(preset="qwen3-moe-tiny", seed=6, vocab_size=300, max_shard_size="200KB"),
        # dense MLP layers among the MoE ones (transformers: MoE where (i + 1) % decoder_sparse_step == 0): layers
        # 1 and 3 are MoE, 0 and 2 dense
        "moe-mixed": dict(preset="qwen3-moe-tiny", seed=7, decoder_sparse_step=2),
    }
    out = {}
    for name, spec in cases.items():
        spec = dict(spec)
        preset, seed = spec.pop("preset"), spec.pop("seed", 0)
        hf = str(root / f"{name}-hf")
        model = helpers.make_hf_checkpoint(hf, preset, seed, **spec)
        mcore = str(root / f"{name}-mcore")
        hf_convert.SAVE_CHUNK_BYTES = 4 * 2**20 if name == "vocab151936" else 32 * 1024
        summary = convert_hf_to_mcore(hf, mcore, dtype="fp32", progress=False)
        tok, pos = helpers.tokens(model.config.vocab_size)
        out[name] = dict(hf=hf, mcore=mcore, model=model, ref=helpers.hf_logits(model, tok), tok=tok, pos=pos,
                         summary=summary, vocab=model.config.vocab_size)
    hf_convert.SAVE_CHUNK_BYTES = saved_chunk_bytes
    return out
