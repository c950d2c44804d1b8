"""Model checkpoints (Megatron-Core dist_checkpointing, torch_dist backend): collective save and load
at any TP/PP/VPP, our metadata, and the checks that make a bad folder a one-line CheckpointError.

A model checkpoint folder (written by :func:`save_model_checkpoint` and by the HF conversion driver,
checkpoint/hf_convert.py):

    <ckpt>/
      .metadata, __*_*.distcp, metadata.json   Megatron-Core dist_checkpointing, torch_dist backend:
                                               the model's sharded_state_dict with GLOBAL shapes
                                               (vocab padded to a multiple of 128), so it loads at
                                               any TP/PP/VPP/DP and with the local or TE layer spec
      spot_checkpoint.json                     ours: format, dtype, the model's HF config, the layout
                                               it was saved at; written last (marks it complete)
      config.json, generation_config.json,     HF side files: AutoTokenizer.from_pretrained(<ckpt>)
      tokenizer.json, tokenizer_config.json... works, and mcore-to-hf copies them to the export

Everything model-specific (config parsing, layout fit, architecture comparison, config.json) comes
from the model family registry (models/: config parsing, the state-dict adapter over mapping objects). Every output is
built under ``<out>.tmp-*`` and renamed into place when complete.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch

from megatron_spot.checkpoint.errors import CheckpointError
from megatron_spot.checkpoint.safe_load import is_load_failure, load_failure_reason, verify_dist_checkpoint
from megatron_spot.config.dtypes import dtype_name
from megatron_spot.config.loader import read_json
from megatron_spot.models import config_from_hf_dict
from megatron_spot.models import state_dict_adapter as adapter
from megatron_spot.utils.atomic import make_temp_dir, publish_dir

if TYPE_CHECKING:  # annotations only: the model family's config type
    from megatron_spot.models import GPTConfig

log = logging.getLogger(__name__)

METADATA_NAME = "spot_checkpoint.json"
# One format for every family (the family is the stored config.json's model_type). Checkpoints written
# before the registry carry the Qwen3-only name and load unchanged.
FORMAT = "megatron_spot.dist_checkpoint"
READABLE_FORMATS = (FORMAT, "megatron_spot.qwen3.dist_checkpoint")
FORMAT_VERSION = 1
# files copied from beside a HF checkpoint into ours, and from ours into an export
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "tokenizer.model")


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


def _built(sharded: dict) -> dict:
    """Turn ShardedTensorFactories (the gated fc1's [gate; up] split) into their ShardedTensors.

    Saving lets torch_dist clone every CPU view it is handed (the halves of fc1 are views: a
    Qwen3-8B would need 7 GB more), and loading through the factory concatenates the halves into
    a new tensor per layer. Built ahead, fc1 halves are stored from tensors that own their memory
    and loaded straight into the parameter's halves."""
    from megatron.core.dist_checkpointing.mapping import apply_factories

    apply_factories(sharded)
    return sharded


def _list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_dir(out_dir: str, overwrite: bool, inputs: Iterable[str] = ()) -> str:
    """Refuse a destination that is or holds an input, is a file, or is a non-empty folder without
    `overwrite`; returns its absolute path (what utils/atomic.atomic_dir then publishes into)."""
    out_dir = os.path.abspath(out_dir)
    check_output_not_input(out_dir, inputs)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"output {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CheckpointError(f"output {out_dir} already exists and is not empty (pass --force / overwrite=True)")
    return out_dir


def _prepare_out(out_dir: str, overwrite: bool, inputs: Iterable[str] = ()) -> str:
    """Check the destination and create a sibling temporary folder `<out>.tmp-<pid>-<hex>` (the multi-rank
    save: rank 0 makes it and broadcasts it, so it cannot be one `with atomic_dir` block)."""
    return make_temp_dir(check_output_dir(out_dir, overwrite, inputs))


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


def _copy_side_files(src_dir: Optional[str], dst_dir: str, cfg: GPTConfig) -> list[str]:
    """Tokenizer files and generation_config.json from src_dir; a default generation config if absent."""
    copied = []
    if src_dir and os.path.isdir(src_dir):
        for name in SIDE_FILES:
            src = os.path.join(src_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(dst_dir, name))
                copied.append(name)
    if "generation_config.json" not in copied:
        _write_json(os.path.join(dst_dir, "generation_config.json"), adapter.generation_defaults(cfg))
    return copied


def _params_by_name(chunks: list) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, _local, p in adapter.iter_local_parameters([_unwrap(c) for c in chunks])}


def _metadata(cfg: GPTConfig, dtype: str, source: Optional[str], layout: dict) -> dict:
    import megatron.core

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": "torch_dist",
        "dtype": dtype,
        "padded_vocab_size": cfg.padded_vocab_size,
        "hf_config": adapter.hf_config_dict(cfg, dtype),
        "saved_layout": layout,
        "source": source,
        "megatron_core_version": getattr(megatron.core, "__version__", None),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_side_and_metadata(tmp: str, cfg: GPTConfig, dtype: str, side_files_from: Optional[str],
                             source: Optional[str], layout: dict) -> None:
    _copy_side_files(side_files_from, tmp, cfg)
    _write_json(os.path.join(tmp, "config.json"), adapter.hf_config_dict(cfg, dtype))
    _write_json(os.path.join(tmp, METADATA_NAME), _metadata(cfg, dtype, source, layout))  # last: completes it


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
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']} is newer than this code reads "
                              f"({FORMAT_VERSION}); update megatron_spot")
    return meta


def checkpoint_model_config(ckpt_dir: str) -> GPTConfig:
    meta = read_checkpoint_metadata(ckpt_dir)
    return config_from_hf_dict(meta["hf_config"], source=os.path.join(ckpt_dir, METADATA_NAME))


def check_layout(cfg: GPTConfig, tp: int, pp: int = 1, vpp: Optional[int] = None, where: str = "", ep: int = 1,
                 etp: Optional[int] = None) -> None:
    """Raise CheckpointError if the checkpoint's model cannot be split at TP/PP/VPP/EP/ETP (the family's rules)."""
    problems = cfg.layout_problems(tp, pp, vpp, ep, etp)
    if problems:
        raise CheckpointError((f"{where}: " if where else "") + "; ".join(problems))


def _check_model_matches(chunk, cfg: GPTConfig, ckpt_dir: str) -> None:
    bad = adapter.model_mismatches(chunk, cfg)
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
        if name.endswith(adapter.DTYPE_DEFINING_SUFFIX):
            return dtype_name(param.dtype)
    return dtype_name(next(_unwrap(chunks[0]).parameters()).dtype)


def save_model_checkpoint(chunks, out_dir: str, model_cfg: GPTConfig, hf_side_files_from: Optional[str] = None,
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
                _write_side_and_metadata(tmp, model_cfg, dtype, hf_side_files_from, "save_model_checkpoint", layout)
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
    cfg = config_from_hf_dict(meta["hf_config"], source=os.path.join(ckpt_dir, METADATA_NAME))
    check_layout(cfg, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_virtual_pipeline_model_parallel_world_size(), where=ckpt_dir,
                 ep=ps.get_expert_model_parallel_world_size(), etp=ps.get_expert_tensor_parallel_world_size())
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


