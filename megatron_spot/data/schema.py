"""Pair schema: field presets, field mapping and per-record validation.

A pair is (prompt, chosen, rejected). Each value is either a plain string or, for TRL's conversational
format, a list of chat messages ({"role": str, "content": str}). Records whose values cannot be turned
into a valid pair raise `PairError` with a machine-readable `reason` and a `where` (file:line or
file[row]) so the packer can count-and-skip or fail (`--strict`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

# Reasons a record is dropped; the manifest counts each of them (zero counts included).
REASONS = (
    "malformed_json",       # a line/record that is not valid JSON (or not UTF-8)
    "not_an_object",        # a JSON value that is not an object/dict
    "missing_field",        # a mapped field is absent (or null)
    "bad_type",             # a field is neither a string nor a list of chat messages, or types are mixed
    "empty_prompt",         # the prompt is empty (or tokenises to nothing)
    "empty_response",       # chosen or rejected is empty / whitespace only
    "identical_responses",  # chosen == rejected (before or after truncation): no preference signal
    "over_length",          # longer than --max-length / --max-prompt-length with --truncation drop
    "chat_template_error",  # the chat template refused the record (raise_exception, e.g. roles out of order)
)

Message = dict
Value = Union[str, Sequence[Message]]


class PairError(ValueError):
    """A record that cannot be packed. `reason` is one of REASONS; `where` locates it."""

    def __init__(self, reason: str, message: str, where: str = ""):
        assert reason in REASONS, reason
        self.reason = reason
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


@dataclasses.dataclass(frozen=True)
class FieldMapping:
    """Which record fields hold the prompt, chosen and rejected values.

    Each is a tuple of candidate names; the first present one is used (SPoT's files use `question`,
    some use `prompt`). `metadata`, when set, names an optional dict field that must be a dict if present.
    `strip_response_prefix`: removed once from the start of string responses that begin with it (the
    SPoT authors strip a leading "\n\n" from both answers before training).
    """

    prompt: Tuple[str, ...] = ("prompt",)
    chosen: Tuple[str, ...] = ("chosen",)
    rejected: Tuple[str, ...] = ("rejected",)
    metadata: Optional[str] = None
    strip_response_prefix: Optional[str] = None

    def to_json(self) -> dict:
        return {"prompt": list(self.prompt), "chosen": list(self.chosen), "rejected": list(self.rejected),
                "metadata": self.metadata, "strip_response_prefix": self.strip_response_prefix}


PRESETS = {
    # The SPoT authors' training files (their format_data_for_dpo strips one leading "\n\n" per answer).
    "spot": FieldMapping(("question", "prompt"), ("gemini_corrected_answer",), ("original_answer",),
                         strip_response_prefix="\n\n"),
    # TRL preference datasets: strings, or conversational message lists (prompt may be implicit).
    "trl": FieldMapping(("prompt",), ("chosen",), ("rejected",)),
    # megatron_spot's rectification tool: pairs.jsonl with prompt/chosen/rejected strings + metadata.
    "rectify": FieldMapping(("prompt",), ("chosen",), ("rejected",), metadata="metadata"),
}


def resolve_mapping(preset: Optional[str] = "trl", prompt_field: Optional[str] = None,
                    chosen_field: Optional[str] = None, rejected_field: Optional[str] = None) -> FieldMapping:
    """Start from a preset and override single fields (comma-separated names give fallbacks)."""
    if preset is None:
        preset = "trl"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset]

    def names(flag: Optional[str], default: Tuple[str, ...]) -> Tuple[str, ...]:
        if flag is None:
            return default
        out = tuple(n.strip() for n in flag.split(",") if n.strip())
        if not out:
            raise ValueError(f"empty field name {flag!r}")
        return out

    return FieldMapping(names(prompt_field, base.prompt), names(chosen_field, base.chosen),
                        names(rejected_field, base.rejected), base.metadata, base.strip_response_prefix)


def _lookup(record: dict, names: Tuple[str, ...]) -> Any:
    for n in names:
        if n in record and record[n] is not None:
            return record[n]
    return None


def _is_messages(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(m, dict) for m in v)


def _check_messages(v: Sequence[Message], field: str, where: str) -> list:
    out = []
    for k, m in enumerate(v):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise PairError("bad_type", f"{field}[{k}] needs string 'role' and 'content'", where)
        out.append({"role": role, "content": content})
    return out


def _empty(v: Value) -> bool:
    if isinstance(v, str):
        return not v.strip()
    return len(v) == 0 or not any(m["content"].strip() for m in v)


@dataclasses.dataclass
class RawPair:
    prompt: Value
    chosen: Value
    rejected: Value
    conversational: bool


def extract_pair(record: Any, mapping: FieldMapping, where: str = "") -> RawPair:
    """Validate one record and return its (prompt, chosen, rejected) values."""
    if not isinstance(record, dict):
        raise PairError("not_an_object", f"expected a JSON object, got {type(record).__name__}", where)
    chosen = _lookup(record, mapping.chosen)
    rejected = _lookup(record, mapping.rejected)
    prompt = _lookup(record, mapping.prompt)
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if v is None:
            fields = "/".join(getattr(mapping, name))
            raise PairError("missing_field", f"missing field {fields!r} ({name})", where)
    if mapping.metadata and mapping.metadata in record and record[mapping.metadata] is not None \
            and not isinstance(record[mapping.metadata], dict):
        raise PairError("bad_type", f"field {mapping.metadata!r} must be an object", where)

    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = mapping.strip_response_prefix
        if cut:
            chosen = chosen[len(cut):] if chosen.startswith(cut) else chosen
            rejected = rejected[len(cut):] if rejected.startswith(cut) else rejected
        if prompt is None:
            raise PairError("missing_field", f"missing field {'/'.join(mapping.prompt)!r} (prompt)", where)
        if not isinstance(prompt, str):
            raise PairError("bad_type", "prompt must be a string when chosen/rejected are strings", where)
        conversational = False
    elif _is_messages(chosen) and _is_messages(rejected):
        chosen = _check_messages(chosen, "chosen", where)
        rejected = _check_messages(rejected, "rejected", where)
        if prompt is None:
            # TRL's implicit-prompt format: the shared leading messages are the prompt.
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            while k > 0 and chosen[k - 1]["role"] == "assistant":
                k -= 1
            if k == 0:
                raise PairError("missing_field", "no prompt field and no shared leading messages", where)
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif _is_messages(prompt):
            prompt = _check_messages(prompt, "prompt", where)
        else:
            raise PairError("bad_type", "prompt must be a string or a list of messages", where)
        conversational = True
    else:
        def kind(v):
            return "messages" if _is_messages(v) else type(v).__name__
        raise PairError("bad_type", f"chosen/rejected must both be strings or both message lists "
                                    f"(got {kind(chosen)} / {kind(rejected)})", where)

    if _empty(prompt):
        raise PairError("empty_prompt", "empty prompt", where)
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if _empty(v):
            raise PairError("empty_response", f"empty {name} response", where)
    if chosen == rejected:
        raise PairError("identical_responses", "chosen is identical to rejected", where)
    return RawPair(prompt, chosen, rejected, conversational)
