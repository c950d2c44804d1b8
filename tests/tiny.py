"""Tiny Qwen3 models and batches shared by tests (random weights, fp32, nothing downloaded)."""
from __future__ import annotations

import torch

from megatron_spot.models.qwen3 import load_qwen3_config


def hf_model(preset: str = "qwen3-tiny", seed: int = 0):
    """A transformers Qwen3ForCausalLM with the preset's shapes and seeded random weights."""
    import transformers

    cfg = load_qwen3_config(preset)
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3Config(**cfg.to_hf_dict(), attn_implementation="eager")
    model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them so the mapping of every tensor is tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model


def random_pairs_batch(num_pairs: int, prompt_len: int, resp_len: int, vocab: int, seed: int,
                       pad_id: int = 0) -> dict:
    """One micro-batch in the engine's layout (rows: chosen..., rejected...), varied lengths."""
    g = torch.Generator().manual_seed(seed)
    L = prompt_len + resp_len
    rows = 2 * num_pairs
    tokens = torch.randint(2, vocab, (rows, L), generator=g)
    for p in range(num_pairs):  # chosen and rejected share the prompt
        tokens[num_pairs + p, :prompt_len] = tokens[p, :prompt_len]
    lengths = torch.randint(prompt_len + 2, L + 1, (rows,), generator=g)
    loss_mask = torch.zeros(rows, L)
    labels = torch.full((rows, L), -100, dtype=torch.long)
    for r in range(rows):
        n = int(lengths[r])
        tokens[r, n:] = pad_id
        labels[r, prompt_len - 1:n - 1] = tokens[r, prompt_len:n]
        loss_mask[r, prompt_len - 1:n - 1] = 1.0
    return {
        "tokens": tokens, "labels": labels, "loss_mask": loss_mask,
        "position_ids": torch.arange(L).unsqueeze(0).expand(rows, L).contiguous(),
        "attention_tokens": int(lengths.sum()),
        "ref_logps": -torch.rand(rows, generator=g) * 5 - 20.0,
    }
