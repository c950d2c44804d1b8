"""Atomic save/load of the whole training state, resumable at the same or another TP/PP layout.

<run>/checkpoints/step_0000010/
    model/                       the policy, in the conversion tool's format (model_checkpoint.save_model_checkpoint)
    optimizer/                   dist_checkpointing of the optimizer state (resharded on load)
    rng/rank_00003.safetensors   each rank's RNG states: generator tensors, with the Python and NumPy
                                 states as JSON in the header (restored when the layout is unchanged)
    trainer_state.json           step, epoch, reader position, loss running statistics, scheduler, config
<run>/checkpoints/latest  the name of the newest complete checkpoint

Nothing in a checkpoint is a pickle that can run code: RNG and trainer state are safetensors/JSON,
and torch_dist's own pickles are read through checkpoint.safe_load's allow-lists.

Everything is written under `step_N.tmp-<pid>-<hex>` (megatron_spot.utils.atomic) and renamed by rank
0 after every rank finished, then `latest` is updated (write + rename), so a crash mid-save leaves
the previous checkpoint as latest, and the next save removes the dead run's temp.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_spot.checkpoint.errors import CheckpointError, CheckpointSaveError
from megatron_spot.checkpoint.safe_load import is_load_failure, load_failure_reason, verify_dist_checkpoint
from megatron_spot.config.loader import ConfigError
from megatron_spot.platform.device import accelerator_rng_state, set_accelerator_rng_state
from megatron_spot.platform.distributed import patient_group
from megatron_spot.utils.atomic import (make_temp_dir, publish_dir, write_bytes_atomic, write_json_atomic,
                                        write_text_atomic)


log = logging.getLogger(__name__)

# Optimizer state stored per parameter in its global (model) shape, so it reshards to any TP/PP/DP.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_sharded_state_dict(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model_chunks)}


_RNG_FORMAT = "megatron_spot.rng.v1"


def _save_rng_state(path: str) -> None:
    """This rank's RNG states as safetensors: generator byte tensors, Python/NumPy states as JSON."""
    from megatron.core import tensor_parallel
    from safetensors.torch import save

    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    cuda = accelerator_rng_state()
    if cuda is not None:
        tensors["cuda"] = cuda.cpu()
    for name, st in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker/{name}"] = st.cpu()
    meta = {"format": _RNG_FORMAT,
            "python": json.dumps([version, list(mt_state), gauss]),
            "numpy": json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(cached)])}
    write_bytes_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def _read_rng_file(path: str):
    """(tensors, Python state, NumPy state) of an rng/*.safetensors file; CheckpointError if damaged."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != _RNG_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {_RNG_FORMAT}")
        version, mt_state, gauss = json.loads(meta["python"])
        kind, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
        python_state = (int(version), tuple(int(x) for x in mt_state), gauss)
        numpy_state = (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    except Exception as exc:  # not safetensors, truncated, or fields missing / of the wrong type
        raise CheckpointError(f"{path}: unreadable RNG state ({type(exc).__name__}: {exc}); "
                              "resume from another checkpoint") from None
    return tensors, python_state, numpy_state


def _load_rng_state(path: str) -> None:
    from megatron.core import tensor_parallel

    tensors, python_state, numpy_state = _read_rng_file(path)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(tensors["torch"])
    set_accelerator_rng_state(tensors.get("cuda"))
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k[len("tracker/"):]: v for k, v in tensors.items() if k.startswith("tracker/")})


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_name(root: str) -> Optional[str]:
    """The folder name `<root>/latest` holds (None: no such file); CheckpointError if it is garbage."""
    latest = os.path.join(root, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest, encoding="utf-8", errors="replace") as f:
        name = f.read().strip()
    if not name or os.sep in name or name.startswith("."):  # garbage: never a path outside the folder
        raise CheckpointError(f"{latest}: corrupt (names {name[:40]!r}, not a step_N folder)")
    return name


def latest_checkpoint(path: str) -> Optional[str]:
    """A run folder, a checkpoints folder or one checkpoint -> the checkpoint folder to load."""
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        return path
    root = path if os.path.basename(path.rstrip("/")) == "checkpoints" else checkpoint_root(path)
    name = latest_name(root)
    if name is None:
        return None
    ckpt = os.path.join(root, name)
    return ckpt if os.path.exists(os.path.join(ckpt, "trainer_state.json")) else None


def _find_os_error(exc: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write: `exc` itself, its cause/context, or one a rank reported inside
    torch's CheckpointException (its `failures`: rank -> exception); None if there is none."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
    return None


def _probe_storage(folder: str, size: int = 1 << 20) -> Optional[str]:
    """Write and fsync `size` bytes in `folder`: 'folder: No space left on device' if that fails, else None.
    Megatron's checkpoint writer reports a full disk as a RuntimeError of its worker (the OSError is lost
    there, e.g. "unexpected pos 704 vs 598"), so a failed save asks the folder itself."""
    path = os.path.join(folder, f".write-probe-{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"{folder}: {exc.strerror}"
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
    return None


def _describe_write_error(exc: BaseException, folder: Optional[str]) -> str:
    """One line for a failed write: 'PATH: No space left on device' from the OSError behind it, else from
    a probe write into `folder`, else the exception's type and first line."""
    e = _find_os_error(exc)
    if e is not None:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    probed = _probe_storage(folder) if folder and os.path.isdir(folder) else None
    return probed or f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _agree_on_failure(local_error: Optional[str]) -> Optional[str]:
    """Collective: the first rank's error (by rank), or None when every rank succeeded. On the patient
    group: ranks that finished writing wait for the slowest (and for rank 0's fsync + rename)."""
    if dist.get_world_size() == 1:
        return local_error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local_error, group=patient_group())
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


def save_training_checkpoint(run_dir: str, step: int, engine, trainer_state: dict[str, Any],
                             tokenizer_dir: Optional[str] = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint folder.

    A write that fails on any rank (no space left, an unwritable folder) fails the save on every rank
    alike: the temp folder is removed, `latest` still names the previous checkpoint, and each rank
    raises CheckpointSaveError with one line naming the failed path and that checkpoint."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:07d}")
    box = [None, None]  # (temp folder, rank 0's error)
    if dist.get_rank() == 0:
        try:
            box[0] = make_temp_dir(final)  # also removes the temps of earlier killed runs
            os.mkdir(os.path.join(box[0], "optimizer"))
            os.mkdir(os.path.join(box[0], "rng"))
        except OSError as exc:
            box[1] = _describe_write_error(exc, None)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    tmp, error = box
    if error is None:
        try:
            _write_checkpoint(tmp, step, engine, trainer_state, tokenizer_dir)
        except BaseException as exc:  # torch's CheckpointException (each rank's failure inside) is one
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            # whatever the cause, nothing of this save may be published; the traceback is in the debug log
            log.debug("checkpoint write failed", exc_info=True)
            error = _describe_write_error(exc, tmp)
        error = _agree_on_failure(error)
    if error is None:
        if dist.get_rank() == 0:
            try:
                publish_dir(tmp, final)
                write_text_atomic(os.path.join(root, "latest"), os.path.basename(final))
            except OSError as exc:
                error = _describe_write_error(exc, None)
                if latest_name(root) != os.path.basename(final):  # published but not `latest`: take it back
                    shutil.rmtree(final, ignore_errors=True)
        error = _agree_on_failure(error)
    if error is not None:
        if dist.get_rank() == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root) if os.path.isdir(root) else None
        raise CheckpointSaveError(f"checkpoint {final} not saved ({error}); the last good checkpoint is still "
                                  f"{previous or 'none'}; free space or fix the folder, then resume with run.load=auto")
    return final


