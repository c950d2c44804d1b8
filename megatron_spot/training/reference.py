"""Reference log-probs: score every pair once with the frozen starting model, store beside the pack.

Sidecar files (written atomically by rank 0):
  <pack>.ref_logps.npy   float64 [num_pairs, 2]: sequence log-prob of (chosen, rejected) responses
  <pack>.ref_logps.json  {"pack_fingerprint", "num_pairs", "model", "created"}
Training refuses a sidecar whose fingerprint or pair count differs from the pack it trains on.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_spot.config.loader import ConfigError


def sidecar_paths(pack_prefix: str, override: Optional[str] = None) -> tuple[str, str]:
    base = override[:-4] if override and override.endswith(".npy") else override
    base = base or f"{pack_prefix}.ref_logps"
    return f"{base}.npy", f"{base}.json"


def save_ref_logps(values: np.ndarray, pack_prefix: str, fingerprint: str, model: str,
                   override: Optional[str] = None) -> str:
    npy, meta = sidecar_paths(pack_prefix, override)
    tmp_npy, tmp_meta = npy + ".tmp.npy", meta + ".tmp"
    np.save(tmp_npy, values.astype(np.float64))
    with open(tmp_meta, "w") as f:
        json.dump({"pack_fingerprint": fingerprint, "num_pairs": int(values.shape[0]), "model": model,
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f, indent=2)
    os.replace(tmp_npy, npy)
    os.replace(tmp_meta, meta)
    return npy


def load_ref_logps(pack_prefix: str, fingerprint: str, num_pairs: int, override: Optional[str] = None) -> np.ndarray:
    npy, meta = sidecar_paths(pack_prefix, override)
    if not os.path.exists(npy) or not os.path.exists(meta):
        raise ConfigError(
            f"reference log-probs not found ({npy}); compute them first with "
            f"`torchrun ... tools/score_logprobs.py --config <recipe> ...` or set loss.online_reference=true"
        )
    with open(meta) as f:
        info = json.load(f)
    if info.get("pack_fingerprint") != fingerprint:
        raise ConfigError(
            f"{meta} was computed for another dataset (fingerprint {str(info.get('pack_fingerprint'))[:12]}…, "
            f"pack has {fingerprint[:12]}…); rerun tools/score_logprobs.py on this pack"
        )
    values = np.load(npy)
    if values.shape != (num_pairs, 2):
        raise ConfigError(f"{npy} has shape {values.shape}, expected ({num_pairs}, 2); rerun tools/score_logprobs.py")
    if not np.isfinite(values).all():
        raise ConfigError(f"{npy} contains NaN/Inf reference log-probs")
    return values


def score_pairs(engine, dataset, dp_rank: int, dp_size: int, micro_batch_size: int, device: torch.device,
                pad_to_multiple_of: int = 64, max_length: Optional[int] = None, micro_batches_per_call: int = 4,
                progress: bool = False) -> np.ndarray:
    """Sequence log-probs of every pair's chosen and rejected response under `engine`'s model.

    Each data-parallel replica scores a disjoint share (length-sorted, so padding stays small);
    the shares are gathered to every rank. Returns float64 [len(dataset), 2].
    """
    from megatron.core import parallel_state as ps

    from megatron_spot.training.batches import make_micro_batches

    order = np.argsort(dataset.lengths(), kind="stable")
    batches = [order[i:i + micro_batch_size].tolist() for i in range(0, len(order), micro_batch_size)]
    mine = batches[dp_rank::dp_size]
    results: dict[int, tuple[float, float]] = {}
    calls = [mine[i:i + micro_batches_per_call] for i in range(0, len(mine), micro_batches_per_call)]
    iterator = calls
    if progress:
        from tqdm import tqdm

        iterator = tqdm(calls, desc="scoring reference log-probs", unit="call")
    for call in iterator:
        # a schedule call needs equal micro-batch sizes: pad the short tail batch with repeats
        full = [b if len(b) == micro_batch_size else b + [b[-1]] * (micro_batch_size - len(b)) for b in call]
        # interleaved pipelines need a fixed number (>= PP) of micro-batches per call: repeat the last
        full += [full[-1]] * (micro_batches_per_call - len(full))
        mbs = make_micro_batches(dataset, full, device, pad_to_multiple_of=pad_to_multiple_of, max_length=max_length)
        seq = engine.sequence_logps(mbs)
        for idx, s in zip(call, seq):
            s = s.cpu().numpy()
            b = len(full[0])
            for k, pair in enumerate(idx):
                results[int(pair)] = (float(s[k]), float(s[b + k]))
    gathered = [None] * dp_size
    if dp_size > 1:
        dist.all_gather_object(gathered, results, group=ps.get_data_parallel_group())
    else:
        gathered = [results]
    out = np.full((len(dataset), 2), np.nan)
    for part in gathered:
        for pair, (c, r) in part.items():
            out[pair] = (c, r)
    if np.isnan(out).any():
        raise RuntimeError("scoring left pairs without a reference log-prob (internal error)")
    return out


def existing_sidecar(pack_prefix: str, fingerprint: str, model: str, override: Optional[str] = None) -> Optional[str]:
    """The sidecar's path if it already holds this pack's scores under this model, else None."""
    npy, meta = sidecar_paths(pack_prefix, override)
    if not (os.path.exists(npy) and os.path.exists(meta)):
        return None
    try:
        with open(meta) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    same_model = os.path.abspath(str(info.get("model"))) == os.path.abspath(model)
    return npy if info.get("pack_fingerprint") == fingerprint and same_model else None


def score_reference(cfg, progress: bool = True, force: bool = False) -> Optional[str]:
    """Collective entry for tools/score_logprobs.py: score cfg.data.pack with cfg.model.init_checkpoint.

    Runs at any TP/PP/DP layout; rank 0 writes the sidecar. Returns its path on rank 0.
    """
    from megatron_spot.checkpoint.hf_convert import load_model_checkpoint
    from megatron_spot.data import PairDataset, tokenizer_hash
    from megatron_spot.models.qwen3 import validate_model_layout
    from megatron_spot.platform import initialize, validate_parallel_layout
    from megatron_spot.train import resolve_model
    from megatron_spot.training.engine import Engine


    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_parallel_layout(cfg.parallel, world)
    if not cfg.model.init_checkpoint:
        raise ConfigError("model.init_checkpoint is not set: the reference model is the Megatron checkpoint "
                          "training starts from (tools/convert_checkpoint.py hf-to-mcore writes one)")
    if not cfg.data.pack:
        raise ConfigError("data.pack is not set")
    qwen3, weights = resolve_model(cfg, None)
    validate_model_layout(qwen3, cfg.parallel, cfg.precision, cfg.recompute, world)
    tok_dir = cfg.data.tokenizer or cfg.model.init_checkpoint
    expected = tokenizer_hash(tok_dir) if os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")) else None
    dataset = PairDataset(cfg.data.pack, expected_tokenizer_hash=expected)
    done = None if force else existing_sidecar(cfg.data.pack, dataset.fingerprint, weights, cfg.data.ref_logprobs)
    if done:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"reference log-probs already computed for this pack and model: {done} (--force recomputes)")
        return done
    info = initialize(cfg.parallel, seed=cfg.run.seed)
    engine = Engine(cfg, qwen3, 1, trainable=False, load_weights=lambda chunks: load_model_checkpoint(chunks, weights))
    values = score_pairs(engine, dataset, info.dp_rank, info.dp, cfg.data.micro_batch_size, info.device,
                         pad_to_multiple_of=cfg.data.pad_to_multiple_of, max_length=cfg.data.seq_length,
                         micro_batches_per_call=max(1, 2 * info.pp), progress=progress and info.rank == 0)
    path = None
    if info.rank == 0:
        path = save_ref_logps(values, cfg.data.pack, dataset.fingerprint, model=weights, override=cfg.data.ref_logprobs)
    dist.barrier()
    return path
