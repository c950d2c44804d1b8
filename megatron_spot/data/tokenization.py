"""Tokenisation of pairs, the way TRL 0.20's DPOTrainer does it.

Plain strings (TRL 0.20 `tokenize_row`): prompt, chosen and rejected are tokenised separately with
add_special_tokens=False (no BOS); EOS is appended to chosen and rejected, not to the prompt.

Conversational values get the chat template, in one of two modes (`CHAT_TEMPLATE_MODES`):

- "authors" (the default for `--preset spot`): exactly TRL 0.20's `maybe_apply_chat_template` with the
  template's defaults, which is how the SPoT authors' script drives it:
      prompt_text = template(prompt, add_generation_prompt=True)
      prompt_text = common prefix of prompt_text and template(prompt + chosen);   chosen = the rest
      prompt_text = common prefix of prompt_text and template(prompt + rejected); rejected = the rest
  (the prefix is narrowed sequentially, so chosen is cut at the first narrowing, as TRL does).
  For Qwen3 the prompt ends "<|im_start|>assistant\n" and each response STARTS with the empty think
  block "<think>\n\n</think>\n\n", which is therefore scored.
- "non-thinking": the same split, but every rendering passes enable_thinking=False, so the empty think
  block ends the prompt (conditioning, not scored). A different recipe from the authors'.

`--apply-chat-template` wraps plain strings as one user turn and one assistant turn first.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import List, Optional, Sequence, Tuple

# Files that determine an HF tokenizer's behaviour (token ids, special tokens, chat template).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                      "chat_template.jinja", "chat_template.json")


CHAT_TEMPLATE_MODES = ("authors", "non-thinking")


class TokenizerError(ValueError):
    pass


class ChatTemplateRecordError(ValueError):
    """The chat template raised for one record (a template's raise_exception(...), e.g. for message roles that
    do not alternate): that record is skipped and counted, like other bad records."""


def default_chat_template_mode(preset: Optional[str]) -> str:
    """The authors' TRL rendering for their own files (`spot`), today's non-thinking one otherwise."""
    return "authors" if preset == "spot" else "non-thinking"


def _common_prefix(a: str, b: str) -> str:
    n, m = 0, min(len(a), len(b))
    while n < m and a[n] == b[n]:
        n += 1
    return a[:n]


def tokenizer_hash(tokenizer_path: str) -> str:
    """Stable sha256 (hex) of a tokenizer: a sentencepiece .model file, or an HF tokenizer folder.

    For a folder only the files that define tokenisation are hashed (HF_TOKENIZER_FILES), so the same
    tokenizer inside a model checkpoint folder and in a standalone folder hash the same.
    """
    h = hashlib.sha256()
    if os.path.isfile(tokenizer_path):
        h.update(b"sentencepiece\0")
        with open(tokenizer_path, "rb") as f:
            h.update(f.read())
        return h.hexdigest()
    if not os.path.isdir(tokenizer_path):
        raise TokenizerError(f"tokenizer not found: {tokenizer_path!r}")
    found = False
    for name in HF_TOKENIZER_FILES:
        p = os.path.join(tokenizer_path, name)
        if os.path.isfile(p):
            found = True
            with open(p, "rb") as f:
                data = f.read()
            h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    if not found:
        raise TokenizerError(f"{tokenizer_path!r} holds no tokenizer files ({', '.join(HF_TOKENIZER_FILES[:2])})")
    return h.hexdigest()


def _raise_exception(message):
    """The `raise_exception` Hugging Face gives chat templates (they call it to refuse a conversation)."""
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_jinja(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _render_jinja(template: str, messages, add_generation_prompt: bool, **kwargs) -> str:
    return _compile_jinja(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


def _template_failure(exc: Exception, source: str) -> Exception:
    """A jinja error of `source` as what the packer reports: a template that cannot work at all (syntax, the
    sandbox refusing an operation) is a TokenizerError, one that refused this record a ChatTemplateRecordError."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

    if isinstance(exc, TemplateSyntaxError):
        return TokenizerError(f"{source}: line {exc.lineno}: {exc.message}")
    if isinstance(exc, SecurityError):
        return TokenizerError(f"{source} does something the sandbox refuses: {exc}")
    if isinstance(exc, TemplateError):
        return ChatTemplateRecordError(f"{source} raised: {exc}")
    return exc