def _write_checkpoint(tmp: str, step: int, engine, trainer_state: dict[str, Any], tokenizer_dir: Optional[str]) -> None:
    """Every rank's share of one checkpoint, into the temp folder `tmp` (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_spot.checkpoint.model_checkpoint import save_model_checkpoint

    rank = dist.get_rank()
    save_model_checkpoint(engine.model, os.path.join(tmp, "model"), engine.model_cfg, hf_side_files_from=tokenizer_dir)
    model_ssd = _model_sharded_state_dict(engine.model)
    optim_ssd = engine.optimizer.sharded_state_dict(model_ssd, metadata=_OPTIM_METADATA)
    dist_checkpointing.save({"optimizer": optim_ssd}, os.path.join(tmp, "optimizer"))
    _save_rng_state(os.path.join(tmp, "rng", f"rank_{rank:05d}.safetensors"))
    # the loss's running statistics live on the last pipeline stage: hand them to rank 0
    loss_state = [engine.loss_fn.state_dict() if engine.pp_last else None]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(loss_state, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    if rank == 0:
        state = dict(trainer_state)
        state.update(
            step=step, loss_state=_to_jsonable(loss_state[0]), scheduler=engine.scheduler.state_dict(),
            layout={"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                    "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()},
        )
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), state)


def _to_jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


def read_trainer_state(ckpt: str) -> dict:
    path = os.path.join(ckpt, "trainer_state.json")
    if not os.path.exists(path):
        raise ConfigError(f"{ckpt} is not a training checkpoint (no trainer_state.json)")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt trainer state (not JSON: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt trainer state (a JSON {type(state).__name__}, not an object)")
    bad = [k for k, t in (("step", int), ("sampler", dict), ("scheduler", dict)) if not isinstance(state.get(k), t)]
    if bad:
        raise CheckpointError(f"{path}: corrupt trainer state (missing or wrong type: {', '.join(bad)})")
    return state


def verify_training_checkpoint(ckpt: str) -> dict:
    """Everything resume reads, checked before any process group starts: trainer_state.json, the
    model and optimizer torch_dist folders (metadata + data file sizes). Returns the trainer state."""
    from megatron_spot.checkpoint.model_checkpoint import read_checkpoint_metadata

    state = read_trainer_state(ckpt)
    read_checkpoint_metadata(os.path.join(ckpt, "model"))
    verify_dist_checkpoint(os.path.join(ckpt, "model"))
    verify_dist_checkpoint(os.path.join(ckpt, "optimizer"))
    rng_dir = os.path.join(ckpt, "rng")
    for name in sorted(os.listdir(rng_dir)) if os.path.isdir(rng_dir) else []:
        if name.endswith(".safetensors"):  # read on one rank after the collective loads: check all now
            _read_rng_file(os.path.join(rng_dir, name))
    return state


def _materialize_adam_state(optimizer) -> None:
    """Create AdamW's lazily-initialised state (zeros) so the optimizer's sharded state dict has the
    tensors that loading fills in. Megatron's own alternative steps the optimizer on zero gradients,
    which applies weight decay to the (fp32, shared) parameters; this does not touch them."""
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    for inner in inners:
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is None:
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                if p.numel() and not torch_opt.state[p]:
                    torch_opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                          "exp_avg_sq": torch.zeros_like(p)}


def _load_optimizer_state(optimizer, state: dict) -> None:
    """optimizer.load_state_dict, working around Megatron-Core 0.19's torch-AdamW path (no apex/TE):
    torch AdamW keeps a per-parameter `step` tensor that Megatron restores from the param groups, yet
    its fully-reshardable loader then asks each parameter's saved tensors for `step` (KeyError). A
    non-tensor placeholder makes that loop skip it; the param-group value is what gets used."""
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    originals = []
    for inner in inners:
        original = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def patched(model_param, tensors, _original=original):
            return _original(model_param, {"step": None, **tensors})

        inner._set_main_param_and_optimizer_states = patched
        originals.append(inner)
    try:
        optimizer.load_state_dict(state)
    finally:
        for inner in originals:
            del inner._set_main_param_and_optimizer_states  # back to the class method
    # ...and it hands every parameter the SAME `step` tensor, which torch AdamW then increments once
    # per parameter per step (wrong bias correction). Give each parameter its own counter.
    for inner in inners:
        torch_opt = getattr(inner, "optimizer", None)
        for st in (torch_opt.state.values() if torch_opt is not None else ()):
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def load_training_state(ckpt: str, engine) -> dict:
    """Collective: restore optimizer, scheduler, loss statistics and (same layout) RNG states.

    Model weights are loaded earlier (Engine's load_weights hook, before the optimizer is built).
    Returns the trainer state dict (step, epoch, reader position, ...).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    state = read_trainer_state(ckpt)
    _materialize_adam_state(engine.optimizer)
    model_ssd = _model_sharded_state_dict(engine.model)
    optim_ssd = engine.optimizer.sharded_state_dict(model_ssd, is_loading=True, metadata=_OPTIM_METADATA)
    optim_dir = os.path.join(ckpt, "optimizer")
    verify_dist_checkpoint(optim_dir)
    try:
        loaded = dist_checkpointing.load({"optimizer": optim_ssd}, optim_dir)
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if not is_load_failure(exc):
            raise
        raise CheckpointError(f"{optim_dir}: cannot read the optimizer state ({load_failure_reason(exc)})") from None
    _load_optimizer_state(engine.optimizer, loaded["optimizer"])
    engine.scheduler.load_state_dict(state["scheduler"])
    if engine.loss_fn is not None and state.get("loss_state") is not None:
        engine.loss_fn.load_state_dict(state["loss_state"])
    same_layout = state.get("layout") == {
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()}
    rng_path = os.path.join(ckpt, "rng", f"rank_{dist.get_rank():05d}.safetensors")
    if same_layout and os.path.exists(rng_path):  # never a pickle: older rng/*.pt files are ignored
        _load_rng_state(rng_path)
    return state
