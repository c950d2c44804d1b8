"""The SPoT change ratio R = 1 - LCS(rejected, chosen) / len(chosen), over tokens.

LCS is the longest common SUBSEQUENCE of the two token lists (not substring), computed by
rapidfuzz's ``LCSseq`` (bit-parallel, C++). "Token" means:

* by default, whitespace-separated words (``str.split()``): tokenizer-free, fast, and what a
  human reading a diff would call a word; a change of one number in a sentence costs one token;
* with a HuggingFace tokenizer (``--tokenizer NAME_OR_PATH``), its token ids
  (``add_special_tokens=False``), i.e. R as the training model sees the text.

R = 0 means chosen is a subsequence of rejected (only deletions or nothing changed); R = 1 means
nothing in common. An empty chosen text gets R = 1.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from rapidfuzz.distance import LCSseq

Tokenize = Callable[[str], Sequence]


def whitespace_tokens(text: str) -> list[str]:
    return text.split()


def hf_tokenizer(name_or_path: str) -> Tokenize:
    from transformers import AutoTokenizer  # lazy: heavy import

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # OSError, ValueError, JSON errors...: one line naming the flag
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--tokenizer {name_or_path}: cannot load a Hugging Face tokenizer ({first})") from None

    def _tokenize(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    _tokenize.__name__ = f"hf:{name_or_path}"
    return _tokenize


def lcs_length(a: Sequence, b: Sequence) -> int:
    if not a or not b:
        return 0
    return int(LCSseq.similarity(a, b))


def change_ratio(rejected: str, chosen: str, tokenize: Optional[Tokenize] = None) -> float:
    tokenize = tokenize or whitespace_tokens
    c = list(tokenize(chosen))
    if not c:
        return 1.0
    r = list(tokenize(rejected))
    return 1.0 - lcs_length(r, c) / len(c)
