"""Preference-pair data: packing into Megatron indexed datasets, and the training-side reader.

Packing (`tools/pack_pairs.py` is the CLI):  pack_pairs(inputs, tokenizer, output_prefix, ...)
Reading for training: PairDataset, PairBatchSampler, collate_pairs; tokenizer_hash for the check
that the pack and the model share a tokenizer. See pack.py for the on-disk layout.
"""
from .indexed import PackFormatError, read_index
from .pack import FORMAT_NAME, FORMAT_VERSION, PackError, pack_fingerprint, pack_pairs
from .reader import PairBatchSampler, PairDataset, TokenizerMismatchError, collate_pairs
from .readers import InputError
from .schema import PRESETS, REASONS, FieldMapping, PairError, resolve_mapping
from .tiny_tokenizer import build_tiny_sentencepiece, build_tiny_tokenizer
from .tokenization import PairTokenizer, TokenizerError, tokenizer_hash

__all__ = [
    "PairDataset", "PairBatchSampler", "collate_pairs", "tokenizer_hash", "pack_pairs", "pack_fingerprint",
    "PackError", "PackFormatError", "InputError", "TokenizerError", "TokenizerMismatchError", "PairError",
    "PRESETS", "REASONS", "FieldMapping", "resolve_mapping", "PairTokenizer", "read_index",
    "build_tiny_tokenizer", "build_tiny_sentencepiece", "FORMAT_NAME", "FORMAT_VERSION",
]
