"""The HF conversion driver: Hugging Face <-> Megatron-Core model checkpoints (checkpoint/model_checkpoint.py).

Model-agnostic: names, shapes, tensor transforms and the HF checks come from the model family's
state-dict adapter and mapping objects (models/gpt/state_dict.py, models/gpt/mappings.py); this file streams tensors between the two
formats and publishes the result atomically.

Memory: conversions stream. hf-to-mcore allocates the TP1PP1 model once in the target dtype
(no random init; untouched pages cost nothing) and fills it one mapping entry at a time from
plain file reads (large tensors in 64 MiB row blocks). Tensors torch_dist would otherwise clone
or serialise whole (fc1's gate/up halves, tensors > SAVE_CHUNK_BYTES such as the embedding)
are filled into memory of their own and stored as separate chunks. mcore-to-hf loads into a
TP1PP1 model in place (ShardedTensorFactories built ahead, so no per-layer concatenation) and
writes each HF tensor in row blocks into size-capped safetensors files. Measured peak: model
size + ~0.5 GiB, Python and Megatron-Core themselves included (BENCHMARKS.md).

Conversions run in a world of one process (checkpoint/single_process.py). Called from a process that is
part of a multi-rank torch.distributed world (e.g. rank 0 at the end of training), they run in a child
process (``python -m megatron_spot.checkpoint.hf_convert``).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Optional

import torch

from megatron_spot.checkpoint.errors import CheckpointError
from megatron_spot.checkpoint.finite import refuse_non_finite_tensors
from megatron_spot.checkpoint.model_checkpoint import (
    METADATA_NAME,
    _built,
    _copy_side_files,
    _list,
    _params_by_name,
    _sharded_state_dict,
    _write_json,
    _write_side_and_metadata,
    check_output_dir,
    check_output_not_input,
    load_model_checkpoint,  # noqa: F401 (also the training side's import path)
    read_checkpoint_metadata,
)
from megatron_spot.checkpoint.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    SafetensorsCheckpoint,
    plan_shards,
    row_blocks,
    write_safetensors,
)
from megatron_spot.checkpoint.single_process import ensure_single_process_world, in_multi_rank_world, run_in_child
from megatron_spot.config.dtypes import TORCH_DTYPES, dtype_name
from megatron_spot.config.dtypes import normalize_dtype as _normalize
from megatron_spot.config.loader import ConfigError, read_json
from megatron_spot.models import build_unsharded_model, config_from_hf_dict
from megatron_spot.models import state_dict_adapter as adapter
from megatron_spot.utils.atomic import atomic_dir

if TYPE_CHECKING:
    from megatron_spot.models import GPTConfig

log = logging.getLogger(__name__)


def normalize_dtype(dtype: str) -> str:
    try:
        return _normalize(dtype)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


# hf-to-mcore stores tensors above this size as several row chunks. torch_dist serialises (and
# reads back) each stored chunk as a whole in memory, so one 1.2 GB embedding would otherwise cost
# a 1.2 GB temporary on save and again on load. Chunks are an on-disk detail: any layout loads them.
SAVE_CHUNK_BYTES = 128 * 2**20


def _chunk_rows(rows: int, nbytes: int, max_bytes: int) -> int:
    """Number of equal row chunks (a divisor of rows) so that each is at most max_bytes."""
    if nbytes <= max_bytes or rows < 2:
        return 1
    return next((k for k in range(2, rows + 1) if rows % k == 0 and nbytes // k <= max_bytes), rows)


def _substitute_chunks(sharded: dict, chunked: dict[int, list[torch.Tensor]]) -> dict:
    """Swap the data of ShardedTensors over never-written parameter memory (keyed by data_ptr)
    for tensors that own their storage, split into row chunks where there are several."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    used = set()

    def split(st):
        if not isinstance(st, ShardedTensor) or st.data is None or st.data.data_ptr() not in chunked:
            return st
        pieces = chunked[st.data.data_ptr()]
        if st.flattened_range is not None or sum(t.shape[0] for t in pieces) != st.data.shape[0]:
            raise CheckpointError(f"internal: cannot store {st.key} in row chunks")
        used.add(st.data.data_ptr())
        if len(pieces) == 1:
            return dataclasses.replace(st, data=pieces[0])
        p, k = st.prepend_axis_num, len(pieces)
        frag = list(st.axis_fragmentations)
        frag[p] *= k
        out, row = [], 0
        for piece in pieces:
            offset = list(st.global_offset)
            offset[p] = st.global_offset[p] + row
            out.append(dataclasses.replace(st, data=piece, local_shape=tuple(piece.shape),
                                           global_offset=tuple(offset), axis_fragmentations=tuple(frag)))
            row += piece.shape[0]
        return out

    def walk(obj):
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return split(obj)

    out = walk(_built(sharded))
    if len(used) != len(chunked):
        raise CheckpointError(f"internal: {len(chunked) - len(used)} converted tensor(s) found no place in the checkpoint")
    return out


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def summary_line(direction: str, summary: dict) -> str:
    return (f"{direction}: {summary['tensors']} tensors, {_fmt_bytes(summary['bytes'])} in {summary['seconds']:.1f} s "
            f"-> {summary['out']}")