class PairTokenizer:
    """A tokenizer for pair packing: an HF tokenizer folder or a sentencepiece `.model` file."""

    def __init__(self, path: str, chat_template: Optional[str] = None, chat_template_mode: str = "non-thinking",
                 use_piece_cache: bool = True):
        if chat_template_mode not in CHAT_TEMPLATE_MODES:
            raise TokenizerError(f"chat template mode must be one of {CHAT_TEMPLATE_MODES}, got {chat_template_mode!r}")
        self.path = path
        self.chat_template_mode = chat_template_mode
        self.hash = tokenizer_hash(path)
        self._template_override = chat_template
        if os.path.isfile(path):
            import sentencepiece as spm

            self.kind = "sentencepiece"
            try:
                self._sp = spm.SentencePieceProcessor(model_file=path)
            except Exception as e:
                raise TokenizerError(f"{path!r} is not a sentencepiece model ({e})") from None
            self.vocab_size = int(self._sp.get_piece_size())
            self.eos_token_id = int(self._sp.eos_id())
            self.pad_token_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_token_id
            self.chat_template = chat_template
            if self.eos_token_id < 0:
                raise TokenizerError(f"{path!r}: the sentencepiece model has no EOS piece")
        else:
            from transformers import AutoTokenizer

            self.kind = "hf"
            try:
                self._hf = AutoTokenizer.from_pretrained(path)
            except Exception as e:
                raise TokenizerError(f"cannot load an HF tokenizer from {path!r}: {e}") from None
            self.vocab_size = int(len(self._hf))
            if self._hf.eos_token_id is None:
                raise TokenizerError(f"{path!r}: the tokenizer has no eos_token")
            self.eos_token_id = int(self._hf.eos_token_id)
            pad = self._hf.pad_token_id
            self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
            self.chat_template = chat_template or getattr(self._hf, "chat_template", None)
            backend = getattr(self._hf, "backend_tokenizer", None)
            self._fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
            self._cached = None
            if backend is not None and use_piece_cache:
                from .fast_bpe import CachedByteLevelBPE

                self._cached = CachedByteLevelBPE.from_backend(backend)
        if isinstance(self.chat_template, str):  # a syntax error is reported now, before any record is read
            from jinja2.exceptions import TemplateError

            try:
                _compile_jinja(self.chat_template)
            except TemplateError as exc:
                raise _template_failure(exc, self._template_source) from None

    # -- encoding ---------------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, no special tokens added (TRL's add_special_tokens=False)."""
        if not texts:
            return []
        if self.kind == "sentencepiece":
            return self._sp.encode(list(texts))
        if self._cached is not None:
            out = self._cached.encode_batch(texts)
            # spot check one text per batch against the Rust pipeline; on any difference, stop using the cache
            k = len(texts) // 2
            if self._fast([texts[k]], add_special_tokens=False)[0].ids == out[k]:
                return out
            self._cached = None
        if self._fast is not None:
            return [e.ids for e in self._fast(list(texts), add_special_tokens=False)]
        return self._hf(list(texts), add_special_tokens=False)["input_ids"]

    @property
    def encoder_name(self) -> str:
        if self.kind == "sentencepiece":
            return "sentencepiece"
        return "piece-cache byte-level BPE" if getattr(self, "_cached", None) is not None else "tokenizers encode_batch"

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- chat template ----------------------------------------------------------------------------
    @property
    def _template_source(self) -> str:
        return "the --chat-template template" if self._template_override is not None else f"{self.path}'s chat template"

    def _apply(self, messages, add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError

        # authors: the template's defaults, as TRL 0.20 calls it (no enable_thinking argument at all)
        kwargs = {"enable_thinking": False} if self.chat_template_mode == "non-thinking" else {}
        try:
            if self.kind == "hf" and self._template_override is None:
                return self._hf.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt, **kwargs)
            if not self.chat_template:
                raise TokenizerError(f"{self.path!r} has no chat template; pass --chat-template FILE")
            return _render_jinja(self.chat_template, messages, add_generation_prompt, **kwargs)
        except TemplateError as exc:
            raise _template_failure(exc, self._template_source) from None

    def render_pair(self, prompt, chosen, rejected) -> Tuple[str, str, str]:
        """Prompt/chosen/rejected texts under the chat template, split like TRL does."""
        if not self.chat_template and not (self.kind == "hf" and self._template_override is None
                                           and getattr(self._hf, "chat_template", None)):
            raise TokenizerError(f"{self.path!r} has no chat template; pass --chat-template FILE "
                                 f"or use plain-string fields without --apply-chat-template")
        p = self._apply(list(prompt), add_generation_prompt=True)
        fc = self._apply(list(prompt) + list(chosen), add_generation_prompt=False)
        fr = self._apply(list(prompt) + list(rejected), add_generation_prompt=False)
        if self.chat_template_mode == "authors":
            # TRL 0.20 narrows the prompt against chosen first and cuts chosen there, then narrows it again
            # against rejected; chosen is not re-cut (a no-op for Qwen3, whose prompt is a prefix of both).
            p = _common_prefix(p, fc)
            c = fc[len(p):]
            p = _common_prefix(p, fr)
            return p, c, fr[len(p):]
        p = _common_prefix(_common_prefix(p, fc), fr)
        return p, fc[len(p):], fr[len(p):]

    def describe(self) -> dict:
        d = {"path": os.path.abspath(self.path), "kind": self.kind, "hash": self.hash,
             "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id,
             "pad_token_id": self.pad_token_id, "chat_template_mode": self.chat_template_mode,
             "encoder": self.encoder_name}
        if self.chat_template:
            d["chat_template_sha256"] = hashlib.sha256(self.chat_template.encode()).hexdigest()
            d["chat_template_overridden"] = self._template_override is not None
        return d


def token_dtype(vocab_size: int):
    """Megatron's rule: uint16 when the vocabulary has fewer than 65,500 entries, else int32."""
    import numpy as np

    return np.uint16 if vocab_size < 65500 else np.int32
