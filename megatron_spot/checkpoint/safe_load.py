"""Checkpoints are data, not code: every pickle torch_dist reads goes through an allow-list.

A torch_dist checkpoint holds two kinds of pickles that torch unpickles with the full `pickle`
machinery (so a planted file could run any code on load):

- ``.metadata``: read by ``torch.distributed.checkpoint.FileSystemReader.read_metadata`` with
  ``pickle.load``. Megatron-Core's readers (plain and cached) subclass FileSystemReader, and every
  megatron_spot path that opens a checkpoint (mcore-to-hf, resume, scoring, export) goes through
  them. :func:`install` points that module's ``pickle`` at a restricted unpickler that resolves only
  the checkpoint-metadata classes (torch.distributed.checkpoint metadata/planner dataclasses and
  enums, torch.Size, torch dtypes, the layout decoder, OrderedDict, pathlib paths).
- non-tensor items (ShardedObjects such as optimizer param groups) in ``*.distcp``: read by
  ``DefaultLoadPlanner.load_bytes`` with ``torch.load(weights_only=False)``. :func:`install` makes
  that ``weights_only=True`` (tensors, containers and plain values only).

:func:`install` runs once when megatron_spot.checkpoint is imported; it is idempotent.
:func:`verify_dist_checkpoint` reads a folder's ``.metadata`` that way and checks that every data
file it references exists and is long enough, so a truncated shard or corrupt metadata is one
CheckpointError naming the file instead of a traceback from deep inside a collective load.
"""
from __future__ import annotations

import io
import os
import pickle
import types
from typing import Any

import torch

from megatron_spot.checkpoint.errors import CheckpointError

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # decodes a layout name ("torch.strided") to torch.layout
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id when torch's own dcp.save wrote the folder: a path value, inert
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class ForbiddenPickleGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _METADATA_MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # the metadata dataclasses and enums, never a function
                return obj
        raise ForbiddenPickleGlobal(f"{module}.{name} is not a checkpoint-metadata class")


def load_metadata(f) -> Any:
    """pickle.load for checkpoint metadata: only the allow-listed classes can be created."""
    return _MetadataUnpickler(f).load()


def loads_metadata(data: bytes) -> Any:
    return _MetadataUnpickler(io.BytesIO(data)).load()


class _RestrictedPickleModule(types.ModuleType):
    """Stands in for `pickle` inside torch's filesystem reader: restricted loads, normal dumps."""

    def __init__(self):
        super().__init__("megatron_spot_restricted_pickle")
        self.load = load_metadata
        self.loads = loads_metadata

    def __getattr__(self, name):
        return getattr(pickle, name)


def _load_bytes_weights_only(self, read_item, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with weights_only=True (same placement logic as torch's)."""
    from torch.distributed.checkpoint._traverse import set_element  # what torch's own load_bytes uses

    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


_installed = False


def install() -> None:
    """Route torch_dist's unpickling through the allow-lists above (once per process)."""
    global _installed
    if _installed:
        return
    import torch.distributed.checkpoint.filesystem as fs
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    fs.pickle = _RestrictedPickleModule()
    DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
    _installed = True


def _bad(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; the checkpoint is damaged (re-save or re-convert it)")


def verify_dist_checkpoint(folder: str):
    """Read `folder/.metadata` (restricted) and check every referenced data file's size.

    Returns torch's Metadata. Raises CheckpointError naming the first bad file.
    """
    install()
    path = os.path.join(folder, ".metadata")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no .metadata (not a torch_dist checkpoint, or its save did not finish)")
    try:
        with open(path, "rb") as f:
            meta = load_metadata(f)
    except ForbiddenPickleGlobal as exc:
        raise CheckpointError(f"{path}: refused to load: it references {exc} (a planted or foreign "
                              "pickle; checkpoint metadata never does)") from None
    except Exception as exc:  # truncated / garbage bytes: EOFError, UnpicklingError, ValueError, ...
        raise _bad(path, f"unreadable metadata ({type(exc).__name__}: {exc})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(meta, Metadata) or not isinstance(getattr(meta, "storage_data", None), dict):
        raise _bad(path, f"not torch_dist metadata (a {type(meta).__name__})")
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.sep in rel or rel.startswith("."):
            raise _bad(path, f"bad data file name {rel!r}")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        data = os.path.join(folder, rel)
        if not os.path.isfile(data):
            raise _bad(data, "missing data file")
        have = os.path.getsize(data)
        if have < size:
            raise _bad(data, f"truncated: {have} bytes, the metadata needs {size}")
    return meta


def load_failure_reason(exc: BaseException) -> str:
    """The innermost message of a failed collective load, on one line (DCP wraps per-rank errors)."""
    seen = set()
    while True:
        nxt = exc.__cause__ or exc.__context__
        failures = getattr(exc, "failures", None)  # torch's CheckpointException: {rank: exception}
        if isinstance(failures, dict) and failures:
            nxt = next(iter(failures.values()))
            if isinstance(nxt, tuple):
                nxt = nxt[0]
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            break
        seen.add(id(exc))
        exc = nxt
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def is_load_failure(exc: BaseException) -> bool:
    """A failed read worth one CheckpointError line (not Ctrl-C, exit, or our own error)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, (CheckpointError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return False
    return isinstance(exc, (Exception, CheckpointException))
