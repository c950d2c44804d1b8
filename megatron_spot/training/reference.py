"""Reference log-probs: score every pair once with the frozen starting model, store beside the pack.

Sidecar files (written atomically by rank 0):
  <pack>.ref_logps.npy   float64 [num_pairs, 2]: sequence log-prob of (chosen, rejected) responses
  <pack>.ref_logps.json  {"pack_fingerprint", "num_pairs", "model", "model_fingerprint",
                          "tokenizer_hash", "created"}
The sidecar belongs to one pack and one model's weights (checkpoint.fingerprint: content, not path)
and tokenizer: scoring recomputes, and training refuses, a sidecar made for anything else.
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
from megatron_spot.utils.atomic import atomic_file, write_json_atomic


def sidecar_paths(pack_prefix: str, override: Optional[str] = None) -> tuple[str, str]:
    base = override[:-4] if override and override.endswith(".npy") else override
    base = base or f"{pack_prefix}.ref_logps"
    return f"{base}.npy", f"{base}.json"


def check_sidecar_writable(pack_prefix: str, override: Optional[str] = None) -> None:
    """A ConfigError naming the setting when the sidecar cannot be written (a read-only pack folder, a folder
    or a file in the way of data.ref_logprobs)."""
    from megatron_spot.utils.output_paths import OutputPathError, check_output_file

    what = "data.ref_logprobs" if override else "the reference sidecar beside data.pack (set data.ref_logprobs)"
    try:
        for path in sidecar_paths(pack_prefix, override):
            check_output_file(path, what)
    except OutputPathError as exc:
        raise ConfigError(str(exc)) from None


def reference_identity(model_dir: Optional[str], tokenizer_hash: str) -> dict:
    """What a sidecar is keyed by besides the pack: the model's weights fingerprint and tokenizer."""
    from megatron_spot.checkpoint.fingerprint import weights_fingerprint

    return {"model_fingerprint": weights_fingerprint(model_dir) if model_dir else None,
            "tokenizer_hash": tokenizer_hash}


