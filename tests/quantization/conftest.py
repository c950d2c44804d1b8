"""Shared fixture of the quantized-export tests: one tiny HF Qwen3, its tokenizer and a pack made with
that tokenizer, built once for the folder (every test writes its exports into its own folder)."""
import json
import random

import pytest


@pytest.fixture(scope="package")
def tiny_hf_and_pack(tmp_path_factory):
    """dict(root, hf=HF folder with the tokenizer stored beside the weights, pack=pack prefix,
    model=the transformers model that was saved)."""
    from megatron_spot.data import build_tiny_tokenizer, pack_pairs
    from tests.tiny import hf_model

    root = tmp_path_factory.mktemp("quant")
    rng = random.Random(0)
    words = "solve the equation first we add subtract both sides so x equals answer boxed check step".split()
    recs = [{"prompt": f"Problem {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 30))) + "?",
             "chosen": " ".join(rng.choice(words) for _ in range(8)), "rejected": " ".join(rng.choice(words) for _ in range(8))}
            for i in range(40)]
    src = root / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    hf = str(root / "hf")
    # the tokenizer lives in the checkpoint folder: export checks the pack against the tokenizer it finds there
    build_tiny_tokenizer(hf, [r["prompt"] + " " + r["chosen"] for r in recs], vocab_size=400)
    _, model = hf_model("qwen3-tiny")
    model.save_pretrained(hf)
    pack_pairs([str(src)], hf, str(root / "pack"))
    return {"root": root, "hf": hf, "pack": str(root / "pack"), "model": model}
