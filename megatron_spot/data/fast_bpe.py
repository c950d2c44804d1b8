"""A memoising front end for byte-level BPE tokenizers (GPT-2 / Qwen style tokenizer.json).

Packing spends nearly all its time in the tokenizer, and most of that per character (normalisation,
alignment tracking, pre-tokenisation), not in BPE merges. Natural text repeats its words, so this
encoder does the pre-tokenisation split with one C-level regex call per text and maps each piece
through a dict of piece -> token ids; only unseen pieces go to the Rust BPE model (`model.tokenize`).

It is used only when the tokenizer's pipeline is one it reproduces exactly:
  normalizer None or NFC; pre-tokenizer ByteLevel(use_regex=True, add_prefix_space=False) or
  Sequence[Split(Regex, Isolated), ByteLevel(use_regex=False, add_prefix_space=False)]; BPE model
  without dropout/prefixes/suffixes; added tokens without lstrip/rstrip/single_word (normalized=False,
  or no normalizer).
and it must reproduce the Rust tokenizer on a set of probe strings when built; `PairTokenizer` also
compares one text per batch with the Rust result and falls back for good on any difference.
"""
from __future__ import annotations

import json
import re
import unicodedata
from itertools import chain, islice
from typing import List, Optional, Sequence

# GPT-2's pre-tokenisation pattern, as the tokenizers library's ByteLevel(use_regex=True) uses it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBES = [
    "Hello world", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n\n", "I'll we've it's THEY'RE",
    "x^2 + 3x - 4 = 0, so x = 1 or x = -4. $\\boxed{1}$", "12345678 3.14159 1e-9 ⅔ ½",
    "Ünïcödé café naïve e\u0301 Å", "中文字符和标点。日本語のテキスト", "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧",
    "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n",
    "a<|endoftext|>b <|im_end|>c", "   ", "\u00a0non-breaking\u2003em space", "end with space ",
    "mixed123abc ABC_def-ghi.jkl/mno", "''''\"\"\"", "\x00\x01 control \x7f", "",
]

# Qwen2/Qwen2.5/Qwen3's Split pattern (tokenizer.json), pre-tokenised the same way.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# For these two patterns no pre-token contains a non-whitespace character followed by a space, no
# pre-token ending there looks ahead, and neither pattern looks behind; so the split is unchanged if the
# text is first cut before every space that has non-whitespace on both sides. Word-sized segments repeat
# far more than whole texts, so they are cached too. Python re's \s is a superset of Unicode White_Space,
# so its \S only cuts where the tokenizer's \S agrees.
_SEGMENTABLE = (GPT2_PATTERN, QWEN2_PATTERN)
_SEGMENT_CUT = re.compile(r" (?<=\S )(?=\S)")

_MAX_CACHE = 1 << 20


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TABLE = {b: c for b, c in _bytes_to_unicode().items()}
# str.translate table over latin-1 code points (one code point per byte after .decode("latin-1"))
_TRANSLATE = {b: c for b, c in _BYTE_TABLE.items()}


class _PieceCache(dict):
    def __init__(self, model):
        super().__init__()
        self._model = model

    def __missing__(self, piece: str) -> List[int]:
        mapped = piece.encode("utf-8").decode("latin-1").translate(_TRANSLATE)
        ids = [t.id for t in self._model.tokenize(mapped)]
        if len(self) >= _MAX_CACHE:
            self.clear()
        self[piece] = ids
        return ids


class _SegmentCache(dict):
    def __init__(self, split, pieces, prefix):
        super().__init__()
        self._split = split
        self._pieces = pieces
        self._prefix = prefix

    def __missing__(self, seg: str) -> List[int]:
        ids = list(chain.from_iterable(map(self._pieces.__getitem__, self._split(self._prefix + seg))))
        if len(self) >= _MAX_CACHE:
            self.clear()
        self[seg] = ids
        return ids


class CachedByteLevelBPE:
    def __init__(self, backend, pattern: str, nfc: bool, added: dict):
        import regex

        self._backend = backend
        self._pat = regex.compile(pattern)
        self._nfc = nfc
        self._added = added
        self._added_pat = (regex.compile("|".join(regex.escape(t) for t in sorted(added, key=len, reverse=True)))
                           if added else None)
        self._cache = _PieceCache(backend.model)
        self._segmentable = pattern in _SEGMENTABLE
        self._head = _SegmentCache(self._split, self._cache, "")
        self._tail = _SegmentCache(self._split, self._cache, " ")

    @classmethod
    def from_backend(cls, backend) -> Optional["CachedByteLevelBPE"]:
        """Build for a `tokenizers.Tokenizer` if its pipeline is supported and the probes agree."""
        try:
            spec = json.loads(backend.to_str())
        except Exception:
            return None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
                or model.get("end_of_word_suffix"):
            return None
        norm = spec.get("normalizer")
        if norm is None:
            nfc = False
        elif norm.get("type") == "NFC":
            nfc = True
        elif norm.get("type") == "Sequence" and [n.get("type") for n in norm.get("normalizers", [])] == ["NFC"]:
            nfc = True
        else:
            return None
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
            pattern = GPT2_PATTERN
        elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
            split, bl = pre["pretokenizers"]
            if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") \
                    or "Regex" not in (split.get("pattern") or {}):
                return None
            if bl.get("type") != "ByteLevel" or bl.get("use_regex", True) or bl.get("add_prefix_space"):
                return None
            pattern = split["pattern"]["Regex"]
        else:
            return None
        added = {}
        for t in spec.get("added_tokens", []):
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or (t.get("normalized") and nfc):
                return None
            added[t["content"]] = t["id"]
        try:
            enc = cls(backend, pattern, nfc, added)
            ok = enc._encode_python(PROBES) == [e.ids for e in backend.encode_batch(PROBES, add_special_tokens=False)]
        except Exception:
            return None
        enc._clear()
        return enc if ok else None

    def _clear(self):
        self._cache.clear()
        self._head.clear()
        self._tail.clear()

    def _split(self, text: str) -> List[str]:
        pieces = self._pat.findall(text)
        if sum(map(len, pieces)) == len(text):
            return pieces
        out, pos = [], 0       # some characters matched nothing: keep the gaps as pieces (Isolated)
        for m in self._pat.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _plain(self, seg: str):
        """Ids of text without added tokens, as an iterable."""
        if self._nfc:
            seg = unicodedata.normalize("NFC", seg)
        if self._segmentable:
            parts = _SEGMENT_CUT.split(seg)
            if len(parts) == 1:
                return self._head[seg]
            return chain(self._head[parts[0]], chain.from_iterable(map(self._tail.__getitem__, islice(parts, 1, None))))
        return chain.from_iterable(map(self._cache.__getitem__, self._split(seg)))

    def _encode_one(self, text: str) -> List[int]:
        if self._added_pat is None or not self._added_pat.search(text):
            return list(self._plain(text))
        ids: List[int] = []
        pos = 0
        for m in self._added_pat.finditer(text):
            if m.start() > pos:
                ids.extend(self._plain(text[pos:m.start()]))
            ids.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self._plain(text[pos:]))
        return ids

    def _encode_python(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._encode_one(t) for t in texts]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._encode_python(texts)
