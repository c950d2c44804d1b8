"""Turn the pair reader's indices into the micro-batches the engine consumes."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megatron_spot.data import PairDataset, collate_pairs
from megatron_spot.ops.token_logprobs import IGNORE_INDEX


def _pad_to(batch: dict, length: int, pad_id: int) -> dict:
    cur = batch["tokens"].shape[1]
    if cur == length:
        return batch
    extra = length - cur
    out = dict(batch)
    out["tokens"] = torch.nn.functional.pad(batch["tokens"], (0, extra), value=pad_id)
    out["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=pad_id)
    out["loss_mask"] = torch.nn.functional.pad(batch["loss_mask"], (0, extra), value=0.0)
    n = batch["tokens"].shape[0]
    out["position_ids"] = torch.arange(length, dtype=torch.int64).unsqueeze(0).expand(n, length).contiguous()
    return out


def make_micro_batches(dataset: PairDataset, step_indices: Sequence[Sequence[int]], device: torch.device,
                       ref_logps: Optional[np.ndarray] = None, pad_to_multiple_of: int = 64,
                       max_length: Optional[int] = None) -> list[dict]:
    """Collate each micro-batch, pad all of them to one length (pipeline p2p needs a fixed shape),
    mask non-response targets with IGNORE_INDEX and attach reference log-probs [2B] (chosen first)."""
    pad_id = dataset.pad_token_id
    batches = [collate_pairs(dataset, idx, pad_id, pad_to_multiple_of=pad_to_multiple_of, max_length=max_length)
               for idx in step_indices]
    length = max(b["tokens"].shape[1] for b in batches)
    out = []
    for b in batches:
        b = _pad_to(b, length, pad_id)
        b["labels"] = torch.where(b["loss_mask"] > 0, b["labels"], torch.full_like(b["labels"], IGNORE_INDEX))
        b["attention_tokens"] = int(b["sequence_lengths"].sum())
        if ref_logps is not None:
            idx = b["pair_indices"].numpy()
            b["ref_logps"] = torch.from_numpy(np.concatenate([ref_logps[idx, 0], ref_logps[idx, 1]])).float()
        out.append({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
    return out
