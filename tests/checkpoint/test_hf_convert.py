"""HF <-> Megatron-Core conversion at TP1PP1 in this process: logit parity, bit-exact round trips,
vocab padding, sharded input/output, dtype handling, and errors that name the bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megatron_spot.checkpoint import hf_convert as hc
from megatron_spot.checkpoint import model_checkpoint as model_ckpt
from megatron_spot.models import build_unsharded_model
from megatron_spot.checkpoint.errors import CheckpointError
from megatron_spot.config.loader import ConfigError
from megatron_spot.models.gpt.state_dict import hf_to_mcore_state_dict, mapping_table
from tests.checkpoint import helpers


def _mcore_tp1(ckpt: str, dtype: str = "fp32"):
    chunks = build_unsharded_model(model_ckpt.checkpoint_model_config(ckpt), dtype)
    model_ckpt.load_model_checkpoint(chunks, ckpt)
    return chunks


@torch.no_grad()
def _mcore_logits(chunks, tok, pos, vocab):
    return chunks[0](tok, pos, None)[..., :vocab].float()


@pytest.mark.parametrize("name", ["untied", "tied", "vocab300", "llama", "llama-tied", "moe", "moe-mixed"])
def test_logits_match_transformers_tp1pp1(ckpts, name):
    c = ckpts[name]
    chunks = _mcore_tp1(c["mcore"])
    logits = _mcore_logits(chunks, c["tok"], c["pos"], c["vocab"])
    diff = (logits - c["ref"]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs logit diff {diff}"
    # what was loaded equals the foundation's whole-model mapping, padded rows are zero
    cfg = model_ckpt.checkpoint_model_config(c["mcore"])
    expected = hf_to_mcore_state_dict(helpers.read_hf_tensors(c["hf"]), cfg)
    params = model_ckpt._params_by_name(chunks)
    assert set(params) == set(expected)
    for k, v in expected.items():
        assert torch.equal(params[k], v), k
    if c["vocab"] == 300:
        assert params["embedding.word_embeddings.weight"].shape[0] == 384
        assert not params["embedding.word_embeddings.weight"][300:].any()


@pytest.mark.parametrize("name", ["untied", "tied", "vocab300", "llama", "llama-tied", "moe", "moe-mixed"])
def test_round_trip_bit_exact_and_from_pretrained(ckpts, name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    c = ckpts[name]
    out = str(tmp_path / "export")
    summary = hc.convert_mcore_to_hf(c["mcore"], out, progress=False)
    src, dst = helpers.read_hf_tensors(c["hf"]), helpers.read_hf_tensors(out)
    assert set(src) == set(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    assert summary["tensors"] == len(src)
    cfgj = json.load(open(os.path.join(out, "config.json")))
    assert cfgj["torch_dtype"] == "float32" and cfgj["tie_word_embeddings"] == c["model"].config.tie_word_embeddings
    # the architecture (family, rope scaling, token ids) survives the trip through our checkpoint
    from megatron_spot.models import config_from_hf_dict

    assert config_from_hf_dict(cfgj) == config_from_hf_dict(json.load(open(os.path.join(c["hf"], "config.json"))))
    for f in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert torch.equal(model(c["tok"]).logits, c["ref"])


@pytest.mark.parametrize("name", ["untied", "llama"])
def test_sharded_export_and_bf16(ckpts, tmp_path, name):
    """bf16 conversion of an fp32 source, size-capped shards with an index, bf16 -> fp32 export."""
    c = ckpts[name]
    mc = str(tmp_path / "bf16")
    hc.convert_hf_to_mcore(c["hf"], mc, dtype="bf16", progress=False)
    meta = model_ckpt.read_checkpoint_metadata(mc)
    assert meta["dtype"] == "bf16" and meta["hf_config"]["torch_dtype"] == "bfloat16"
    out = str(tmp_path / "hf-bf16")
    s = hc.convert_mcore_to_hf(mc, out, progress=False, max_shard_bytes=100_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(s["files"]) > 1 and "model.safetensors" not in os.listdir(out)
    assert all(os.path.getsize(os.path.join(out, f)) <= 100_000 + 4096 for f in files)
    src, dst = helpers.read_hf_tensors(c["hf"]), helpers.read_hf_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in dst.values())
    for k in src:
        assert dst[k].dtype == torch.bfloat16 and torch.equal(dst[k], src[k].to(torch.bfloat16)), k
    # bf16 HF -> bf16 mcore -> HF is bit-exact too (norms are kept in fp32 by the local spec)
    mc2 = str(tmp_path / "bf16-again")
    hc.convert_hf_to_mcore(out, mc2, dtype="bf16", progress=False)
    out2 = str(tmp_path / "hf-bf16-again")
    hc.convert_mcore_to_hf(mc2, out2, progress=False)
    again = helpers.read_hf_tensors(out2)
    assert all(torch.equal(again[k], dst[k]) for k in dst)
    # an export in another dtype than the checkpoint's
    out3 = str(tmp_path / "hf-fp32-from-bf16")
    hc.convert_mcore_to_hf(mc, out3, dtype="fp32", progress=False)
    f32 = helpers.read_hf_tensors(out3)
    for k in dst:  # the local spec keeps norm weights in fp32 even in a bf16 model: they come back exact
        want = src[k] if "norm" in k else src[k].to(torch.bfloat16).float()
        assert f32[k].dtype == torch.float32 and torch.equal(f32[k], want), k
    # a bf16 checkpoint loads into an fp32 model (training in fp32 from a bf16 checkpoint)
    chunks = _mcore_tp1(mc, "fp32")
    params = model_ckpt._params_by_name(chunks)
    assert torch.equal(params["decoder.layers.0.mlp.linear_fc2.weight"],
                       src["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16).float())


def test_metadata_and_layout(ckpts):
    c = ckpts["untied"]
    names = sorted(os.listdir(c["mcore"]))
    for f in (".metadata", "metadata.json", model_ckpt.METADATA_NAME, "config.json", "generation_config.json",
              "tokenizer_config.json", "chat_template.jinja"):
        assert f in names, f
    assert not [n for n in os.listdir(os.path.dirname(c["mcore"])) if ".tmp-" in n]
    meta = model_ckpt.read_checkpoint_metadata(c["mcore"])
    assert meta["dtype"] == "fp32" and meta["saved_layout"] == {"tp": 1, "pp": 1, "vpp": None}
    assert meta["hf_config"]["vocab_size"] == 512 and meta["padded_vocab_size"] == 512
    s = c["summary"]
    assert s["tensors"] == len(mapping_table(model_ckpt.checkpoint_model_config(c["mcore"]))) and s["bytes"] > 0
    # layouts that do not fit: named, before anything is loaded
    cfg = model_ckpt.checkpoint_model_config(c["mcore"])
    with pytest.raises(CheckpointError, match="does not divide the 2 query groups"):
        model_ckpt.check_layout(cfg, tp=4)
    with pytest.raises(CheckpointError, match="layers do not split"):
        model_ckpt.check_layout(cfg, tp=1, pp=3)
    model_ckpt.check_layout(cfg, tp=2, pp=2, vpp=2)


def test_load_into_wrong_model_is_named(ckpts):
    c = ckpts["untied"]
    other = model_ckpt.checkpoint_model_config(ckpts["tied"]["mcore"])
    chunks = build_unsharded_model(other, "fp32")
    with pytest.raises(CheckpointError, match="tie_word_embeddings: checkpoint False, model True"):
        model_ckpt.load_model_checkpoint(chunks, c["mcore"])
    with pytest.raises(CheckpointError, match="Hugging Face checkpoint"):
        model_ckpt.read_checkpoint_metadata(c["hf"])


def test_save_model_checkpoint_single_rank(ckpts, tmp_path):
    """save_model_checkpoint (world of 1) writes the hf-to-mcore format and replaces atomically."""
    c = ckpts["tied"]
    chunks = _mcore_tp1(c["mcore"])
    out = str(tmp_path / "run" / "checkpoints" / "step_1" / "model")
    cfg = model_ckpt.checkpoint_model_config(c["mcore"])
    model_ckpt.save_model_checkpoint(chunks, out, cfg, hf_side_files_from=c["hf"])
    model_ckpt.save_model_checkpoint(chunks, out, cfg, hf_side_files_from=c["mcore"])  # overwrite in place
    assert sorted(os.listdir(os.path.dirname(out))) == ["model"]
    assert os.path.isfile(os.path.join(out, "chat_template.jinja"))
    export = str(tmp_path / "export")
    hc.convert_mcore_to_hf(out, export, progress=False)
    src, dst = helpers.read_hf_tensors(c["hf"]), helpers.read_hf_tensors(export)
    assert set(src) == set(dst) and all(torch.equal(src[k], dst[k]) for k in src)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _copy_hf(c, tmp_path, name="bad"):
    dst = str(tmp_path / name)
    shutil.copytree(c["hf"], dst)
    return dst


def _resave(folder, tensors):
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors(ckpts, tmp_path):
    c = ckpts["untied"]
    tensors = helpers.read_hf_tensors(c["hf"])
    bad = _copy_hf(c, tmp_path)
    out = str(tmp_path / "out")
    t = dict(tensors)
    del t["model.layers.2.self_attn.k_proj.weight"]
    _resave(bad, t)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.2\.self_attn\.k_proj\.weight"):
        hc.convert_hf_to_mcore(bad, out, progress=False)
    t = dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    _resave(bad, t)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.q_proj\.bias"):
        hc.convert_hf_to_mcore(bad, out, progress=False)
    t = dict(tensors, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(100, 64)})
    _resave(bad, t)
    with pytest.raises(CheckpointError, match=r"shape mismatch: model\.layers\.1\.mlp\.up_proj\.weight has shape \[100, 64\]"):
        hc.convert_hf_to_mcore(bad, out, progress=False)
    assert not os.path.exists(out)


def test_corrupt_safetensors_named(ckpts, tmp_path):
    c = ckpts["vocab300"]  # sharded: the error must name the broken shard
    bad = _copy_hf(c, tmp_path)
    shard = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[1]
    path = os.path.join(bad, shard)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=rf"corrupt safetensors file .*{shard}.*truncated"):
        hc.convert_hf_to_mcore(bad, out, progress=False)
    with open(path, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match=rf"corrupt safetensors file .*{shard}: header is not valid JSON"):
        hc.convert_hf_to_mcore(bad, out, progress=False)
    with open(path, "wb") as f:
        f.write(b"\x00" * 5)
    with pytest.raises(CheckpointError, match=rf"corrupt safetensors file .*{shard}"):
        hc.convert_hf_to_mcore(bad, out, progress=False)
    assert not os.path.exists(out)


@pytest.mark.parametrize("change,match", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"use_sliding_window": True, "sliding_window": 128}, "sliding-window attention"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "unsupported model_type 'mistral'"),
    ({"model_type": "qwen3", "architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
    # Qwen3 weights labelled as Llama: the q/k norms are named as what a Llama does not have
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, r"unexpected tensor\(s\) .*q_norm"),
])
def test_unsupported_config_named(ckpts, tmp_path, change, match):
    bad = _copy_hf(ckpts["untied"], tmp_path)
    path = os.path.join(bad, "config.json")
    cfg = json.load(open(path))
    cfg.update(change)
    json.dump(cfg, open(path, "w"))
    with pytest.raises((ConfigError, CheckpointError), match=match):
        hc.convert_hf_to_mcore(bad, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, "rope_type='yarn' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "lacks low_freq_factor, high_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 256}, "high_freq_factor > low_freq_factor"),
])
def test_llama_rope_types_refused_by_name(ckpts, tmp_path, rope, match):
    bad = _copy_hf(ckpts["llama"], tmp_path)
    path = os.path.join(bad, "config.json")
    cfg = json.load(open(path))
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = rope
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ConfigError, match=match):
        hc.convert_hf_to_mcore(bad, str(tmp_path / "out"), progress=False)


def test_existing_output_and_interrupted_conversion(ckpts, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    c = ckpts["untied"]
    with pytest.raises(CheckpointError, match="already exists"):
        hc.convert_hf_to_mcore(c["hf"], c["mcore"], progress=False)
    out = str(tmp_path / "out")
    real_save = dist_checkpointing.save

    def save_then_die(sharded, folder, *a, **k):
        real_save(sharded, folder, *a, **k)  # the tensors are on disk...
        raise KeyboardInterrupt  # ...and the user hits Ctrl-C before the metadata

    monkeypatch.setattr(dist_checkpointing, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        hc.convert_hf_to_mcore(c["hf"], out, progress=False)
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary folder
    monkeypatch.undo()

    def die_mid_export(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hc, "_copy_side_files", die_mid_export)
    with pytest.raises(RuntimeError, match="disk full"):
        hc.convert_mcore_to_hf(c["mcore"], out, progress=False)
    assert os.listdir(tmp_path) == []


def test_large_tensors_stored_in_row_chunks(ckpts):
    """The fixture converted with 32 KiB chunks: the 512 x 64 fp32 embedding (128 KiB) is 4 chunks,
    fc1 is stored as separate gate/up halves, and everything above loaded from that."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(ckpts["untied"]["mcore"]).read_metadata().state_dict_metadata
    emb = md["embedding.word_embeddings.weight"]
    assert tuple(emb.size) == (512, 64) and sorted(tuple(c.offsets)[0] for c in emb.chunks) == [0, 128, 256, 384]
    fc1 = md["decoder.layers.mlp.linear_fc1.weight"]
    assert tuple(fc1.size) == (4, 256, 64) and len(fc1.chunks) == 8
    assert hc._chunk_rows(151936, 151936 * 4096 * 2, 128 * 2**20) == 16  # Qwen3-8B embedding: 78 MB chunks


def test_checkpoint_of_the_qwen3_only_format_still_loads(ckpts, tmp_path):
    """Checkpoints written before the family registry name the format megatron_spot.qwen3.dist_checkpoint."""
    c = ckpts["untied"]
    old = str(tmp_path / "old-format")
    shutil.copytree(c["mcore"], old)
    path = os.path.join(old, model_ckpt.METADATA_NAME)
    meta = json.load(open(path))
    assert meta["format"] == "megatron_spot.dist_checkpoint"
    meta["format"] = "megatron_spot.qwen3.dist_checkpoint"
    json.dump(meta, open(path, "w"))
    logits = _mcore_logits(_mcore_tp1(old), c["tok"], c["pos"], c["vocab"])
    assert (logits - c["ref"]).abs().max().item() <= 1e-4
    meta["format"] = "someone_else.dist_checkpoint"
    json.dump(meta, open(path, "w"))
    with pytest.raises(CheckpointError, match="unknown format"):
        model_ckpt.read_checkpoint_metadata(old)
