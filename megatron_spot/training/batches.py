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
    mask non-response targets with IGNORE_INDEX and attach reference log-probs [2B] (chosen first) and
    `padding_mask` [2B, L] (True after each row's tokens)."""
    pad_id = dataset.pad_token_id
    batches = [collate_pairs(dataset, idx, pad_id, pad_to_multiple_of=pad_to_multiple_of, max_length=max_length)
               for idx in step_indices]
    length = max(b["tokens"].shape[1] for b in batches)
    out = []
    for b in batches:
        b = _pad_to(b, length, pad_id)
        b["labels"] = torch.where(b["loss_mask"] > 0, b["labels"], torch.full_like(b["labels"], IGNORE_INDEX))
        b["attention_tokens"] = int(b["sequence_lengths"].sum())
        # True after each row's tokens (Megatron-Core's convention): MoE routers leave these out of the
        # load-balancing losses and the expert load
        b["padding_mask"] = torch.arange(length).unsqueeze(0) >= b["sequence_lengths"].unsqueeze(1)
        if ref_logps is not None:
            idx = b["pair_indices"].numpy()
            b["ref_logps"] = torch.from_numpy(np.concatenate([ref_logps[idx, 0], ref_logps[idx, 1]])).float()
        out.append({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
    return out


def make_packed_micro_batches(dataset: PairDataset, step_plan, dp_rank: int, device: torch.device,
                              max_tokens: int, ref_logps: Optional[np.ndarray] = None, pad_to_multiple_of: int = 8,
                              max_length: Optional[int] = None, count_multiple: int = 1, cp_size: int = 1,
                              cp_rank: int = 0) -> list[dict]:
    """This rank's packed micro-batches of one step (see megatron_spot.data.packing).

    step_plan: every rank's groups of the step, [num_groups][dp_size][micro_batch_size] pair indices
    (`PairBatchSampler.plan(epoch)[step]`): the cut into micro-batches is planned from all ranks' token
    counts, so that the k-th micro-batch holds the same groups on every rank. `count_multiple`: make
    the number of micro-batches a multiple of it (interleaved pipelines). Each batch also carries
    `packed_seq_params` for Megatron-Core and `ref_logps` per sequence in row order. With context
    parallelism (`cp_size` > 1) every sequence is padded to a multiple of 2 x cp_size and this rank
    keeps its load-balanced share of each sequence's tokens (`context_parallel_indices`).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_spot.data.packing import (
        collate_packed,
        context_parallel_indices,
        pair_token_counts,
        plan_packed_micro_batches,
        split_runs_to_multiple,
    )

    plan = np.asarray(step_plan)
    counts = pair_token_counts(dataset, max_length, indices=plan).sum(axis=-1)  # [groups, dp] tokens
    runs = split_runs_to_multiple(plan_packed_micro_batches(counts, max_tokens), max(1, count_multiple))
    out = []
    for run in runs:
        groups = [plan[g, dp_rank].tolist() for g in run]
        b = collate_packed(dataset, groups, dataset.pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                           max_length=max_length, sequence_multiple=2 * cp_size if cp_size > 1 else 1)
        b["labels"] = torch.where(b["loss_mask"] > 0, b["labels"], torch.full_like(b["labels"], IGNORE_INDEX))
        if cp_size > 1:
            keep = context_parallel_indices(b["cu_seqlens"], cp_size, cp_rank)
            for key in ("tokens", "labels", "loss_mask", "padding_mask", "position_ids"):
                b[key] = b[key][:, keep]
            b["segment_ids"] = b["segment_ids"][keep]
        if ref_logps is not None:
            per_seq = []
            for idx in groups:
                idx = np.asarray(idx)
                per_seq.extend([ref_logps[idx, 0], ref_logps[idx, 1]])
            b["ref_logps"] = torch.from_numpy(np.concatenate(per_seq)).float()
        b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        cu, cu_real = b["cu_seqlens"], b["cu_seqlens_unpadded"]
        b["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real, cu_seqlens_q_padded=cu,
            cu_seqlens_kv_padded=cu, max_seqlen_q=b["max_seqlen"], max_seqlen_kv=b["max_seqlen"])
        out.append(b)
    return out


def step_micro_batches(cfg, dataset: PairDataset, sampler, epoch: int, step_in_epoch: int,
                       indices: Sequence[Sequence[int]], device: torch.device, dp_rank: int,
                       ref_logps: Optional[np.ndarray] = None, pipeline_parallel: int = 1) -> list[dict]:
    """The micro-batches of one training step, padded rows or packed rows (`data.packing`).
    Each batch gets `mean_sequence_length` (non-pad tokens per sequence) for the FLOPs estimate."""
    d = cfg.data
    if d.packing:
        interleaved = (cfg.parallel.virtual_pipeline or 1) > 1
        from megatron.core import parallel_state as ps

        cp = ps.get_context_parallel_world_size()
        mbs = make_packed_micro_batches(dataset, sampler.plan(epoch)[step_in_epoch], dp_rank, device,
                                        d.max_tokens_per_micro_batch, ref_logps=ref_logps,
                                        pad_to_multiple_of=d.pad_to_multiple_of, max_length=d.seq_length,
                                        count_multiple=pipeline_parallel if interleaved else 1,
                                        cp_size=cp, cp_rank=ps.get_context_parallel_rank() if cp > 1 else 0)
        for mb in mbs:
            mb["mean_sequence_length"] = mb["attention_tokens"] / mb["num_sequences"]
        return mbs
    mbs = make_micro_batches(dataset, indices, device, ref_logps=ref_logps, pad_to_multiple_of=d.pad_to_multiple_of,
                             max_length=d.seq_length)
    for mb in mbs:
        mb["mean_sequence_length"] = mb["attention_tokens"] / mb["tokens"].shape[0]
    return mbs