# ---------------------------------------------------------------------------------------------
# HF -> Megatron-Core
# ---------------------------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> GPTConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such folder")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    return config_from_hf_dict(read_json(path, CheckpointError), source=path)


def check_hf_tensors(src: SafetensorsCheckpoint, cfg: GPTConfig) -> list[str]:
    """Raise on missing / unexpected / wrongly shaped tensors (the adapter's rules); return the names to ignore."""
    problem, ignored = adapter.hf_tensor_problems({n: tuple(src.shape(n)) for n in src.names()}, cfg)
    if problem:
        raise CheckpointError(f"{src.folder}: {problem}")
    return ignored


@torch.no_grad()
def _copy_rows(dst: torch.Tensor, src: SafetensorsCheckpoint, name: str, start: int) -> None:
    """dst[i] = src[name][start + i] for the rows the source has (64 MiB blocks); zeros beyond
    (vocabulary padding)."""
    rows = src.shape(name)[0]
    row_bytes = max(1, src.tensors[name].nbytes // max(1, rows))
    step = max(1, (64 * 2**20) // row_bytes)
    end = min(rows, start + dst.shape[0])
    for r in range(start, end, step):
        block = src.read(name, r, min(end, r + step))
        dst[r - start: r - start + block.shape[0]].copy_(block)
    if end - start < dst.shape[0]:
        dst[max(0, end - start):].zero_()


@torch.no_grad()
def _fill_from_hf(param: torch.Tensor, entry, src: SafetensorsCheckpoint, cfg: GPTConfig) -> None:
    if entry.row_copy and src.tensors[entry.hf[0]].nbytes > 2 * 64 * 2**20:
        _copy_rows(param, src, entry.hf[0], 0)  # large: in row blocks, no full-size temporary
        return
    value = entry.to_mcore([src.read(n) for n in entry.hf], cfg)
    if tuple(value.shape) != tuple(param.shape):
        raise CheckpointError(f"{entry.mcore}: built shape {list(value.shape)} != model shape {list(param.shape)}")
    param.copy_(value)


def source_dtype(src: SafetensorsCheckpoint, hf_config_path: str) -> tuple[str, str]:
    """(dtype name, where it came from) of a HF checkpoint: the dtype holding most of its weight bytes
    (what the weights really are), else config.json's torch_dtype / dtype."""
    by_dtype: dict[torch.dtype, int] = {}
    for info in src.tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    if by_dtype:
        top = max(by_dtype, key=by_dtype.get)
        if top == torch.float64:  # Megatron trains in at most fp32: the closest precision, announced below
            return "fp32", "the safetensors weights (float64, rounded to fp32)"
        return dtype_name(top), "the safetensors weights"
    cfg = read_json(hf_config_path, CheckpointError)
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    return normalize_dtype(name or "bf16"), ("config.json" if name else "the default")


def convert_hf_to_mcore(hf_dir: str, out_dir: str, dtype: Optional[str] = None, progress: bool = True,
                        overwrite: bool = False) -> dict:
    """Convert a HF checkpoint folder of a registered model family into a Megatron-Core dist checkpoint. Returns a summary.

    dtype: bf16 | fp32 | fp16; None (the default) keeps the source's precision, so an fp32
    checkpoint round-trips bit-exact. A dtype that changes the precision is reported.
    Summary: tensors (Megatron tensors written), hf_tensors, bytes, seconds, out, dtype, source_dtype.
    """
    dtype = normalize_dtype(dtype) if dtype else None
    check_output_dir(out_dir, overwrite, inputs=[hf_dir])  # before reading anything (again when publishing)
    if in_multi_rank_world():
        return run_in_child("hf-to-mcore", dict(hf_dir=hf_dir, out_dir=out_dir, dtype=dtype, progress=progress,
                                                 overwrite=overwrite))
    t0 = time.perf_counter()
    cfg = read_hf_config(hf_dir)
    with SafetensorsCheckpoint(hf_dir, refuse_non_finite=True) as src:
        src_dtype, where = source_dtype(src, os.path.join(hf_dir, "config.json"))
        msg = None
        if dtype is None:
            dtype = src_dtype
            if "float64" in where:
                msg = f"hf-to-mcore: {hf_dir} holds float64 weights; storing them as fp32"
        elif dtype != src_dtype:
            msg = (f"hf-to-mcore: storing the {src_dtype} weights of {hf_dir} as {dtype} (--dtype; source dtype "
                   f"from {where})")
        if msg:
            log.warning(msg)
            if progress:
                print(msg, flush=True)
        ignored = check_hf_tensors(src, cfg)
        if ignored:
            log.info("ignoring %s", _list(ignored))
        ensure_single_process_world()
        chunks = build_unsharded_model(cfg, dtype)
        params = _params_by_name(chunks)
        entries = adapter.mapping_table(cfg)
        filled, nbytes, row_chunks = set(), 0, {}
        with _progress(len(entries), "hf->mcore", progress) as bar:
            for entry in entries:
                if entry.mcore not in params:
                    raise CheckpointError(f"internal: the Megatron model has no parameter {entry.mcore}")
                param = params[entry.mcore]
                size = param.numel() * param.element_size()
                k = _chunk_rows(param.shape[0], size, SAVE_CHUNK_BYTES) if entry.row_copy else 1
                if entry.stacked:  # each part in memory of its own (see _built: fc1's gate/up); the parameter stays untouched
                    parts = [src.read(n).to(param.dtype) for n in entry.hf]
                    if sum(t.shape[0] for t in parts) != param.shape[0] or any(t.shape[1:] != param.shape[1:] for t in parts):
                        raise CheckpointError(f"{entry.mcore}: {', '.join(entry.hf)} do not fill {list(param.shape)}")
                    row = 0
                    for t in parts:
                        row_chunks[param[row:].data_ptr()] = [t.clone() if t.untyped_storage().nbytes() != t.nbytes else t]
                        row += t.shape[0]
                elif k > 1:  # stored as row chunks filled straight from the file; the parameter stays untouched
                    step = param.shape[0] // k
                    pieces = [torch.empty((step, *param.shape[1:]), dtype=param.dtype) for _ in range(k)]
                    for i, piece in enumerate(pieces):
                        _copy_rows(piece, src, entry.hf[0], i * step)
                    row_chunks[param.data_ptr()] = pieces
                else:
                    _fill_from_hf(param, entry, src, cfg)
                filled.add(entry.mcore)
                nbytes += param.numel() * param.element_size()
                bar.update(1)
    unfilled = set(params) - filled
    if unfilled:
        raise CheckpointError(f"internal: Megatron parameters without a HF source: {_list(unfilled)}")
    if progress:
        print(f"hf-to-mcore: writing the torch_dist checkpoint ({_fmt_bytes(nbytes)}) ...", flush=True)
    _save_chunks_single(chunks, out_dir, cfg, dtype, side_files_from=hf_dir, overwrite=overwrite,
                        source=os.path.abspath(hf_dir), row_chunks=row_chunks)
    del chunks, params, row_chunks
    gc.collect()
    summary = dict(tensors=len(entries), hf_tensors=sum(len(e.hf) for e in entries), bytes=nbytes,
                   seconds=round(time.perf_counter() - t0, 3), out=os.path.abspath(out_dir), dtype=dtype,
                   source_dtype=src_dtype)
    if progress:
        print(summary_line("hf-to-mcore", summary), flush=True)
    return summary


def _save_chunks_single(chunks, out_dir, cfg, dtype, side_files_from, overwrite, source, row_chunks) -> None:
    from megatron.core import dist_checkpointing

    with atomic_dir(check_output_dir(out_dir, overwrite, inputs=[side_files_from, source])) as tmp:
        dist_checkpointing.save(_substitute_chunks(_sharded_state_dict(chunks), row_chunks), tmp)
        _write_side_and_metadata(tmp, cfg, dtype, side_files_from, source, {"tp": 1, "pp": 1, "vpp": None})


# ---------------------------------------------------------------------------------------------
# Megatron-Core -> HF
# ---------------------------------------------------------------------------------------------
def convert_mcore_to_hf(ckpt_dir: str, out_dir: str, dtype: Optional[str] = None, progress: bool = True,
                        max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> dict:
    """Export a model checkpoint as a HF folder of its family (safetensors + index, config, tokenizer files).

    dtype: bf16 | fp32 | fp16; None keeps the checkpoint's dtype. Returns a summary (tensors,
    bytes, seconds, out, dtype, files).
    """
    if in_multi_rank_world():
        return run_in_child("mcore-to-hf", dict(ckpt_dir=ckpt_dir, out_dir=out_dir, dtype=dtype, progress=progress,
                                                 max_shard_bytes=max_shard_bytes, overwrite=overwrite))
    t0 = time.perf_counter()
    check_output_dir(out_dir, overwrite, inputs=[ckpt_dir])  # before loading the model (again when publishing)
    meta = read_checkpoint_metadata(ckpt_dir)
    cfg = config_from_hf_dict(meta["hf_config"], source=os.path.join(ckpt_dir, METADATA_NAME))
    ckpt_dtype = normalize_dtype(meta.get("dtype", "bf16"))
    dtype = normalize_dtype(dtype) if dtype else ckpt_dtype
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes} must be positive")
    tdtype = TORCH_DTYPES[dtype]
    ensure_single_process_world()
    chunks = build_unsharded_model(cfg, ckpt_dtype)
    if progress:
        print(f"mcore-to-hf: loading {ckpt_dir} ...", flush=True)
    load_model_checkpoint(chunks, ckpt_dir)
    params = _params_by_name(chunks)
    refuse_non_finite_tensors(params.items(), ckpt_dir)
    entries = adapter.mapping_table(cfg)
    shapes = adapter.hf_shapes(cfg)
    owner = {}
    items = []
    for entry in entries:
        for n in entry.hf:
            owner[n] = entry
            items.append((n, tdtype, tuple(shapes[n])))
    shards = plan_shards(items, max_shard_bytes)
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    cache: dict = {"entry": None, "tensors": None}

    def produce(name: str):
        entry = owner[name]
        if cache["entry"] is not entry:
            cache["entry"], cache["tensors"] = entry, dict(zip(entry.hf, entry.to_hf(params[entry.mcore].detach(), cfg)))
        tensor = cache["tensors"][name]
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise CheckpointError(f"internal: {name} has shape {list(tensor.shape)}, expected {list(shapes[name])}")
        return row_blocks(tensor, tdtype)

    total = 0
    with atomic_dir(check_output_dir(out_dir, overwrite, inputs=[ckpt_dir])) as tmp:
        with _progress(len(items), "mcore->hf", progress) as bar, torch.no_grad():
            weight_map = {}
            for fname, shard in zip(names, shards):
                total += write_safetensors(os.path.join(tmp, fname), shard, produce, metadata={"format": "pt"},
                                           on_tensor=lambda _n, _b: bar.update(1))
                weight_map.update({n: fname for n, _, _ in shard})
        cache.clear()
        if len(shards) > 1:
            _write_json(os.path.join(tmp, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
        _copy_side_files(ckpt_dir, tmp, cfg)
        _write_json(os.path.join(tmp, "config.json"), adapter.hf_config_dict(cfg, dtype))
    del chunks, params
    gc.collect()
    summary = dict(tensors=len(items), bytes=total, seconds=round(time.perf_counter() - t0, 3),
                   out=os.path.abspath(out_dir), dtype=dtype, files=names)
    if progress:
        print(summary_line("mcore-to-hf", summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# child-process entry (used by single_process.run_in_child)
# ---------------------------------------------------------------------------------------------
def _child_main(argv: list[str]) -> int:
    kind, kwargs, result_path = argv[0], json.loads(argv[1]), argv[2]
    fn = {"hf-to-mcore": convert_hf_to_mcore, "mcore-to-hf": convert_mcore_to_hf}[kind]
    try:
        summary = fn(**kwargs)
        out = {"summary": summary}
        code = 0
    except (ConfigError, OSError) as exc:
        out = {"error": str(exc)}
        code = 2
    with open(result_path, "w") as f:
        json.dump(out, f)
    return code


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
