"""Megatron indexed-dataset (.bin/.idx) writing and strict reading.

The format is exactly what `megatron.core.datasets.indexed_dataset.IndexedDataset` reads (see
`IndexedDatasetBuilder`): .bin holds all sequences' tokens concatenated; .idx is
  9-byte magic b"MMIDIDX\\x00\\x00", uint64 version 1, uint8 dtype code, uint64 sequence_count,
  uint64 document_count (= documents + 1), int32 lengths[seq], int64 byte pointers[seq],
  int64 document_indices[documents + 1].
This writer is vectorised (numpy) instead of per-item Python, and hashes both files as it writes;
tests compare its bytes with IndexedDatasetBuilder's and read it back with IndexedDataset.
"""
from __future__ import annotations

import hashlib
import os
import struct
from typing import Optional

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class PackFormatError(ValueError):
    """A .bin/.idx/manifest that is missing, truncated, corrupt or from another format version."""


class IndexedWriter:
    """Append documents (groups of sequences) to a .bin file; `finalize` writes the .idx."""

    def __init__(self, bin_path: str, dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype.type not in DTYPE_CODES:
            raise ValueError(f"unsupported dtype {dtype}")
        self.bin_path = bin_path
        self._f = open(bin_path, "wb")
        self._sha = hashlib.sha256()
        self._lengths = []
        self._docs = [np.zeros(1, np.int64)]
        self._nseq = 0
        self.bin_bytes = 0

    def add_documents(self, tokens: np.ndarray, seq_lengths: np.ndarray, seqs_per_doc: int) -> None:
        """Append len(seq_lengths)/seqs_per_doc documents whose sequences are concatenated in tokens."""
        seq_lengths = np.asarray(seq_lengths, dtype=np.int64)
        if seq_lengths.size % seqs_per_doc or int(seq_lengths.sum()) != tokens.size:
            raise ValueError("sequence lengths do not match the tokens")
        if tokens.size:
            info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
            if info is not None and (tokens.min() < info.min or tokens.max() > info.max):
                raise ValueError(f"token ids out of range for {self.dtype}")
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._f.write(data)
        self._sha.update(data)
        self.bin_bytes += len(data)
        self._lengths.append(seq_lengths.astype(np.int32))
        ndoc = seq_lengths.size // seqs_per_doc
        self._docs.append(self._nseq + seqs_per_doc * np.arange(1, ndoc + 1, dtype=np.int64))
        self._nseq += seq_lengths.size

    def finalize(self, idx_path: str) -> dict:
        self._f.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        docs = np.concatenate(self._docs)
        idx = index_bytes(lengths, docs, self.dtype)
        with open(idx_path, "wb") as f:
            f.write(idx)
        return {"bin_bytes": self.bin_bytes, "bin_sha256": self._sha.hexdigest(),
                "idx_bytes": len(idx), "idx_sha256": hashlib.sha256(idx).hexdigest(),
                "sequences": int(lengths.size), "documents": int(docs.size - 1)}

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass


def index_bytes(lengths: np.ndarray, document_indices: np.ndarray, dtype) -> bytes:
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(lengths.size, np.int64)
    if lengths.size > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    document_indices = np.asarray(document_indices, dtype=np.int64)
    head = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", DTYPE_CODES[dtype.type]) \
        + struct.pack("<Q", lengths.size) + struct.pack("<Q", document_indices.size)
    return head + lengths.tobytes() + pointers.tobytes() + document_indices.tobytes()


class IndexInfo:
    """A validated .idx: dtype, lengths, pointers, document indices (numpy arrays)."""

    def __init__(self, dtype, lengths, pointers, document_indices, raw: bytes):
        self.dtype = dtype
        self.lengths = lengths
        self.pointers = pointers
        self.document_indices = document_indices
        self.raw = raw


def read_index(idx_path: str, bin_path: Optional[str] = None) -> IndexInfo:
    """Read and fully validate an .idx (and the .bin's size against it). Raises PackFormatError."""
    if not os.path.exists(idx_path):
        raise PackFormatError(f"index file not found: {idx_path}")
    with open(idx_path, "rb") as f:
        raw = f.read()
    if len(raw) < HEADER_SIZE:
        raise PackFormatError(f"{idx_path}: truncated index ({len(raw)} bytes, header needs {HEADER_SIZE})")
    if raw[:9] != MAGIC:
        raise PackFormatError(f"{idx_path}: bad magic {raw[:9]!r} (expected {MAGIC!r}); not a Megatron .idx")
    version = struct.unpack_from("<Q", raw, 9)[0]
    if version != VERSION:
        raise PackFormatError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
    code = raw[17]
    if code not in CODE_DTYPES:
        raise PackFormatError(f"{idx_path}: unknown dtype code {code}")
    dtype = np.dtype(CODE_DTYPES[code])
    nseq, ndoc = struct.unpack_from("<QQ", raw, 18)
    expected = HEADER_SIZE + nseq * 4 + nseq * 8 + ndoc * 8
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise PackFormatError(f"{idx_path}: index {what}: {len(raw)} bytes, header says {expected} "
                              f"({nseq} sequences, {ndoc} document entries)")
    off = HEADER_SIZE
    lengths = np.frombuffer(raw, np.int32, nseq, off)
    pointers = np.frombuffer(raw, np.int64, nseq, off + 4 * nseq)
    docs = np.frombuffer(raw, np.int64, ndoc, off + 12 * nseq)
    if nseq and lengths.min() < 0:
        raise PackFormatError(f"{idx_path}: corrupt index (negative sequence length)")
    want = np.zeros(nseq, np.int64)
    if nseq > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=want[1:])
    if not np.array_equal(want, pointers):
        raise PackFormatError(f"{idx_path}: corrupt index (sequence pointers disagree with lengths)")
    if ndoc < 1 or docs[0] != 0 or docs[-1] != nseq or (ndoc > 1 and np.any(np.diff(docs) < 0)):
        raise PackFormatError(f"{idx_path}: corrupt index (bad document indices)")
    if bin_path is not None:
        if not os.path.exists(bin_path):
            raise PackFormatError(f"data file not found: {bin_path}")
        size = os.path.getsize(bin_path)
        need = int(lengths.astype(np.int64).sum()) * dtype.itemsize
        if size != need:
            what = "truncated" if size < need else "larger than its index says"
            raise PackFormatError(f"{bin_path}: data file {what}: {size} bytes, index says {need}")
    return IndexInfo(dtype, lengths, pointers, docs, raw)
