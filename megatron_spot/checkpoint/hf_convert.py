"""Hugging Face Qwen3 <-> Megatron-Core dist_checkpointing (torch_dist) conversion.

A model checkpoint folder (written by :func:`convert_hf_to_mcore` and :func:`save_model_checkpoint`):

    <ckpt>/
      .metadata, __*_*.distcp, metadata.json   Megatron-Core dist_checkpointing, torch_dist backend:
                                               the model's sharded_state_dict with GLOBAL shapes
                                               (vocab padded to a multiple of 128), so it loads at
                                               any TP/PP/VPP/DP and with the local or TE layer spec
      spot_checkpoint.json                     ours: format, dtype, the Qwen3 HF config, the layout
                                               it was saved at; written last (marks it complete)
      config.json, generation_config.json,     HF side files: AutoTokenizer.from_pretrained(<ckpt>)
      tokenizer.json, tokenizer_config.json... works, and mcore-to-hf copies them to the export

Every output is built under ``<out>.tmp-*`` and renamed into place when complete, so an
interrupted conversion never leaves a folder that looks like a checkpoint.

Memory: conversions stream. hf-to-mcore allocates the TP1PP1 model once in the target dtype
(no random init; untouched pages cost nothing) and fills it one mapping entry at a time from
plain file reads (large tensors in 64 MiB row blocks). Tensors torch_dist would otherwise clone
or serialise whole (fc1's gate/up halves, tensors > SAVE_CHUNK_BYTES such as the embedding)
are filled into memory of their own and stored as separate chunks. mcore-to-hf loads into a
TP1PP1 model in place (ShardedTensorFactories built ahead, so no per-layer concatenation) and
writes each HF tensor in row blocks into size-capped safetensors files. Measured peak: model
size + ~0.5 GiB, Python and Megatron-Core themselves included (BENCHMARKS.md).

Conversions run in a world of one process. Called from a process that is part of a multi-rank
torch.distributed world (e.g. rank 0 at the end of training), they run in a child process.
"""
from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Optional

import torch

from megatron_spot.checkpoint.errors import CheckpointError
from megatron_spot.checkpoint.safe_load import is_load_failure, load_failure_reason, verify_dist_checkpoint
from megatron_spot.checkpoint.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    SafetensorsCheckpoint,
    plan_shards,
    row_blocks,
    write_safetensors,
)
from megatron_spot.config.loader import ConfigError, read_json
from megatron_spot.models.qwen3.hf_mapping import hf_shapes, mapping_table, to_hf, to_mcore
from megatron_spot.models.qwen3.presets import Qwen3Config
from megatron_spot.utils.atomic import make_temp_dir, publish_dir

log = logging.getLogger(__name__)

METADATA_NAME = "spot_checkpoint.json"
FORMAT = "megatron_spot.qwen3.dist_checkpoint"
FORMAT_VERSION = 1
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16"}
_HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# files copied from beside a HF checkpoint into ours, and from ours into an export
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "tokenizer.model")
# HF tensors that carry no weights of their own (recomputed buffers)
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def normalize_dtype(dtype: str) -> str:
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; choose one of bf16, fp32, fp16")
    return name


