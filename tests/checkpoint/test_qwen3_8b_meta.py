"""The full-size Qwen3-8B mapping on the meta device (no weights allocated): names and shapes of
every tensor in both directions, against transformers' Qwen3ForCausalLM and Megatron-Core's
GPTModel (parameters and sharded_state_dict keys/global shapes at TP1PP1), the 151,936-token
vocabulary at TP2, and the export's shard plan."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_spot.checkpoint import hf_convert as hc
from megatron_spot.checkpoint import model_checkpoint as model_ckpt
from megatron_spot.checkpoint.single_process import ensure_single_process_world
from megatron_spot.models import build_unsharded_model
from megatron_spot.checkpoint.errors import CheckpointError
from megatron_spot.checkpoint.safetensors_io import plan_shards
from megatron_spot.models.gpt.state_dict import hf_shapes, mapping_table, mcore_shapes
from megatron_spot.models import load_model_config
from megatron_spot.models.qwen3 import PRESETS

CFG = load_model_config("qwen3-8b")


@pytest.fixture(scope="module")
def hf_meta_state():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    d = dict(PRESETS["qwen3-8b"])
    d.pop("architectures")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**d))
    return {k: v for k, v in model.state_dict().items()}


def test_hf_names_and_shapes_match_transformers(hf_meta_state):
    assert all(t.is_meta for t in hf_meta_state.values())
    got = {k: tuple(v.shape) for k, v in hf_meta_state.items()}
    assert got == hf_shapes(CFG)
    assert sum(math.prod(s) for s in got.values()) == 8_190_735_360 == CFG.num_parameters()


def test_mapping_both_directions_on_meta(hf_meta_state):
    hf_want, mc_want = hf_shapes(CFG), mcore_shapes(CFG)
    table = mapping_table(CFG)
    assert {e.mcore for e in table} == set(mc_want) and len(table) == len(mc_want) == 2 + 36 * 8 + 1
    assert sorted(n for e in table for n in e.hf) == sorted(hf_want)
    for e in table:
        m = e.to_mcore([hf_meta_state[n] for n in e.hf], CFG)
        assert m.is_meta and tuple(m.shape) == mc_want[e.mcore], e.mcore
        back = e.to_hf(m, CFG)
        assert [tuple(t.shape) for t in back] == [hf_want[n] for n in e.hf], e.mcore
    assert mc_want["decoder.layers.0.self_attention.linear_qkv.weight"] == ((32 + 2 * 8) * 128, 4096)
    assert mc_want["embedding.word_embeddings.weight"] == (151936, 4096)  # 151,936 = 128 x 1187: no padding


def test_tensor_set_validation_full_size(hf_meta_state):
    class MetaSource:  # what check_hf_tensors reads from a SafetensorsCheckpoint
        folder = "Qwen3-8B"

        def __init__(self, state):
            self.state = state

        def names(self):
            return list(self.state)

        def shape(self, name):
            return tuple(self.state[name].shape)

    assert hc.check_hf_tensors(MetaSource(hf_meta_state), CFG) == []
    broken = dict(hf_meta_state)
    broken["lm_head.weight"] = torch.empty(151_669, 4096, device="meta")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight has shape \[151669, 4096\], config.json implies \[151936, 4096\]"):
        hc.check_hf_tensors(MetaSource(broken), CFG)


def test_megatron_model_on_meta_tp1pp1():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    ensure_single_process_world()
    with torch.device("meta"):
        chunks = build_unsharded_model(CFG, "bf16")
    params = model_ckpt._params_by_name(chunks)
    assert all(p.is_meta for p in params.values())
    assert {k: tuple(p.shape) for k, p in params.items()} == mcore_shapes(CFG)
    # the dist checkpoint's keys and GLOBAL shapes: layers stacked on a leading axis, norms under TE names
    te = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
          "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    want = {}
    for name, shape in mcore_shapes(CFG).items():
        if name.startswith("decoder.layers."):
            rest = name.split(".", 3)[3]
            want[f"decoder.layers.{te.get(rest, rest)}"] = (CFG.num_hidden_layers, *shape)
        else:
            want[name] = shape
    got = {}
    for v in chunks[0].sharded_state_dict().values():
        built = v.build() if isinstance(v, ShardedTensorFactory) else [v]
        for st in (built if isinstance(built, list) else built.values()):
            if isinstance(st, ShardedTensor):
                assert got.setdefault(st.key, tuple(st.global_shape)) == tuple(st.global_shape)
    assert got == want
    del chunks


def test_vocab_at_tp2_and_layout_limits():
    assert CFG.padded_vocab_size == 151_936 and CFG.padded_vocab_size % 2 == 0
    for tp in (1, 2, 4, 8):
        model_ckpt.check_layout(CFG, tp=tp, pp=4, vpp=3)
    with pytest.raises(CheckpointError, match="tensor_parallel=16 does not divide the 8 query groups"):
        model_ckpt.check_layout(CFG, tp=16)


def test_export_shard_plan_full_size():
    items = [(n, torch.bfloat16, s) for n, s in hf_shapes(CFG).items()]
    shards = plan_shards(items, 5 * 10**9)
    sizes = [sum(math.prod(s) * 2 for _, _, s in shard) for shard in shards]
    assert len(shards) == 4 and max(sizes) <= 5 * 10**9 and sum(sizes) == 2 * 8_190_735_360