def save_ref_logps(values: np.ndarray, pack_prefix: str, fingerprint: str, model: str,
                   override: Optional[str] = None, identity: Optional[dict] = None) -> str:
    npy, meta = sidecar_paths(pack_prefix, override)
    # the .json vouches for the .npy: drop it first, publish it last, so a crash in between leaves
    # "not found" (rerun) rather than an old description over new values or the reverse
    if os.path.exists(meta):
        os.remove(meta)
    with atomic_file(npy, binary=True) as f:
        np.save(f, values.astype(np.float64))
    info = {"pack_fingerprint": fingerprint, "num_pairs": int(values.shape[0]), "model": model,
            **(identity or {}), "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    write_json_atomic(meta, info)
    return npy


def _read_sidecar_meta(meta: str) -> dict:
    try:
        with open(meta, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{meta}: unreadable reference log-prob metadata ({exc}); rerun tools/score_logprobs.py "
                          "--force") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{meta}: not a reference log-prob metadata object; rerun tools/score_logprobs.py --force")
    return info


def load_ref_logps(pack_prefix: str, fingerprint: str, num_pairs: int, override: Optional[str] = None,
                   identity: Optional[dict] = None) -> np.ndarray:
    """The sidecar's values, after checking it belongs to this pack (and, given `identity`, to this
    reference model and tokenizer). Every refusal says what to rerun."""
    npy, meta = sidecar_paths(pack_prefix, override)
    if not os.path.exists(npy) or not os.path.exists(meta):
        raise ConfigError(
            f"reference log-probs not found ({npy}); compute them first with "
            f"`torchrun ... tools/score_logprobs.py --config <recipe> ...` or set loss.online_reference=true"
        )
    info = _read_sidecar_meta(meta)
    if info.get("pack_fingerprint") != fingerprint:
        raise ConfigError(
            f"{meta} was computed for another dataset (fingerprint {str(info.get('pack_fingerprint'))[:12]}…, "
            f"pack has {fingerprint[:12]}…); rerun tools/score_logprobs.py on this pack"
        )
    for key, what in (("model_fingerprint", "reference model (model.init_checkpoint) weights"),
                      ("tokenizer_hash", "tokenizer")):
        if identity is not None and info.get(key) != identity.get(key):
            raise ConfigError(
                f"{meta} was computed with another {what} ({str(info.get(key))[:12]}…, now "
                f"{str(identity.get(key))[:12]}…): the checkpoint was replaced or another one is configured; "
                "rerun tools/score_logprobs.py --force with this model.init_checkpoint")
    try:
        values = np.load(npy, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # truncated or not a .npy
        raise ConfigError(f"{npy}: unreadable reference log-probs ({exc}); rerun tools/score_logprobs.py "
                          "--force") from None
    if values.shape != (num_pairs, 2):
        raise ConfigError(f"{npy} has shape {values.shape}, expected ({num_pairs}, 2); rerun tools/score_logprobs.py")
    if not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
        raise ConfigError(f"{npy} contains NaN/Inf (or non-float) reference log-probs; rerun tools/score_logprobs.py "
                          "--force")
    return values


def score_pairs(engine, dataset, dp_rank: int, dp_size: int, micro_batch_size: int, device: torch.device,
                pad_to_multiple_of: int = 64, max_length: Optional[int] = None, micro_batches_per_call: int = 4,
                progress: bool = False, max_tokens_per_micro_batch: Optional[int] = None) -> np.ndarray:
    """Sequence log-probs of every pair's chosen and rejected response under `engine`'s model.

    Each data-parallel replica scores a disjoint share (length-sorted, so padding stays small);
    the shares are gathered to every rank. Returns float64 [len(dataset), 2]. With
    `max_tokens_per_micro_batch` (data.packing) each call's groups are packed into rows of at most that
    many tokens instead of padded rows (same values; see megatron_spot.data.packing).
    """
    from megatron.core import parallel_state as ps

    from megatron_spot.training.batches import make_micro_batches, make_packed_micro_batches

    par = engine.cfg.parallel
    packed_count_multiple = par.pipeline_parallel if (par.virtual_pipeline or 1) > 1 else 1
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
        if max_tokens_per_micro_batch:
            # this replica's groups alone: scoring has no collective across DP ranks to line up
            mbs = make_packed_micro_batches(dataset, np.asarray(full)[:, None, :], 0, device,
                                            max_tokens_per_micro_batch, pad_to_multiple_of=pad_to_multiple_of,
                                            max_length=max_length, count_multiple=packed_count_multiple)
        else:
            mbs = make_micro_batches(dataset, full, device, pad_to_multiple_of=pad_to_multiple_of,
                                     max_length=max_length)
        # both layouts give each group's B chosen then B rejected sequences, groups in call order
        flat = torch.cat(engine.sequence_logps(mbs)).cpu().numpy()
        b = len(full[0])
        for g, idx in enumerate(call):
            for k, pair in enumerate(idx):
                results[int(pair)] = (float(flat[2 * b * g + k]), float(flat[2 * b * g + b + k]))
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


def existing_sidecar(pack_prefix: str, fingerprint: str, model: str, override: Optional[str] = None,
                     identity: Optional[dict] = None) -> Optional[str]:
    """The sidecar's path if it already holds this pack's scores under this model's weights and this
    tokenizer (by content, not by path), else None."""
    npy, meta = sidecar_paths(pack_prefix, override)
    if not (os.path.exists(npy) and os.path.exists(meta)):
        return None
    try:
        info = _read_sidecar_meta(meta)
    except ConfigError:
        return None
    if identity is None:
        identity = {"model_fingerprint": None}
    same = all(info.get(k) == v for k, v in identity.items()) and identity.get("model_fingerprint") is not None
    return npy if info.get("pack_fingerprint") == fingerprint and same else None


def score_reference(cfg, progress: bool = True, force: bool = False) -> Optional[str]:
    """Collective entry for tools/score_logprobs.py: score cfg.data.pack with cfg.model.init_checkpoint.

    Runs at any TP/PP/DP layout; rank 0 writes the sidecar. Returns its path on rank 0.
    """
    from megatron_spot.checkpoint.model_checkpoint import load_model_checkpoint
    from megatron_spot.data import PairDataset
    from megatron_spot.platform import Layout, initialize
    from megatron_spot.training.plan import plan_run
    from megatron_spot.training.inputs import expected_tokenizer_hash, resolve_model
    from megatron_spot.training.engine import Engine


    world = int(os.environ.get("WORLD_SIZE", "1"))
    Layout.from_config(cfg.parallel, world)  # the world-size rules first: they need no files
    if not cfg.model.init_checkpoint:
        raise ConfigError("model.init_checkpoint is not set: the reference model is the Megatron checkpoint "
                          "training starts from (tools/convert_checkpoint.py hf-to-mcore writes one)")
    if not cfg.data.pack:
        raise ConfigError("data.pack is not set")
    model_cfg, weights = resolve_model(cfg, None)
    plan = plan_run(cfg, world, model=model_cfg, optimizer_steps=False)
    expected = expected_tokenizer_hash(cfg, weights)
    dataset = PairDataset(cfg.data.pack, expected_tokenizer_hash=expected)
    dataset.check_token_ids(model_cfg.vocab_size)
    from megatron_spot.platform.device import transformer_engine_available
    from megatron_spot.training.plan import validate_packing

    validate_packing(cfg, dataset, te_available=transformer_engine_available())
    identity = reference_identity(weights, dataset.tokenizer_hash)
    done = None if force else existing_sidecar(cfg.data.pack, dataset.fingerprint, weights, cfg.data.ref_logprobs,
                                               identity=identity)
    if done:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"reference log-probs already computed for this pack and model: {done} (--force recomputes)")
        return done
    check_sidecar_writable(cfg.data.pack, cfg.data.ref_logprobs)  # before the scoring, not after it
    info = initialize(cfg.parallel, seed=cfg.run.seed, collective_timeout_s=cfg.run.collective_timeout_s)
    engine = Engine(cfg, model_cfg, 1, trainable=False, load_weights=lambda chunks: load_model_checkpoint(chunks, weights))
    values = score_pairs(engine, dataset, info.dp_rank, plan.layout.dp, plan.micro_batch_size, info.device,
                         pad_to_multiple_of=cfg.data.pad_to_multiple_of, max_length=cfg.data.seq_length,
                         micro_batches_per_call=max(1, 2 * info.pp), progress=progress and info.rank == 0,
                         max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch if cfg.data.packing else None)
    path = None
    if info.rank == 0:
        path = save_ref_logps(values, cfg.data.pack, dataset.fingerprint, model=weights, override=cfg.data.ref_logprobs,
                              identity=identity)
    dist.barrier()
    return path