def _dtype_name_of(t: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[t]


def _unwrap(chunk):
    """DDP / Float16Module wrappers -> the GPTModel."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    while not isinstance(chunk, LanguageModule) and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state_dict(chunks: list) -> dict:
    # The outer keys only name this rank's chunks; ShardedTensor keys are global, so a checkpoint
    # saved with one chunk loads into two (VPP) and back.
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


# hf-to-mcore stores tensors above this size as several row chunks. torch_dist serialises (and
# reads back) each stored chunk as a whole in memory, so one 1.2 GB embedding would otherwise cost
# a 1.2 GB temporary on save and again on load. Chunks are an on-disk detail: any layout loads them.
SAVE_CHUNK_BYTES = 128 * 2**20


def _chunk_rows(rows: int, nbytes: int, max_bytes: int) -> int:
    """Number of equal row chunks (a divisor of rows) so that each is at most max_bytes."""
    if nbytes <= max_bytes or rows < 2:
        return 1
    return next((k for k in range(2, rows + 1) if rows % k == 0 and nbytes // k <= max_bytes), rows)


def _built(sharded: dict) -> dict:
    """Turn ShardedTensorFactories (the gated fc1's [gate; up] split) into their ShardedTensors.

    Saving lets torch_dist clone every CPU view it is handed (the halves of fc1 are views: a
    Qwen3-8B would need 7 GB more), and loading through the factory concatenates the halves into
    a new tensor per layer. Built ahead, fc1 halves are stored from tensors that own their memory
    and loaded straight into the parameter's halves."""
    from megatron.core.dist_checkpointing.mapping import apply_factories

    apply_factories(sharded)
    return sharded


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


def _list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _prepare_out(out_dir: str, overwrite: bool, inputs: Iterable[str] = ()) -> str:
    """Check the destination and create a sibling temporary folder `<out>.tmp-<pid>-<hex>`."""
    out_dir = os.path.abspath(out_dir)
    check_output_not_input(out_dir, inputs)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"output {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CheckpointError(f"output {out_dir} already exists and is not empty (pass --force / overwrite=True)")
    return make_temp_dir(out_dir)


def check_output_not_input(out_dir: str, inputs: Iterable[str]) -> None:
    """Refuse an output that is, contains or lies inside an input: replacing it would delete the input."""
    out = os.path.realpath(out_dir)
    for src in inputs:
        if not src:
            continue
        real = os.path.realpath(src)
        if out == real or real.startswith(out.rstrip(os.sep) + os.sep) or out.startswith(real.rstrip(os.sep) + os.sep):
            how = "is" if out == real else ("contains" if real.startswith(out + os.sep) else "lies inside")
            raise CheckpointError(f"output {out_dir} {how} the input {src}; choose an output folder outside it")


def _publish(tmp: str, out_dir: str) -> None:
    """Rename the finished temporary folder into place (replacing an older one, if any)."""
    publish_dir(tmp, out_dir)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _hf_config_dict(cfg: Qwen3Config, dtype: str) -> dict:
    d = cfg.to_hf_dict()
    d["torch_dtype"] = _HF_DTYPE_NAMES[dtype]
    return d


def _copy_side_files(src_dir: Optional[str], dst_dir: str, cfg: Qwen3Config) -> list[str]:
    """Tokenizer files and generation_config.json from src_dir; a default generation config if absent."""
    copied = []
    if src_dir and os.path.isdir(src_dir):
        for name in SIDE_FILES:
            src = os.path.join(src_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(dst_dir, name))
                copied.append(name)
    if "generation_config.json" not in copied:
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        _write_json(os.path.join(dst_dir, "generation_config.json"), {k: v for k, v in gen.items() if v is not None})
    return copied


def summary_line(direction: str, summary: dict) -> str:
    return (f"{direction}: {summary['tensors']} tensors, {_fmt_bytes(summary['bytes'])} in {summary['seconds']:.1f} s "
            f"-> {summary['out']}")


# ---------------------------------------------------------------------------------------------
# the world the converters run in
# ---------------------------------------------------------------------------------------------
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


def _in_multi_rank_world() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _ensure_single_process_world() -> None:
    """torch.distributed + Megatron parallel state for one process at TP1PP1."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_spot.config.schema import ParallelConfig
    from megatron_spot.platform import initialize

    if (dist.is_initialized() and ps.model_parallel_is_initialized()
            and ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1):
        return
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # a world of one of our own: stale launcher variables (e.g. inherited from a parent that ran
        # one) would point at a port that is already taken
        for k in _LAUNCHER_ENV:
            os.environ.pop(k, None)
    initialize(ParallelConfig(), seed=0)


def _run_in_child(kind: str, kwargs: dict) -> dict:
    """Run a conversion in a fresh single-process python (used from inside a multi-rank world)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:  # private, removed on exit
        cmd = [sys.executable, "-m", "megatron_spot.checkpoint.hf_convert", kind, json.dumps(kwargs), result.name]
        proc = subprocess.run(cmd, env=env)
        text = open(result.name).read()
    out = json.loads(text) if text.strip() else None
    if proc.returncode != 0 or not out or "error" in out:
        msg = (out or {}).get("error") or f"conversion subprocess failed with exit code {proc.returncode}"
        raise CheckpointError(msg)
    return out["summary"]


def _build_tp1_model(cfg: Qwen3Config, dtype: str) -> list:
    from megatron_spot.config.schema import ParallelConfig, PrecisionConfig
    from megatron_spot.models.qwen3.provider import build_model_chunks, build_transformer_config

    tc = build_transformer_config(cfg, ParallelConfig(), PrecisionConfig(dtype=dtype))
    tc.perform_initialization = False  # every weight is overwritten: skip the random init
    return build_model_chunks(cfg, tc)


def _params_by_name(chunks: list) -> dict[str, torch.nn.Parameter]:
    from megatron_spot.models.qwen3.hf_mapping import iter_local_parameters

    return {name: p for name, _local, p in iter_local_parameters([_unwrap(c) for c in chunks])}


# ---------------------------------------------------------------------------------------------
# HF -> Megatron-Core
# ---------------------------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> Qwen3Config:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such folder")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    return Qwen3Config.from_hf_dict(read_json(path, CheckpointError), source=path)


def check_hf_tensors(src: SafetensorsCheckpoint, cfg: Qwen3Config) -> list[str]:
    """Raise on missing / unexpected / wrongly shaped tensors; return the names to ignore."""
    expected = hf_shapes(cfg)
    present = set(src.names())
    ignored = {n for n in present if n.endswith(_IGNORABLE_SUFFIXES)}
    if cfg.tie_word_embeddings and "lm_head.weight" in present:
        ignored.add("lm_head.weight")  # tied: some writers store the shared matrix twice
    missing = set(expected) - present
    unexpected = present - set(expected) - ignored
    if missing:
        raise CheckpointError(f"{src.folder}: missing tensor(s) {_list(missing)} ({len(missing)} of {len(expected)})")
    if unexpected:
        raise CheckpointError(
            f"{src.folder}: unexpected tensor(s) {_list(unexpected)} - not part of a Qwen3 model with this "
            "config.json (attention biases? a different architecture?)"
        )
    bad = [f"{n} has shape {list(src.shape(n))}, config.json implies {list(s)}"
           for n, s in expected.items() if tuple(src.shape(n)) != tuple(s)]
    if bad:
        raise CheckpointError(f"{src.folder}: shape mismatch: " + "; ".join(bad[:5]) +
                              (f" ... and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return sorted(ignored)


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
def _fill_from_hf(param: torch.Tensor, entry, src: SafetensorsCheckpoint, cfg: Qwen3Config) -> None:
    if entry.kind in ("vocab", "copy") and src.tensors[entry.hf[0]].nbytes > 2 * 64 * 2**20:
        _copy_rows(param, src, entry.hf[0], 0)  # large: in row blocks, no full-size temporary
        return
    value = to_mcore(entry, [src.read(n) for n in entry.hf], cfg)
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
        return _dtype_name_of(top), "the safetensors weights"
    cfg = read_json(hf_config_path, CheckpointError)
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    return normalize_dtype(name or "bf16"), ("config.json" if name else "the default")


def convert_hf_to_mcore(hf_dir: str, out_dir: str, dtype: Optional[str] = None, progress: bool = True,
                        overwrite: bool = False) -> dict:
    """Convert a HF Qwen3 checkpoint folder into a Megatron-Core dist checkpoint. Returns a summary.

    dtype: bf16 | fp32 | fp16; None (the default) keeps the source's precision, so an fp32
    checkpoint round-trips bit-exact. A dtype that changes the precision is reported.
    Summary: tensors (Megatron tensors written), hf_tensors, bytes, seconds, out, dtype, source_dtype.
    """
    dtype = normalize_dtype(dtype) if dtype else None
    check_output_not_input(out_dir, [hf_dir])
    if _in_multi_rank_world():
        return _run_in_child("hf-to-mcore", dict(hf_dir=hf_dir, out_dir=out_dir, dtype=dtype, progress=progress,
                                                 overwrite=overwrite))
    t0 = time.perf_counter()
    cfg = read_hf_config(hf_dir)
    with SafetensorsCheckpoint(hf_dir) as src:
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
        _ensure_single_process_world()
        chunks = _build_tp1_model(cfg, dtype)
        params = _params_by_name(chunks)
        entries = mapping_table(cfg)
        filled, nbytes, row_chunks = set(), 0, {}
        with _progress(len(entries), "hf->mcore", progress) as bar:
            for entry in entries:
                if entry.mcore not in params:
                    raise CheckpointError(f"internal: the Megatron model has no parameter {entry.mcore}")
                param = params[entry.mcore]
                size = param.numel() * param.element_size()
                k = _chunk_rows(param.shape[0], size, SAVE_CHUNK_BYTES) if entry.kind in ("vocab", "copy") else 1
                if entry.kind == "fc1":  # gate and up in memory of their own (see _built); fc1 stays untouched
                    gate, up = (src.read(n).to(param.dtype) for n in entry.hf)
                    if gate.shape[0] + up.shape[0] != param.shape[0] or gate.shape[1:] != param.shape[1:]:
                        raise CheckpointError(f"{entry.mcore}: gate/up shapes do not fill {list(param.shape)}")
                    row_chunks[param.data_ptr()] = [gate.clone() if gate.untyped_storage().nbytes() != gate.nbytes else gate]
                    row_chunks[param[gate.shape[0]:].data_ptr()] = [up.clone() if up.untyped_storage().nbytes() != up.nbytes else up]
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


def _metadata(cfg: Qwen3Config, dtype: str, source: Optional[str], layout: dict) -> dict:
    import megatron.core

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": "torch_dist",
        "dtype": dtype,
        "padded_vocab_size": cfg.padded_vocab_size,
        "hf_config": _hf_config_dict(cfg, dtype),
        "saved_layout": layout,
        "source": source,
        "megatron_core_version": getattr(megatron.core, "__version__", None),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_side_and_metadata(tmp: str, cfg: Qwen3Config, dtype: str, side_files_from: Optional[str],
                             source: Optional[str], layout: dict) -> None:
    _copy_side_files(side_files_from, tmp, cfg)
    _write_json(os.path.join(tmp, "config.json"), _hf_config_dict(cfg, dtype))
    _write_json(os.path.join(tmp, METADATA_NAME), _metadata(cfg, dtype, source, layout))  # last: completes it


def _save_chunks_single(chunks, out_dir, cfg, dtype, side_files_from, overwrite, source, row_chunks) -> None:
    from megatron.core import dist_checkpointing

    tmp = _prepare_out(out_dir, overwrite, inputs=[side_files_from, source])
    try:
        dist_checkpointing.save(_substitute_chunks(_sharded_state_dict(chunks), row_chunks), tmp)
        _write_side_and_metadata(tmp, cfg, dtype, side_files_from, source, {"tp": 1, "pp": 1, "vpp": None})
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Megatron-Core checkpoints: metadata, collective save and load
# ---------------------------------------------------------------------------------------------
def read_checkpoint_metadata(ckpt_dir: str) -> dict:
    """Our metadata of a model checkpoint folder (dtype, hf_config, saved_layout, ...)."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint folder")
    path = os.path.join(ckpt_dir, METADATA_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(ckpt_dir, ".metadata")):
            raise CheckpointError(f"{ckpt_dir}: a dist checkpoint without {METADATA_NAME} - not written by "
                                  "megatron_spot (or its save did not finish)")
        if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
            raise CheckpointError(f"{ckpt_dir}: looks like a Hugging Face checkpoint; convert it first with "
                                  "`tools/convert_checkpoint.py hf-to-mcore`")
        raise CheckpointError(f"{ckpt_dir}: not a megatron_spot model checkpoint (no {METADATA_NAME})")
    meta = read_json(path, CheckpointError)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']} is newer than this code reads "
                              f"({FORMAT_VERSION}); update megatron_spot")
    return meta


def checkpoint_qwen3_config(ckpt_dir: str) -> Qwen3Config:
    meta = read_checkpoint_metadata(ckpt_dir)
    return Qwen3Config.from_hf_dict(meta["hf_config"], source=os.path.join(ckpt_dir, METADATA_NAME))


def check_layout(cfg: Qwen3Config, tp: int, pp: int = 1, vpp: Optional[int] = None, where: str = "") -> None:
    """Raise CheckpointError if the checkpoint's model cannot be split at TP/PP/VPP."""
    where = f"{where}: " if where else ""
    if cfg.num_query_groups % tp:
        raise CheckpointError(
            f"{where}tensor parallel size {tp} does not divide the {cfg.num_query_groups} query groups (KV heads); "
            f"use a TP that divides {cfg.num_query_groups}")
    if cfg.num_attention_heads % tp:
        raise CheckpointError(f"{where}tensor parallel size {tp} does not divide {cfg.num_attention_heads} attention heads")
    if cfg.padded_vocab_size % tp:
        raise CheckpointError(f"{where}tensor parallel size {tp} does not divide the padded vocabulary {cfg.padded_vocab_size}")
    stages = pp * (vpp or 1)
    if cfg.num_hidden_layers % stages:
        raise CheckpointError(f"{where}{cfg.num_hidden_layers} layers do not split into PP x VPP = {stages} stages")


def _check_model_matches(chunk, cfg: Qwen3Config, ckpt_dir: str) -> None:
    tc = chunk.config
    pairs = [("num_hidden_layers", cfg.num_hidden_layers, tc.num_layers),
             ("hidden_size", cfg.hidden_size, tc.hidden_size),
             ("intermediate_size", cfg.intermediate_size, tc.ffn_hidden_size),
             ("num_attention_heads", cfg.num_attention_heads, tc.num_attention_heads),
             ("num_key_value_heads", cfg.num_query_groups, tc.num_query_groups or tc.num_attention_heads),
             ("head_dim", cfg.head_dim, tc.kv_channels),
             ("padded vocab", cfg.padded_vocab_size, chunk.vocab_size),
             ("tie_word_embeddings", cfg.tie_word_embeddings, chunk.share_embeddings_and_output_weights)]
    bad = [f"{name}: checkpoint {a}, model {b}" for name, a, b in pairs if a != b]
    if bad:
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not match the model ({'; '.join(bad)})")


def _broadcast_obj(obj, src: int = 0):
    import torch.distributed as dist

    box = [obj]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def _model_dtype(chunks) -> str:
    """The dtype of the linear weights (norms may stay fp32 with the local spec)."""
    for name, param in _params_by_name(chunks).items():
        if name.endswith("linear_fc2.weight"):
            return _dtype_name_of(param.dtype)
    return _dtype_name_of(next(_unwrap(chunks[0]).parameters()).dtype)


def save_model_checkpoint(chunks, out_dir: str, qwen3_cfg: Qwen3Config, hf_side_files_from: Optional[str] = None,
                          overwrite: bool = True) -> str:
    """Collective (every rank, any TP/PP/VPP): save this rank's model chunks into a model checkpoint.

    Same format as hf-to-mcore output; written under `<out_dir>.tmp-*` and renamed by rank 0 when
    every rank has finished. `hf_side_files_from`: a folder whose tokenizer files and
    generation_config.json are copied beside (a HF checkpoint or another model checkpoint).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    out_dir = os.path.abspath(out_dir)
    err, tmp = None, None
    if rank == 0:
        try:
            tmp = _prepare_out(out_dir, overwrite, inputs=[hf_side_files_from])
        except Exception as exc:  # every rank must hear about it, not hang in the save
            err = str(exc)
    err, tmp = _broadcast_obj((err, tmp))
    if err:
        raise CheckpointError(err)
    try:
        dist_checkpointing.save(_sharded_state_dict(chunks), tmp)
        dtype = _model_dtype(chunks)
        layout = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                  "vpp": ps.get_virtual_pipeline_model_parallel_world_size()}
        dtypes = [dtype]
        if dist.get_world_size() > 1:
            dtypes = [None] * dist.get_world_size()
            dist.all_gather_object(dtypes, dtype)
        dtype = next((d for d in dtypes if d is not None), dtype)  # every rank has a fc2 in practice
        err = None
        if rank == 0:
            try:
                _write_side_and_metadata(tmp, qwen3_cfg, dtype, hf_side_files_from, "save_model_checkpoint", layout)
                _publish(tmp, out_dir)
            except Exception as exc:
                err = f"saving {out_dir}: {exc}"
        err = _broadcast_obj(err)
        if err:
            raise CheckpointError(err)
    except BaseException:
        if rank == 0 and tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_model_checkpoint(chunks, ckpt_dir: str) -> dict:
    """Collective (every rank, any TP/PP/VPP): load a model checkpoint into this rank's chunks.

    Raises CheckpointError when the layout does not fit the model (e.g. TP not dividing the query
    groups), the architecture differs, or tensors are missing / unexpected / wrongly shaped.
    Returns the checkpoint's metadata.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    meta = read_checkpoint_metadata(ckpt_dir)
    cfg = Qwen3Config.from_hf_dict(meta["hf_config"], source=os.path.join(ckpt_dir, METADATA_NAME))
    check_layout(cfg, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_virtual_pipeline_model_parallel_world_size(), where=ckpt_dir)
    models = [_unwrap(c) for c in chunks]
    for m in models:
        _check_model_matches(m, cfg, ckpt_dir)
    # factories built ahead: every ShardedTensor's data is (a view of) a parameter, which torch_dist
    # fills in place; no per-layer concatenation, no second copy of the model
    verify_dist_checkpoint(ckpt_dir)  # restricted metadata read + data file sizes: a one-line error
    sharded = _built(_sharded_state_dict(models))
    try:
        loaded, missing, unexpected = dist_checkpointing.load(sharded, ckpt_dir, strict=StrictHandling.RETURN_ALL)
    except CheckpointingException as exc:
        raise CheckpointError(f"{ckpt_dir}: {exc}") from None
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if not is_load_failure(exc):
            raise  # damage the size check cannot see (garbage bytes inside a shard)
        raise CheckpointError(f"{ckpt_dir}: cannot read the checkpoint ({load_failure_reason(exc)})") from None
    missing = {k for k in missing if not k.endswith("_extra_state")}
    unexpected = {k for k in unexpected if not k.endswith("_extra_state")}
    if unexpected:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint lacks tensor(s) the model needs: {_list(unexpected)}")
    if missing:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint has tensor(s) the model does not: {_list(missing)}")
    copied = _place_loaded(sharded, loaded)
    for i, m in enumerate(models):  # non-tensor state (Transformer Engine's _extra_state)
        extra = {k: v for k, v in loaded[f"model{i}"].items() if k.endswith("_extra_state")}
        if extra:
            m.load_state_dict(extra, strict=False)
    log.debug("loaded %s (%d tensors copied, the rest in place)", ckpt_dir, copied)
    return meta


@torch.no_grad()
def _place_loaded(requested, loaded) -> int:
    """Make sure every requested ShardedTensor's destination holds what was loaded for it."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(requested, ShardedTensor):
        if not isinstance(loaded, torch.Tensor):
            raise CheckpointError(f"tensor {requested.key}: nothing was loaded")
        dest = requested.data
        if loaded.numel() != dest.numel():
            raise CheckpointError(f"tensor {requested.key}: loaded shape {list(loaded.shape)} != {list(dest.shape)}")
        if loaded.data_ptr() == dest.data_ptr() and loaded.dtype == dest.dtype:
            return 0  # loaded in place (possibly seen through a view with the stacked-layer axis)
        dest.copy_(loaded.view(dest.shape))
        return 1
    if isinstance(requested, dict):
        return sum(_place_loaded(v, loaded[k]) for k, v in requested.items() if k in loaded)
    if isinstance(requested, (list, tuple)):
        return sum(_place_loaded(a, b) for a, b in zip(requested, loaded))
    return 0


# ---------------------------------------------------------------------------------------------
# Megatron-Core -> HF
# ---------------------------------------------------------------------------------------------
def convert_mcore_to_hf(ckpt_dir: str, out_dir: str, dtype: Optional[str] = None, progress: bool = True,
                        max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> dict:
    """Export a model checkpoint as a HF Qwen3 folder (safetensors + index, config, tokenizer files).

    dtype: bf16 | fp32 | fp16; None keeps the checkpoint's dtype. Returns a summary (tensors,
    bytes, seconds, out, dtype, files).
    """
    if _in_multi_rank_world():
        return _run_in_child("mcore-to-hf", dict(ckpt_dir=ckpt_dir, out_dir=out_dir, dtype=dtype, progress=progress,
                                                 max_shard_bytes=max_shard_bytes, overwrite=overwrite))
    t0 = time.perf_counter()
    check_output_not_input(out_dir, [ckpt_dir])
    meta = read_checkpoint_metadata(ckpt_dir)
    cfg = Qwen3Config.from_hf_dict(meta["hf_config"], source=os.path.join(ckpt_dir, METADATA_NAME))
    ckpt_dtype = normalize_dtype(meta.get("dtype", "bf16"))
    dtype = normalize_dtype(dtype) if dtype else ckpt_dtype
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes} must be positive")
    tdtype = DTYPES[dtype]
    _ensure_single_process_world()
    chunks = _build_tp1_model(cfg, ckpt_dtype)
    if progress:
        print(f"mcore-to-hf: loading {ckpt_dir} ...", flush=True)
    load_model_checkpoint(chunks, ckpt_dir)
    params = _params_by_name(chunks)
    entries = mapping_table(cfg)
    shapes = hf_shapes(cfg)
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
            cache["entry"], cache["tensors"] = entry, dict(zip(entry.hf, to_hf(entry, params[entry.mcore].detach(), cfg)))
        tensor = cache["tensors"][name]
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise CheckpointError(f"internal: {name} has shape {list(tensor.shape)}, expected {list(shapes[name])}")
        return row_blocks(tensor, tdtype)

    tmp = _prepare_out(out_dir, overwrite, inputs=[ckpt_dir])
    total = 0
    try:
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
        _write_json(os.path.join(tmp, "config.json"), _hf_config_dict(cfg, dtype))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del chunks, params
    gc.collect()
    summary = dict(tensors=len(items), bytes=total, seconds=round(time.perf_counter() - t0, 3),
                   out=os.path.abspath(out_dir), dtype=dtype, files=names)
    if progress:
        print(summary_line("mcore-to-hf", summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# child-process entry (used by _run_in_child)
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
