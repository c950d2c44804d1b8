"""Build small tokenizers locally, for tests, benchmarks and the demo (no downloads).

`build_tiny_tokenizer` trains a byte-level BPE with the `tokenizers` library and saves a Hugging Face
tokenizer directory (tokenizer.json + tokenizer_config.json) that `transformers.AutoTokenizer` loads,
with Qwen3's special tokens (`<|endoftext|>` pad, `<|im_end|>` eos, `<|im_start|>`, `<think>`,
`</think>`) and a Qwen3-style chat template, including the non-thinking empty think block.

`build_tiny_sentencepiece` trains a sentencepiece model on the same kind of corpus.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# A Qwen3-style chat template, written for this project. What it renders:
#   <|im_start|>{role}\n{content}<|im_end|>\n                     for system / user turns
#   <|im_start|>assistant\n<think>\n\n</think>\n\n{content}<|im_end|>\n
#                                   for the assistant turns after the last user turn (Qwen3 shows
#                                   the reasoning block there; non-thinking mode leaves it empty)
#   <|im_start|>assistant\n{content}<|im_end|>\n                   for earlier assistant turns
#   <|im_start|>assistant\n  (+ "<think>\n\n</think>\n\n" when enable_thinking is false)
#                                   for add_generation_prompt
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}"
    "{%- set reasoning = m.get('reasoning_content', '') or '' -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

DEFAULT_CORPUS = [
    "Solve for x: 2x + 3 = 11. Subtract 3 from both sides to get 2x = 8, so x = 4.",
    "Therefore, the final answer is: $\\boxed{4}$.",
    "The sum of the interior angles of a triangle is 180 degrees.",
    "Let n be a positive integer such that n^2 - 5n + 6 = 0. Then n = 2 or n = 3.",
    "We compute the probability as the ratio of favourable outcomes to all outcomes.",
    "The quick brown fox jumps over the lazy dog while the student checks each step.",
]


def build_tiny_tokenizer(out_dir: str, corpus_texts: Iterable[str] | None = None, vocab_size: int = 512,
                         chat_template: str = QWEN3_STYLE_CHAT_TEMPLATE) -> str:
    """Train a byte-level BPE on `corpus_texts` and save an HF tokenizer dir at `out_dir`.

    Returns `out_dir`. The result loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`;
    eos is `<|im_end|>`, pad is `<|endoftext|>`, and the chat template is Qwen3-style.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(corpus_texts) if corpus_texts is not None else list(DEFAULT_CORPUS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(int(vocab_size), 256 + len(SPECIAL_TOKENS) + 1),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": chat_template,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def build_tiny_sentencepiece(model_prefix: str, corpus_texts: Sequence[str] | None = None,
                             vocab_size: int = 400) -> str:
    """Train a small sentencepiece BPE model (byte fallback, so vocab_size must exceed ~300); returns the `.model` path."""
    import io

    import sentencepiece as spm

    texts = list(corpus_texts) if corpus_texts is not None else list(DEFAULT_CORPUS)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    path = model_prefix if model_prefix.endswith(".model") else model_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path
