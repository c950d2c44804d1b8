"""The piece-cache encoder must give exactly the Rust tokenizer's ids (GPT-2 and Qwen pipelines)."""
import random

import pytest

from megatron_spot.data.fast_bpe import PROBES, QWEN2_PATTERN, CachedByteLevelBPE

from .conftest import CORPUS

ALPHABET = (list("abcXYZ019'sdlltmrev.,;:!?$\\^{}()+-=_/\"") + [" "] * 12 + ["\n", "\n\n", "\t", "\r\n", "  ",
            "\u00a0", "\u3000", "\u2003", "\x1c", "\x85", "\u200b", "e\u0301", "\u00e9", "中", "文", "😀", "👍🏽",
            "½", "٣", "'s", "'LL", " 'd", "<|im_end|>", "<|im_start|>", "<think>", "ǅ", "ß"])


def fuzz_texts(n=1500, seed=0):
    rng = random.Random(seed)
    return [("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60)))) for _ in range(n)] + PROBES


def qwen_like_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                  "<think>", "</think>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok


@pytest.mark.parametrize("which", ["gpt2_bytelevel", "qwen_split_nfc"])
def test_cached_encoder_matches_rust(which, hf):
    backend = hf.backend_tokenizer if which == "gpt2_bytelevel" else qwen_like_tokenizer()
    enc = CachedByteLevelBPE.from_backend(backend)
    assert enc is not None and enc._segmentable
    texts = fuzz_texts()
    want = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert enc.encode_batch(texts) == want
    assert enc.encode_batch(texts) == want          # warm caches give the same


def test_unsupported_pipeline_is_refused():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = qwen_like_tokenizer()
    tok.normalizer = normalizers.Lowercase()
    assert CachedByteLevelBPE.from_backend(tok) is None
    tok2 = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok2.pre_tokenizer = pre_tokenizers.Whitespace()
    assert CachedByteLevelBPE.from_backend(tok2) is None
