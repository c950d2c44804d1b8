"""Bad input: count-and-skip by default, --strict fails, nothing partial is left; corrupt packs are refused."""
import json
import os
import re
import struct

import numpy as np
import pytest

from megatron_spot.data import (PackError, PackFormatError, PairDataset, TokenizerMismatchError, pack_pairs,
                                tokenizer_hash)

from .conftest import make_pairs, write_jsonl

BAD = [
    ("malformed_json", '{"prompt": "a", "chosen": "b", "rejected": '),
    ("not_an_object", '["a", "b", "c"]'),
    ("missing_field", json.dumps({"prompt": "a", "chosen": "b"})),
    ("missing_field", json.dumps({"chosen": "b", "rejected": "c"})),
    ("bad_type", json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"})),
    ("bad_type", json.dumps({"prompt": ["x"], "chosen": "b", "rejected": "c"})),
    ("bad_type", json.dumps({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"})),
    ("empty_prompt", json.dumps({"prompt": "  ", "chosen": "b", "rejected": "c"})),
    ("empty_response", json.dumps({"prompt": "a", "chosen": "", "rejected": "c"})),
    ("empty_response", json.dumps({"prompt": "a", "chosen": "b", "rejected": " \n"})),
    ("identical_responses", json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"})),
]


def _leftovers(d):
    return sorted(f for f in os.listdir(d) if ".tmp-" in f)


def test_default_counts_and_skips(tmp_path, hf_tok):
    good = make_pairs(8)
    src = write_jsonl(tmp_path / "in.jsonl", good, extra_lines=[line for _, line in BAD])
    seen = []
    m = pack_pairs([src], hf_tok, str(tmp_path / "out"), on_error=lambda *a: seen.append(a))
    c = m["counts"]
    assert c["read"] == len(good) + len(BAD) and c["kept"] == len(good) and c["dropped"] == len(BAD)
    expected = {}
    for reason, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert {k: v for k, v in c["dropped_by_reason"].items() if v} == expected
    # every skipped record is named by file:line, in input order
    wheres = [e["where"] for e in m["dropped_examples"]]
    assert wheres == [f"{src}:{len(good) + k + 1}" for k in range(len(BAD))]
    assert [w for _, w, _ in seen] == wheres
    assert len(PairDataset(str(tmp_path / "out"))) == len(good)


@pytest.mark.parametrize("reason,line", BAD[:1] + BAD[2:3] + BAD[4:5] + BAD[8:9] + BAD[10:11])
def test_strict_fails_and_leaves_nothing(tmp_path, hf_tok, reason, line):
    src = write_jsonl(tmp_path / "in.jsonl", make_pairs(5), extra_lines=[line])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PackError, match=rf"in\.jsonl:6: .*\[{reason}\]"):
        pack_pairs([src], hf_tok, str(out / "pack"), strict=True, chunk_size=2)
    assert os.listdir(out) == []


def test_over_length_truncate_and_drop(tmp_path, hf_tok, hf):
    long_prompt = "word " * 80
    recs = [{"prompt": long_prompt, "chosen": "short good", "rejected": "short bad"},
            {"prompt": "short", "chosen": "good " * 80, "rejected": "bad"},
            {"prompt": "fits", "chosen": "yes", "rejected": "no"}]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    m = pack_pairs([src], hf_tok, str(tmp_path / "t"), max_length=40, max_prompt_length=20)
    assert m["counts"]["kept"] == 3 and m["counts"]["truncated_prompt"] == 1 and m["counts"]["truncated_response"] == 1
    ds = PairDataset(str(tmp_path / "t"))
    p0 = ds.pair(0)[0].tolist()
    full_p0 = hf(long_prompt, add_special_tokens=False)["input_ids"]
    assert p0 == full_p0[-20:]                                   # prompt: left truncation
    p1, c1, r1 = (a.tolist() for a in ds.pair(1))
    full_c1 = hf("good " * 80, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    assert c1 == full_c1[:40 - len(p1)] and len(p1) + len(c1) == 40  # response: right truncation
    assert ds.lengths().max() <= 40
    d = pack_pairs([src], hf_tok, str(tmp_path / "d"), max_length=40, max_prompt_length=20, truncation="drop")
    assert d["counts"]["kept"] == 1 and d["counts"]["dropped_by_reason"]["over_length"] == 2
    with pytest.raises(PackError, match="over_length"):
        pack_pairs([src], hf_tok, str(tmp_path / "s"), max_length=40, max_prompt_length=20, truncation="drop",
                   strict=True)
    assert _leftovers(tmp_path) == [] and not os.path.exists(tmp_path / "s.bin")


def test_no_pairs_kept_is_an_error(tmp_path, hf_tok):
    src = write_jsonl(tmp_path / "in.jsonl", [], extra_lines=[line for _, line in BAD])
    with pytest.raises(PackError, match="no pairs kept"):
        pack_pairs([src], hf_tok, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_failed_repack_keeps_previous_pack(tmp_path, hf_tok):
    src = write_jsonl(tmp_path / "in.jsonl", make_pairs(6), extra_lines=[BAD[0][1]])
    first = pack_pairs([src], hf_tok, str(tmp_path / "pack"))
    with pytest.raises(PackError):
        pack_pairs([src], hf_tok, str(tmp_path / "pack"), strict=True)
    assert PairDataset(str(tmp_path / "pack")).fingerprint == first["fingerprint"]
    assert _leftovers(tmp_path) == []


def test_cli_exit_codes(tmp_path, hf_tok, capsys):
    from tools.pack_pairs import main

    src = write_jsonl(tmp_path / "in.jsonl", make_pairs(4), extra_lines=[BAD[0][1]])
    assert main(["-i", src, "-t", hf_tok, "-o", str(tmp_path / "ok"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "packed 4 of 5 pairs" in out and "malformed_json 1" in out
    assert main(["-i", src, "-t", hf_tok, "-o", str(tmp_path / "bad"), "-q", "--strict"]) == 2  # bad input (exit-code convention)
    assert "in.jsonl:5" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad.bin")
    assert main(["-i", str(tmp_path / "missing.jsonl"), "-t", hf_tok, "-o", str(tmp_path / "x"), "-q"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--truncation" in capsys.readouterr().out


# ---- corrupt packs ---------------------------------------------------------------------------------
@pytest.fixture
def pack(tmp_path, hf_tok):
    prefix = str(tmp_path / "pack")
    pack_pairs([write_jsonl(tmp_path / "in.jsonl", make_pairs(10))], hf_tok, prefix)
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, drop):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - drop)


@pytest.mark.parametrize("damage,match", [
    (lambda p: _patch(p + ".idx", 0, b"XXIDIDX\x00\x00"), "bad magic"),
    (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), "unsupported index version 2"),
    (lambda p: _patch(p + ".idx", 17, b"\x63"), "unknown dtype code"),
    (lambda p: _truncate(p + ".idx", 8), "index truncated"),
    (lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 20), "truncated index"),
    (lambda p: _truncate(p + ".bin", 2), "data file truncated"),
    (lambda p: open(p + ".bin", "ab").write(b"\0\0"), "larger than its index"),
    (lambda p: _patch(p + ".idx", 34, struct.pack("<i", 7)), "pointers disagree"),
    (lambda p: os.remove(p + ".idx"), "index file not found"),
    (lambda p: os.remove(p + ".manifest.json"), "manifest not found"),
    (lambda p: open(p + ".manifest.json", "w").write("{"), "corrupt manifest"),
    (lambda p: _edit_manifest(p, format_version=99), "format version 99"),
    (lambda p: _edit_manifest(p, num_pairs=11), "manifest says 11"),
])
def test_corrupt_pack_is_refused(pack, damage, match):
    damage(pack)
    with pytest.raises(PackFormatError, match=match):
        PairDataset(pack)


def _edit_manifest(prefix, **kv):
    with open(prefix + ".manifest.json") as f:
        m = json.load(f)
    m.update(kv)
    with open(prefix + ".manifest.json", "w") as f:
        json.dump(m, f)


def test_bin_corruption_detected_with_verify(pack):
    PairDataset(pack, verify_data=True)
    _patch(pack + ".bin", 4, b"\x01\x02")
    PairDataset(pack)   # size checks pass; content is only checked on request
    with pytest.raises(PackFormatError, match="checksum"):
        PairDataset(pack, verify_data=True)


def test_tokenizer_mismatch_is_refused(pack, hf_tok, sp_model):
    PairDataset(pack, expected_tokenizer_hash=tokenizer_hash(hf_tok))
    with pytest.raises(TokenizerMismatchError, match="re-pack"):
        PairDataset(pack, expected_tokenizer_hash=tokenizer_hash(sp_model))


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_pair(pack, hf_tok):
    """Training checks every id against the model's vocabulary at load (vectorised, in blocks)."""
    import transformers

    vocab = len(transformers.AutoTokenizer.from_pretrained(hf_tok))
    ds = PairDataset(pack)
    ds.check_token_ids(vocab)
    largest = [max(int(s.max()) for s in ds.pair(i)) for i in range(len(ds))]
    top = max(largest)
    with pytest.raises(PackFormatError, match=rf"pack\.bin: token id {top} .*\(pair {largest.index(top)}\)"):
        ds.check_token_ids(top)  # a model whose vocabulary stops just below the largest id
    # a flipped byte inside pair 7's rejected response (sizes still agree with the index)
    start = int(ds._starts[7, 2]) * ds.dtype.itemsize
    _patch(pack + ".bin", start + ds.dtype.itemsize, b"\xff" * ds.dtype.itemsize)
    damaged = PairDataset(pack)
    with pytest.raises(PackFormatError, match=r"\(pair 7\) is outside the model's vocabulary"):
        damaged.check_token_ids(vocab, block_tokens=5)  # several blocks: the position maps back exactly


# ---- chat templates that raise or that the sandbox refuses ------------------------------------------
PICKY_TEMPLATE = ("{% if messages[0]['content'] == 'refuse me' %}{{ raise_exception('roles must alternate') }}{% endif %}"
                  "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_template_that_raises_skips_that_record(tmp_path, hf_tok):
    """HF templates call raise_exception(...) to refuse a conversation: that record is counted and skipped
    (reason chat_template_error, file:line), the rest are packed; under --strict it is the one error."""
    src = write_jsonl(tmp_path / "in.jsonl", make_pairs(3) + [{"prompt": "refuse me", "chosen": "a", "rejected": "b"}])
    m = pack_pairs([src], hf_tok, str(tmp_path / "p"), apply_chat_template=True, chat_template=PICKY_TEMPLATE)
    assert m["counts"]["kept"] == 3 and m["counts"]["dropped_by_reason"]["chat_template_error"] == 1
    assert m["dropped_examples"] == [{"reason": "chat_template_error", "where": f"{src}:4",
                                      "message": "the --chat-template template raised: roles must alternate"}]
    with pytest.raises(PackError, match=r"in\.jsonl:4: the --chat-template template raised: roles must alternate"):
        pack_pairs([src], hf_tok, str(tmp_path / "s"), apply_chat_template=True, chat_template=PICKY_TEMPLATE,
                   strict=True)
    assert _leftovers(tmp_path) == [] and not os.path.exists(tmp_path / "s.bin")


@pytest.mark.parametrize("template,message", [
    ("{{ raise_exception('this template refuses everything') }}",
     r"no pairs kept out of 2 read \(chat_template_error: 2\); the first: .*in\.jsonl:1: the --chat-template "
     r"template raised: this template refuses everything"),
    ("{{ messages.__class__.__mro__ }}", "the --chat-template template does something the sandbox refuses: "
                                         "access to attribute '__class__'"),
    ("{% for m in messages %}{{ m['content'] }", r"the --chat-template template: line 1: unexpected '}'"),
])
def test_cli_template_failures_are_one_line(tmp_path, hf_tok, capsys, template, message):
    from tools.pack_pairs import main

    src = write_jsonl(tmp_path / "in.jsonl", make_pairs(2))
    (tmp_path / "t.jinja").write_text(template)
    argv = ["-i", src, "-t", hf_tok, "-o", str(tmp_path / "out" / "p"), "--apply-chat-template", "--chat-template",
            str(tmp_path / "t.jinja"), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pack_pairs: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not os.path.exists(tmp_path / "out")


def test_cli_empty_and_wrongly_typed_inputs_say_so(tmp_path, hf_tok, capsys):
    from tools.pack_pairs import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["-i", str(empty), "-t", hf_tok, "-o", str(tmp_path / "e"), "-q"]) == 2
    assert "no pairs kept out of 0 read (empty input)" in capsys.readouterr().err
    typed = write_jsonl(tmp_path / "typed.jsonl", [], extra_lines=[BAD[4][1], BAD[5][1]])
    assert main(["-i", typed, "-t", hf_tok, "-o", str(tmp_path / "t"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no pairs kept out of 2 read (bad_type: 2); the first: " in err and "typed.jsonl:1" in err
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl", "typed.jsonl"]
