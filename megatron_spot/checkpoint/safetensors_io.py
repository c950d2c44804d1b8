"""Streaming safetensors reading and writing with bounded memory.

The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw
tensor bytes (offsets relative to the end of the header).

`safetensors.safe_open` memory-maps whole files, and every page a conversion touches then counts
in the process's resident memory until the file is closed. Reading row ranges with plain file
reads (and writing tensors one block at a time) keeps a conversion's peak memory at the model's
size plus one block, and lets every error name the file it comes from.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_spot.checkpoint.errors import CheckpointError
from megatron_spot.checkpoint.finite import refuse_non_finite

# the safetensors header's dtype codes (a file-format table, not a precision choice: config/dtypes.py)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20
BLOCK_BYTES = 64 * 2**20  # rows read / written per step for large tensors
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _corrupt(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"corrupt safetensors file {path}: {why}")


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate one file's header; returns ({name: TensorInfo}, __metadata__)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n > size - 8 or n > _MAX_HEADER:
                raise _corrupt(path, f"header length {n} does not fit the file size {size} (truncated or not safetensors)")
            blob = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = spec["dtype"], tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"malformed header entry for tensor {name!r}") from None
        if dtype_name not in ST_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {dtype_name}; only F32/F16/BF16/F64 weights are supported "
                "(quantized checkpoints are not)"
            )
        dtype = ST_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise _corrupt(path, f"tensor {name}: data_offsets [{begin}, {end}] do not match shape {list(shape)} x {dtype_name}")
        if data_start + end > size:
            raise _corrupt(path, f"tensor {name} ends at byte {data_start + end} but the file has {size} bytes (truncated?)")
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)
    spans.sort()
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _corrupt(path, f"tensors {n0} and {n1} overlap")
    meta = header.get("__metadata__") or {}
    return infos, meta if isinstance(meta, dict) else {}


class SafetensorsCheckpoint:
    """All tensors of a Hugging Face checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: str, refuse_non_finite: bool = False):
        """refuse_non_finite: every read() raises a CheckpointError naming the tensor and file when the
        rows it returns hold NaN or Inf (the conversions' check, checkpoint/finite.py)."""
        self.folder = folder
        self.refuse_non_finite = refuse_non_finite
        index = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if not files:
                other = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
                hint = (f" (found {', '.join(other[:3])}: PyTorch pickles are not read; re-save them with "
                        "save_pretrained(..., safe_serialization=True))") if other else ""
                raise CheckpointError(f"{folder}: no *.safetensors weights{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index}: lists {fname}, which does not exist in {folder}")
            infos, _meta = read_header(path)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name} appears in both {self.tensors[name].path} and {path}")
                self.tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = self.tensors.get(name)
                if info is None or os.path.basename(info.path) != fname:
                    raise CheckpointError(
                        f"{index}: maps {name} to {fname}, but {os.path.join(folder, fname)} does not contain it"
                    )
        self._files: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def read(self, name: str, row_start: int = 0, row_end: Optional[int] = None) -> torch.Tensor:
        """Rows [row_start, row_end) of a tensor (the whole tensor by default), in its file dtype."""
        info = self.tensors[name]
        shape = info.shape
        if not shape:
            row_start, row_end, row_bytes, out_shape = 0, 1, info.nbytes, ()
        else:
            row_end = shape[0] if row_end is None else row_end
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            out_shape = (row_end - row_start, *shape[1:])
        count = (row_end - row_start) * row_bytes
        buf = torch.empty(count, dtype=torch.uint8)
        f = self._files.get(info.path)
        if f is None:
            f = self._files[info.path] = open(info.path, "rb", buffering=0)
        f.seek(info.offset + row_start * row_bytes)
        view = memoryview(buf.numpy())
        got = 0
        while got < count:
            n = f.readinto(view[got:])
            if not n:
                raise _corrupt(info.path, f"unexpected end of file while reading tensor {name}")
            got += n
        out = buf.view(info.dtype).view(out_shape)
        if self.refuse_non_finite:
            refuse_non_finite(name, out, info.path, first_row=row_start)
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def row_blocks(tensor: torch.Tensor, dtype: torch.dtype, block_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """`tensor` converted to `dtype` in contiguous row blocks of at most ~block_bytes."""
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        yield tensor.to(dtype).contiguous()
        return
    row_bytes = max(1, tensor[0].numel() * dtype.itemsize)
    step = max(1, block_bytes // row_bytes)
    for r in range(0, tensor.shape[0], step):
        yield tensor[r: r + step].to(dtype).contiguous()


def write_safetensors(path: str, items: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], Iterable[torch.Tensor]],
                      metadata: Optional[dict] = None, on_tensor: Optional[Callable[[str, int], None]] = None) -> int:
    """Write one safetensors file tensor by tensor; `produce(name)` yields its data in row blocks.

    The header is computed up front from names, dtypes and shapes, so no more than one block is
    held at a time. Returns the number of data bytes written.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in items:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, dtype, shape in items:
            expected = math.prod(shape) * dtype.itemsize
            written = 0
            for block in produce(name):
                if block.dtype != dtype:
                    raise ValueError(f"{name}: block dtype {block.dtype} != {dtype}")
                data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != expected:
                raise ValueError(f"{name}: wrote {written} bytes, expected {expected}")
            if on_tensor is not None:
                on_tensor(name, written)
        f.flush()
        os.fsync(f.fileno())
    return offset


def plan_shards(items: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list]:
    """Greedy split into files of at most max_shard_bytes (a tensor larger than that gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for item in items:
        nbytes = math.prod(item[2]) * item[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards
