"""Content fingerprint of a model checkpoint's weights (not its path, not the save that wrote it).

Reference log-probs belong to one model: a checkpoint replaced in place, or another checkpoint at
the same path, must not reuse them; the same weights converted twice (into two folders, or again in
place) must. Hashing every byte of a 16-64 GB checkpoint at each training start would cost minutes,
so the fingerprint hashes a canonical description of torch_dist's `.metadata` (every tensor's key,
dtype, shape and chunking, and where each chunk lies in which data file) and, per data file, its
size and 16 blocks of 64 KiB spread evenly over it. The raw `.metadata` bytes are not hashed: they
hold torch's StorageMeta (a random save id and the temporary folder the save wrote into), which
differ between two saves of the same weights.

Any retraining or reconversion to other weights changes them everywhere, so it changes the sampled
bytes; a deliberately crafted single-byte edit between samples would not (the fingerprint is an
identity, not an integrity check).
"""
from __future__ import annotations

import hashlib
import os

SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 64 * 1024


def _canonical_metadata(meta) -> bytes:
    """The weights' description in torch_dist metadata, one line per tensor and per stored chunk, sorted;
    without StorageMeta (save id, checkpoint path) and the planners' private data."""
    lines = []
    for key in sorted(meta.state_dict_metadata):
        md = meta.state_dict_metadata[key]
        chunks = getattr(md, "chunks", None)
        if chunks is None:  # BytesStorageMetadata: a non-tensor item, stored as bytes in a data file
            lines.append(f"item {key} bytes")
            continue
        lines.append(f"item {key} {md.properties.dtype} {tuple(md.size)} "
                     + " ".join(f"{tuple(c.offsets)}+{tuple(c.sizes)}" for c in chunks))
    where = []
    for index, info in meta.storage_data.items():
        offset = tuple(index.offset) if index.offset is not None else ()
        where.append(f"chunk {index.fqn} {offset} -> {info.relative_path} {int(info.offset)} {int(info.length)}")
    return "\n".join(lines + sorted(where)).encode()


def weights_fingerprint(ckpt_dir: str) -> str:
    """sha256 hex of a torch_dist model folder's weights (see the module docstring). Raises
    CheckpointError on a folder without readable torch_dist metadata."""
    from megatron_spot.checkpoint.safe_load import verify_dist_checkpoint

    meta = verify_dist_checkpoint(ckpt_dir)  # restricted unpickling; every data file present and long enough
    h = hashlib.sha256(b"megatron_spot.weights.v2\0")
    h.update(_canonical_metadata(meta))
    files = sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".distcp"))
    for name in files:
        path = os.path.join(ckpt_dir, name)
        size = os.path.getsize(path)
        h.update(f"\0{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= SAMPLES_PER_FILE * SAMPLE_BYTES:
                h.update(f.read())
                continue
            stride = (size - SAMPLE_BYTES) // (SAMPLES_PER_FILE - 1)
            for k in range(SAMPLES_PER_FILE):
                f.seek(k * stride)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()
