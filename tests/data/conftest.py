import json
import os

import pytest

from megatron_spot.data.tiny_tokenizer import DEFAULT_CORPUS, build_tiny_sentencepiece, build_tiny_tokenizer

CORPUS = DEFAULT_CORPUS + [
    "What is 3 + 5? The answer is 8. Let us check: 3 + 5 = 8.",
    "Compute the area of a circle of radius 2: pi r^2 = 4 pi.",
    "Ünïcödé text, émoji-free, with tabs\tand\nnewlines.",
    "<|im_start|>user\nQuestion<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nAnswer<|im_end|>\n",
]


def make_pairs(n=24, seed=0):
    """Plain-string pairs with varied lengths, unicode and newlines."""
    import random

    rng = random.Random(seed)
    words = "solve the equation first we add subtract both sides so x equals answer boxed check step".split()
    out = []
    for i in range(n):
        q = f"Problem {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + "?"
        good = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) + f"\nTherefore, the final answer is: $\\boxed{{{i}}}$."
        bad = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) + f" é\n\\boxed{{{i + 1}}}"
        out.append({"prompt": q, "chosen": good, "rejected": bad})
    return out


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


@pytest.fixture(scope="session")
def hf_tok(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("hf_tok")), CORPUS, vocab_size=420)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    return build_tiny_sentencepiece(os.path.join(str(tmp_path_factory.mktemp("sp")), "tiny"), CORPUS, 400)


@pytest.fixture(scope="session")
def hf(hf_tok):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_tok)


@pytest.fixture
def pairs():
    return make_pairs()
