"""Packing: round trip through Megatron-Core's IndexedDataset, TRL token ids, presets, formats, masks."""
import json
import os

import numpy as np
import pytest

from megatron_spot.data import PairDataset, PairTokenizer, collate_pairs, pack_pairs, tokenizer_hash
from megatron_spot.data.indexed import IndexedWriter
from megatron_spot.data.tokenization import token_dtype

from .conftest import make_pairs, write_jsonl


def trl_reference_ids(encode, eos, prompt, chosen, rejected):
    """TRL 0.20 DPOTrainer.tokenize_row for plain strings: separate, no special tokens, EOS on responses."""
    return encode(prompt), encode(chosen) + [eos], encode(rejected) + [eos]


def megatron_pairs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    docs = ds.document_indices
    assert np.array_equal(docs, 3 * np.arange(len(docs)))
    return [tuple(ds[int(s)].tolist() for s in range(docs[k], docs[k + 1])) for k in range(len(docs) - 1)]


def test_plain_strings_match_trl_hf(tmp_path, hf_tok, hf, pairs):
    src = write_jsonl(tmp_path / "p.jsonl", pairs)
    m = pack_pairs([src], hf_tok, str(tmp_path / "out/pack"))
    assert m["counts"]["kept"] == len(pairs) and m["dtype"] == "uint16"
    got = megatron_pairs(str(tmp_path / "out/pack"))

    def enc(t):
        return hf(t, add_special_tokens=False)["input_ids"]

    for rec, (p, c, r) in zip(pairs, got):
        assert (p, c, r) == trl_reference_ids(enc, hf.eos_token_id, rec["prompt"], rec["chosen"], rec["rejected"])
        assert hf.decode(p) == rec["prompt"]
        assert hf.decode(c) == rec["chosen"] + hf.eos_token


def test_plain_strings_match_trl_sentencepiece(tmp_path, sp_model, pairs):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    src = write_jsonl(tmp_path / "p.jsonl", pairs)
    pack_pairs([src], sp_model, str(tmp_path / "pack"), preset="rectify")
    ds = PairDataset(str(tmp_path / "pack"), expected_tokenizer_hash=tokenizer_hash(sp_model))
    assert ds.manifest["tokenizer"]["kind"] == "sentencepiece"
    for i, rec in enumerate(pairs):
        p, c, r = (a.tolist() for a in ds.pair(i))
        assert (p, c, r) == trl_reference_ids(sp.encode, sp.eos_id(), rec["prompt"], rec["chosen"], rec["rejected"])
        assert sp.decode(p) == rec["prompt"] and sp.decode(c[:-1]) == rec["chosen"]
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 1000 and clone.fingerprint == ds.fingerprint
    assert all((a == b).all() for a, b in zip(clone.pair(3), ds.pair(3)))


def test_chat_template_round_trip(tmp_path, hf_tok, hf, pairs):
    """Conversational TRL pairs and plain strings with --apply-chat-template decode to the template text."""
    conv = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs]
    a = pack_pairs([write_jsonl(tmp_path / "conv.jsonl", conv)], hf_tok, str(tmp_path / "conv"))
    b = pack_pairs([write_jsonl(tmp_path / "plain.jsonl", pairs)], hf_tok, str(tmp_path / "plain"),
                   apply_chat_template=True, system_prompt="Be brief.")
    assert a["fingerprint"] == b["fingerprint"]
    got = megatron_pairs(str(tmp_path / "conv"))
    for rec, (p, c, r) in zip(conv, got):
        prompt_text = hf.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        assert prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # non-thinking block
        assert hf.decode(p) == prompt_text
        for resp, ids in ((rec["chosen"], c), (rec["rejected"], r)):
            full = hf.apply_chat_template(rec["prompt"] + resp, tokenize=False, enable_thinking=False)
            assert hf.decode(p + ids) == full + hf.eos_token
            # TRL: the response text after the prompt, tokenised alone, then EOS
            assert ids == hf(full[len(prompt_text):], add_special_tokens=False)["input_ids"] + [hf.eos_token_id]


def test_masks_cover_exactly_the_responses(tmp_path, hf_tok, pairs):
    pack_pairs([write_jsonl(tmp_path / "p.jsonl", pairs)], hf_tok, str(tmp_path / "pack"), apply_chat_template=True)
    ds = PairDataset(str(tmp_path / "pack"))
    idx = [3, 0, 7]
    b = collate_pairs(ds, idx, ds.pad_token_id, pad_to_multiple_of=16)
    B = len(idx)
    L = b["tokens"].shape[1]
    assert L % 16 == 0 and b["tokens"].shape == (2 * B, L) and b["loss_mask"].dtype.is_floating_point
    assert b["pair_indices"].tolist() == idx
    assert (b["position_ids"] == np.arange(L)).all()
    for row in range(2 * B):
        p, c, r = ds.pair(idx[row % B])
        resp = c if row < B else r
        n = len(p) + len(resp)
        assert b["tokens"][row, :n].tolist() == p.tolist() + resp.tolist()
        assert (b["tokens"][row, n:] == ds.pad_token_id).all()
        assert b["labels"][row, :L - 1].tolist() == b["tokens"][row, 1:].tolist()
        assert b["labels"][row, L - 1] == ds.pad_token_id
        m = b["loss_mask"][row].numpy().astype(bool)
        assert b["labels"][row][m].tolist() == resp.tolist()          # exactly the response, EOS included
        assert np.flatnonzero(m).tolist() == list(range(len(p) - 1, n - 1))
    # max_length: the response start and prompt end are kept
    short = collate_pairs(ds, idx, ds.pad_token_id, max_length=20)
    assert short["tokens"].shape[1] <= 20 and (short["loss_mask"].sum(1) >= 1).all()


@pytest.mark.parametrize("preset,rename", [
    ("spot", {"prompt": "question", "chosen": "gemini_corrected_answer", "rejected": "original_answer"}),
    ("spot", {"prompt": "prompt", "chosen": "gemini_corrected_answer", "rejected": "original_answer"}),
    ("trl", {}),
    ("rectify", {}),
])
def test_presets(tmp_path, hf_tok, pairs, preset, rename):
    recs = [{rename.get(k, k): v for k, v in r.items()} for r in pairs]
    if preset == "rectify":
        for i, r in enumerate(recs):
            r["metadata"] = {"index": i, "change_ratio": 0.2}
    # spot defaults to the authors' pipeline: chat messages rendered as TRL 0.20 does, keep-end truncation
    authors = dict(apply_chat_template=True, chat_template_mode="authors", truncation="keep-end") \
        if preset == "spot" else {}
    ref = pack_pairs([write_jsonl(tmp_path / "ref.jsonl", pairs)], hf_tok, str(tmp_path / "ref"), **authors)
    m = pack_pairs([write_jsonl(tmp_path / "in.jsonl", recs)], hf_tok, str(tmp_path / "out"), preset=preset)
    assert m["counts"]["kept"] == len(pairs) and m["fingerprint"] == ref["fingerprint"]
    assert m["field_mapping"]["preset"] == preset


def test_field_flags_and_implicit_prompt(tmp_path, hf_tok, pairs):
    recs = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in pairs]
    ref = pack_pairs([write_jsonl(tmp_path / "ref.jsonl", pairs)], hf_tok, str(tmp_path / "ref"))
    m = pack_pairs([write_jsonl(tmp_path / "f.jsonl", recs)], hf_tok, str(tmp_path / "f"),
                   prompt_field="q", chosen_field="good", rejected_field="bad")
    assert m["fingerprint"] == ref["fingerprint"]
    # TRL implicit-prompt conversational format == explicit prompt
    explicit = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs]
    implicit = [{"chosen": e["prompt"] + e["chosen"], "rejected": e["prompt"] + e["rejected"]} for e in explicit]
    a = pack_pairs([write_jsonl(tmp_path / "e.jsonl", explicit)], hf_tok, str(tmp_path / "e"))
    b = pack_pairs([write_jsonl(tmp_path / "i.jsonl", implicit)], hf_tok, str(tmp_path / "i"))
    assert a["fingerprint"] == b["fingerprint"]


def test_input_formats_and_multiple_files(tmp_path, hf_tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = make_pairs(40, seed=3)
    ref = pack_pairs([write_jsonl(tmp_path / "all.jsonl", pairs)], hf_tok, str(tmp_path / "ref"))
    a, b, c, d = pairs[:10], pairs[10:20], pairs[20:30], pairs[30:]
    with open(tmp_path / "b.json", "w") as f:
        json.dump(b, f)
    pq.write_table(pa.Table.from_pylist(c), tmp_path / "c.parquet")
    datasets.Dataset.from_list(d).save_to_disk(str(tmp_path / "d_ds"))
    inputs = [write_jsonl(tmp_path / "a.jsonl", a), str(tmp_path / "b.json"), str(tmp_path / "c.parquet"),
              str(tmp_path / "d_ds")]
    m = pack_pairs(inputs, hf_tok, str(tmp_path / "multi"), chunk_size=4)
    assert m["fingerprint"] == ref["fingerprint"]
    assert [s["format"] for s in m["inputs"]] == ["jsonl", "json", "parquet", "hf_disk"]
    assert [s["records"] for s in m["inputs"]] == [10, 10, 10, 10]


def test_workers_give_identical_pack(tmp_path, hf_tok):
    pairs = make_pairs(60, seed=5)
    src = write_jsonl(tmp_path / "p.jsonl", pairs, extra_lines=["not json"])
    one = pack_pairs([src], hf_tok, str(tmp_path / "one"), apply_chat_template=True, chunk_size=7)
    two = pack_pairs([src], hf_tok, str(tmp_path / "two"), apply_chat_template=True, chunk_size=7, workers=2)
    assert one["fingerprint"] == two["fingerprint"]
    assert one["counts"] == two["counts"] and one["counts"]["dropped_by_reason"]["malformed_json"] == 1
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"one{ext}", "rb").read() == open(tmp_path / f"two{ext}", "rb").read()


def test_writer_is_byte_identical_to_megatron_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int32):
        docs = [[rng.integers(0, 60000, rng.integers(0, 9)) for _ in range(3)] for _ in range(25)]
        builder = IndexedDatasetBuilder(str(tmp_path / f"mc_{dtype.__name__}.bin"), dtype=dtype)
        for doc in docs:
            for seq in doc:
                builder.add_item(torch.tensor(seq, dtype=torch.int64))
            builder.end_document()
        builder.finalize(str(tmp_path / f"mc_{dtype.__name__}.idx"))
        w = IndexedWriter(str(tmp_path / f"me_{dtype.__name__}.bin"), dtype)
        for k in range(0, 25, 10):   # several batches
            part = docs[k:k + 10]
            w.add_documents(np.concatenate([s for d in part for s in d]),
                            np.array([len(s) for d in part for s in d]), 3)
        w.finalize(str(tmp_path / f"me_{dtype.__name__}.idx"))
        for ext in (".bin", ".idx"):
            assert open(tmp_path / f"mc_{dtype.__name__}{ext}", "rb").read() == \
                open(tmp_path / f"me_{dtype.__name__}{ext}", "rb").read()


def test_token_dtype_rule():
    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32 and token_dtype(151936) == np.int32


def test_tokenizer_hash(tmp_path, hf_tok, sp_model):
    import shutil

    h = tokenizer_hash(hf_tok)
    copy = tmp_path / "model_dir"
    shutil.copytree(hf_tok, copy)
    (copy / "config.json").write_text("{}")            # model files do not change the tokenizer hash
    assert tokenizer_hash(str(copy)) == h
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] += " "
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_hash(str(copy)) != h
    assert tokenizer_hash(sp_model) not in (h, tokenizer_hash(str(copy)))
    assert PairTokenizer(hf_tok).hash == h


def test_sentencepiece_with_chat_template_file(tmp_path, sp_model):
    import sentencepiece as spm

    from megatron_spot.data.tiny_tokenizer import QWEN3_STYLE_CHAT_TEMPLATE

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    conv = [{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    src = write_jsonl(tmp_path / "c.jsonl", conv)
    with pytest.raises(Exception, match="no chat template"):
        pack_pairs([src], sp_model, str(tmp_path / "none"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith("none")]
    pack_pairs([src], sp_model, str(tmp_path / "p"), chat_template=QWEN3_STYLE_CHAT_TEMPLATE)
    p, c, r = (a.tolist() for a in PairDataset(str(tmp_path / "p")).pair(0))
    prompt = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert p == sp.encode(prompt) and c == sp.encode("4<|im_end|>\n") + [sp.eos_id()]
