"""Content fingerprint of a model checkpoint's weights (not its path).

Reference log-probs belong to one model: a checkpoint replaced in place, or another checkpoint at
the same path, must not reuse them. Hashing every byte of a 16-64 GB checkpoint at each training
start would cost minutes, so the fingerprint hashes torch_dist's `.metadata` (every tensor's key,
shape, dtype and chunking) and, per data file, its size and 16 blocks of 64 KiB spread evenly over
it. Any retraining or reconversion changes the weights everywhere, so it changes the sampled bytes;
a deliberately crafted single-byte edit between samples would not (the fingerprint is an identity,
not an integrity check).
"""
from __future__ import annotations

import hashlib
import os

SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 64 * 1024


def weights_fingerprint(ckpt_dir: str) -> str:
    """sha256 hex of a torch_dist model folder's weights (see the module docstring)."""
    from megatron_spot.checkpoint.errors import CheckpointError

    meta = os.path.join(ckpt_dir, ".metadata")
    if not os.path.isfile(meta):
        raise CheckpointError(f"{ckpt_dir}: no .metadata (not a torch_dist model checkpoint)")
    h = hashlib.sha256(b"megatron_spot.weights.v1\0")
    with open(meta, "rb") as f:
        h.update(f.read())
    files = sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".distcp"))
    for name in files:
        path = os.path.join(ckpt_dir, name)
        size = os.path.getsize(path)
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= SAMPLES_PER_FILE * SAMPLE_BYTES:
                h.update(f.read())
                continue
            stride = (size - SAMPLE_BYTES) // (SAMPLES_PER_FILE - 1)
            for k in range(SAMPLES_PER_FILE):
                f.seek(k * stride)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()
