"""Pad-free packing of preference pairs into token-budget micro-batches.

A step's pairs arrive from `PairBatchSampler` as G logical micro-batches ("groups") of
`micro_batch_size` pairs per data-parallel rank, exactly as without packing. Packing changes only
how groups are laid out for the model: consecutive groups are concatenated into one row while the
row stays within the token budget on every DP rank, so

- the set of pairs, their DP split and the order of groups are those of the unpacked run: a group
  is still one spot-bco delta update (TRL 0.20's rule: one mean of 2B rewards per micro-batch,
  averaged over DP ranks), and losses do not depend on the budget;
- the k-th packed micro-batch holds the same group indices on every DP rank, so the per-group
  delta all-reduces line up across ranks;
- the number of pairs per micro-batch varies; the step's loss is still the mean over its pairs
  (the engine returns per-micro-batch sums and the pair count to Megatron-Core).

Inside a row each group contributes its B chosen sequences then its B rejected sequences, each
`prompt + response`; positions restart at 0 per sequence and `cu_seqlens` marks the boundaries
(the padding tail, if any, is one more segment that no loss reads).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .reader import PairDataset, collate_pairs


def pair_token_counts(dataset: PairDataset, max_length: Optional[int] = None, indices=None) -> np.ndarray:
    """Tokens each pair occupies when packed: len(prompt+chosen) + len(prompt+rejected), after the same
    truncation to `max_length` that collation applies. For all pairs, or for the pair indices `indices`
    (any shape; the result has that shape), so a step reads only its own pairs' lengths."""
    seq = dataset.sequence_lengths()
    if indices is not None:
        seq = seq[np.asarray(indices, dtype=np.int64)]
    chosen, rejected = seq[..., 0] + seq[..., 1], seq[..., 0] + seq[..., 2]
    if max_length:
        chosen, rejected = np.minimum(chosen, max_length), np.minimum(rejected, max_length)
    return chosen + rejected


def plan_packed_micro_batches(tokens_per_group: np.ndarray, max_tokens: int) -> list[range]:
    """Cut G groups, in order, into consecutive runs whose token count fits `max_tokens` on every DP rank.

    tokens_per_group: [G] for one rank or [G, dp] for all ranks. A group larger than the budget on
    its own gets a micro-batch of its own (it cannot be split without splitting a delta update).
    """
    t = np.asarray(tokens_per_group, dtype=np.int64)
    if t.ndim == 1:
        t = t[:, None]
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got {max_tokens}")
    runs, start = [], 0
    current = np.zeros(t.shape[1], dtype=np.int64)
    for g in range(t.shape[0]):
        if g > start and (current + t[g]).max() > max_tokens:
            runs.append(range(start, g))
            start, current = g, np.zeros_like(current)
        current += t[g]
    if t.shape[0]:
        runs.append(range(start, t.shape[0]))
    return runs


def split_runs_to_multiple(runs: list[range], multiple: int) -> list[range]:
    """Split the longest multi-group runs until their number is a multiple of `multiple`
    (interleaved pipelines need a micro-batch count divisible by the pipeline size)."""
    runs = list(runs)
    while len(runs) % multiple:
        longest = max(range(len(runs)), key=lambda i: len(runs[i]))
        r = runs[longest]
        if len(r) < 2:
            raise ValueError(f"cannot make {len(runs)} packed micro-batches a multiple of {multiple}: "
                             "every micro-batch holds one group; lower data.micro_batch_size or raise "
                             "data.global_batch_size")
        half = r.start + len(r) // 2
        runs[longest: longest + 1] = [range(r.start, half), range(half, r.stop)]
    return runs


def collate_packed(dataset: PairDataset, groups: Sequence[Sequence[int]], pad_token_id: int,
                   pad_to_multiple_of: int = 1, max_length: Optional[int] = None, sequence_multiple: int = 1) -> dict:
    """One packed row from whole groups of pairs.

    Returns tensors `tokens`, `labels`, `position_ids` [1, T] (int64), `loss_mask` [1, T] (float32),
    `padding_mask` [1, T] (bool, True at padding: the tail and context parallel's per-sequence padding),
    `segment_ids` [T] (sequence index of each token; the padding tail has index num_sequences),
    `cu_seqlens` (int32, boundaries incl. the padding tail), `pair_indices` [P] in group order,
    plus python lists `group_sizes` (pairs per group) and `chosen_tokens` (scored chosen tokens per
    group), and ints `max_seqlen`, `num_sequences`, `attention_tokens` (non-pad tokens).
    `sequence_multiple` > 1 pads every sequence to a multiple of it (context parallel splits each
    sequence into 2 x CP equal chunks); `cu_seqlens` then holds the padded boundaries and
    `cu_seqlens_unpadded` the real ones.
    Sequence k of group g is at rows [offset_g + k] for chosen and [offset_g + B_g + k] for rejected,
    offset_g = 2 * (pairs before g): the per-group layout of `collate_pairs`.
    """
    import torch

    tokens, labels, mask, padding, positions, segment = [], [], [], [], [], []
    lengths, real_lengths, group_sizes, chosen_tokens, pairs = [], [], [], [], []
    q = max(int(sequence_multiple), 1)
    seq_index = 0
    for idx in groups:
        # collate_pairs owns truncation and label/mask construction: reuse it, then drop its padding
        b = collate_pairs(dataset, idx, pad_token_id, pad_to_multiple_of=1, max_length=max_length)
        B = len(idx)
        group_sizes.append(B)
        chosen_tokens.append(int(b["loss_mask"][:B].sum().item()))
        pairs.extend(int(i) for i in idx)
        for j in range(2 * B):
            n = int(b["sequence_lengths"][j])
            width = -(-n // q) * q
            row_t, row_l, row_m = b["tokens"][j], b["labels"][j], b["loss_mask"][j]
            extra = width - n
            tokens.append(torch.cat([row_t[:n], torch.full((extra,), pad_token_id, dtype=torch.int64)]))
            labels.append(torch.cat([row_l[:n], torch.full((extra,), pad_token_id, dtype=torch.int64)]))
            mask.append(torch.cat([row_m[:n], torch.zeros(extra, dtype=torch.float32)]))
            padding.append(torch.arange(width) >= n)
            positions.append(torch.arange(width, dtype=torch.int64))
            segment.append(torch.full((width,), seq_index, dtype=torch.int64))
            lengths.append(width)
            real_lengths.append(n)
            seq_index += 1
    used = int(sum(lengths))
    m = max(int(pad_to_multiple_of), 1)
    total = -(-used // m) * m
    pad = total - used
    if pad:
        tokens.append(torch.full((pad,), pad_token_id, dtype=torch.int64))
        labels.append(torch.full((pad,), pad_token_id, dtype=torch.int64))
        mask.append(torch.zeros(pad, dtype=torch.float32))
        padding.append(torch.ones(pad, dtype=torch.bool))
        positions.append(torch.arange(pad, dtype=torch.int64))
        segment.append(torch.full((pad,), seq_index, dtype=torch.int64))
    bounds = np.concatenate([[0], np.cumsum(lengths + ([pad] if pad else []))])
    real_bounds = np.concatenate([[0], np.cumsum(real_lengths + ([pad] if pad else []))])
    return {
        "tokens": torch.cat(tokens)[None],
        "labels": torch.cat(labels)[None],
        "loss_mask": torch.cat(mask)[None],
        "padding_mask": torch.cat(padding)[None],
        "position_ids": torch.cat(positions)[None],
        "segment_ids": torch.cat(segment),
        "cu_seqlens": torch.as_tensor(bounds, dtype=torch.int32),
        "cu_seqlens_unpadded": torch.as_tensor(real_bounds, dtype=torch.int32),
        "max_seqlen": int(max(lengths + ([pad] if pad else []))),
        "num_sequences": seq_index,
        "pair_indices": torch.as_tensor(pairs, dtype=torch.int64),
        "group_sizes": group_sizes,
        "chosen_tokens": chosen_tokens,
        "attention_tokens": int(sum(real_lengths)),
    }


def segment_sums(token_values, loss_mask, segment_ids, num_segments: int):
    """Per-sequence sums of masked per-token values of one packed row: [T] -> [num_segments].
    Differentiable; masked positions contribute exactly 0 (even if their value is -inf)."""
    import torch

    values = token_values.reshape(-1)
    keep = loss_mask.reshape(-1) > 0
    masked = torch.where(keep, values, torch.zeros_like(values))
    out = values.new_zeros(num_segments + 1)  # the extra slot collects the padding tail
    return out.index_add(0, segment_ids.reshape(-1), masked)[:num_segments]


def context_parallel_indices(cu_seqlens, cp_size: int, cp_rank: int):
    """Token indices of a packed row that context-parallel rank `cp_rank` holds.

    Each sequence (lengths divisible by 2 x cp_size) is cut into 2 x cp_size equal chunks and rank r
    keeps chunks r and 2 x cp_size - 1 - r, so every rank gets the same share of causal-attention work:
    the load-balanced THD layout of Transformer Engine's context parallelism
    (`thd_get_partitioned_indices`), written out here so the CPU can check it.
    """
    import torch

    bounds = [int(x) for x in cu_seqlens.tolist()]
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n % (2 * cp_size):
            raise ValueError(f"sequence of {n} tokens is not divisible by 2 x context_parallel = {2 * cp_size}")
        c = n // (2 * cp_size)
        for k in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + k * c, start + (k + 1) * c, dtype=torch.int64))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
