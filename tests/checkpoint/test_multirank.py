"""Checkpoints at other layouts, in ONE spawn of 4 gloo ranks (process start-up is the cost):
load HF-converted checkpoints at TP2PP2 and TP1PP2xVPP2 (x DP2) and compare logits with
transformers (tied, untied, the real 151,936-token vocabulary at TP2); save at TP2PP2 and check
that it loads at TP1PP1 bit-exact and exports to the original HF tensors, the export done by
rank 0 of the 4-rank world (which converts in a child process of its own). The Qwen3-MoE checkpoint
also loads at PP2 x EP2 and TP2 x EP2 x ETP2 (experts split over ranks and inside each expert) with the
same logits, and saved at PP2 x EP2 it loads at TP1PP1 and exports bit-exact. Both expert layouts: the
checkpoint (written by the converter through SequentialMLP's `local_experts.{e}`) also loads into grouped
experts (TEGroupedMLP's `weight{e}`, models/gpt/grouped_experts.py without TE) at PP2 x EP2 and
TP2 x EP2 x ETP2 with the same logits, and saved from the grouped model it loads back into SequentialMLP
at TP1PP1 with the very same tensors and exports to the original HF files. A Qwen3-MoE with dense layers among
its MoE ones (decoder_sparse_step 2) loads at PP2 x EP2 and PP2 x VPP2 (one stage's chunks all dense, the other's
all MoE) with the same logits as transformers."""
from __future__ import annotations

import os

import pytest
import torch

from tests.checkpoint import helpers
from tests.multiprocess import run_on_ranks

pytestmark = pytest.mark.slow


@torch.no_grad()
def _pipeline_logits(chunks, tok, pos):
    """Forward through this rank's chunks with blocking p2p between stages; full-vocab logits on
    the last stage (gathered over TP), None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    prev_rank, next_rank = ps.get_pipeline_model_parallel_prev_rank(), ps.get_pipeline_model_parallel_next_rank()
    hidden = chunks[0].config.hidden_size
    out = None
    for v, chunk in enumerate(chunks):
        chunk.eval()  # (an MoE layer at TP > 1 without sequence parallel runs only forward-only)
        first = pp_rank == 0 and v == 0
        last = pp_rank == pp - 1 and v == len(chunks) - 1
        if not first:
            buf = torch.empty(tok.shape[1], tok.shape[0], hidden)
            dist.recv(buf, src=prev_rank)
            chunk.set_input_tensor(buf)
        out = chunk(tok, pos, None)
        if not last:
            dist.send(out.contiguous(), dst=next_rank)
            out = None
    if out is None:
        return None
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _worker(rank, world_size, cases, save_root):
    from megatron.core import parallel_state as ps

    from megatron_spot.checkpoint import hf_convert as hc
    from megatron_spot.checkpoint import model_checkpoint as model_ckpt
    from megatron_spot.config.schema import MoEConfig, ParallelConfig, PrecisionConfig
    from megatron_spot.models import build_model_chunks, build_transformer_config
    from megatron_spot.platform import initialize

    results = {}
    layouts = {"tp2pp2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
               "tp1pp2vpp2": ParallelConfig(tensor_parallel=1, pipeline_parallel=2, virtual_pipeline=2),
               "pp2ep2": ParallelConfig(pipeline_parallel=2, expert_parallel=2),
               "tp2ep2": ParallelConfig(tensor_parallel=2, expert_parallel=2)}  # ETP = TP = 2
    layouts.update({f"{name}-grouped": layouts[name] for name in ("pp2ep2", "tp2ep2")})
    for layout, parallel in layouts.items():
        experts = MoEConfig(experts="grouped" if layout.endswith("-grouped") else "sequential")
        initialize(parallel, seed=0)
        for name, (ckpt, tok, pos, vocab) in cases.items():
            if (layout != "tp2pp2" and name == "vocab151936") or ("ep" in layout and not name.startswith("moe")) or \
                    (name == "moe-mixed" and layout not in ("pp2ep2", "tp1pp2vpp2")):
                continue
            cfg = model_ckpt.checkpoint_model_config(ckpt)
            chunks = build_model_chunks(cfg, build_transformer_config(cfg, parallel, PrecisionConfig(dtype="fp32"),
                                                                      moe=experts, training=False))
            if name == "moe":
                results[(layout, "experts")] = type(chunks[0].decoder.layers[0].mlp.experts).__name__
            model_ckpt.load_model_checkpoint(chunks, ckpt)
            logits = _pipeline_logits(chunks, tok, pos)
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                assert logits.shape[-1] == cfg.padded_vocab_size
                results[(layout, name)] = logits[..., :vocab].clone()
            if (layout, name) in (("tp2pp2", "untied"), ("tp2pp2", "tied"), ("pp2ep2", "moe"), ("pp2ep2-grouped", "moe")):
                saved = name + ("-grouped" if layout.endswith("-grouped") else "")
                model_ckpt.save_model_checkpoint(chunks, os.path.join(save_root, saved), cfg, hf_side_files_from=ckpt)
    # the end-of-training export: one rank of a multi-rank world converts (in a child process)
    import torch.distributed as dist

    if rank == 0:
        results["export"] = hc.convert_mcore_to_hf(os.path.join(save_root, "untied"),
                                                   os.path.join(save_root, "untied-export"), progress=False)
    dist.barrier()
    return results


def test_layouts_tp2pp2_vpp_and_save_at_tp2pp2(ckpts, tmp_path):
    from megatron_spot.checkpoint import hf_convert as hc
    from megatron_spot.checkpoint import model_checkpoint as model_ckpt
    from megatron_spot.models import build_unsharded_model

    cases = {n: (ckpts[n]["mcore"], ckpts[n]["tok"], ckpts[n]["pos"], ckpts[n]["vocab"])
             for n in ("untied", "tied", "vocab151936", "moe", "moe-mixed")}
    save_root = str(tmp_path / "saved")
    per_rank = run_on_ranks(_worker, 4, args=(cases, save_root))
    results = {}
    for r in per_rank:
        results.update(r)
    export = results.pop("export")
    experts = {layout: results.pop((layout, "experts")) for layout in
               ("tp2pp2", "tp1pp2vpp2", "pp2ep2", "tp2ep2", "pp2ep2-grouped", "tp2ep2-grouped")}
    assert experts == {"tp2pp2": "SequentialMLP", "tp1pp2vpp2": "SequentialMLP", "pp2ep2": "SequentialMLP",
                       "tp2ep2": "SequentialMLP", "pp2ep2-grouped": "TEGroupedMLP", "tp2ep2-grouped": "TEGroupedMLP"}
    assert export["tensors"] == 47 and export["files"] == ["model.safetensors"]
    src, dst = helpers.read_hf_tensors(ckpts["untied"]["hf"]), helpers.read_hf_tensors(export["out"])
    assert set(src) == set(dst) and all(torch.equal(src[k], dst[k]) for k in src)
    assert set(results) == {("tp2pp2", "untied"), ("tp2pp2", "tied"), ("tp2pp2", "vocab151936"),
                            ("tp1pp2vpp2", "untied"), ("tp1pp2vpp2", "tied"), ("tp2pp2", "moe"),
                            ("tp1pp2vpp2", "moe"), ("pp2ep2", "moe"), ("tp2ep2", "moe"), ("pp2ep2-grouped", "moe"),
                            ("tp2ep2-grouped", "moe"), ("pp2ep2", "moe-mixed"), ("tp1pp2vpp2", "moe-mixed")}
    for (layout, name), logits in sorted(results.items()):
        diff = (logits - ckpts[name]["ref"]).abs().max().item()
        print(f"{layout} {name}: max abs logit diff vs transformers {diff:.3g}")
        assert diff <= 1e-4, (layout, name, diff)

    # saved at TP2PP2 (MoE: PP2 x EP2, sequential and grouped experts) -> loads at TP1PP1 (SequentialMLP) with
    # the very same tensors, and exports to the original HF
    for saved_name in ("untied", "tied", "moe", "moe-grouped"):
        name = saved_name.removesuffix("-grouped")
        saved = os.path.join(save_root, saved_name)
        meta = model_ckpt.read_checkpoint_metadata(saved)
        assert meta["saved_layout"] == {"tp": 1 if name == "moe" else 2, "pp": 2, "vpp": None} and meta["dtype"] == "fp32"
        assert os.path.isfile(os.path.join(saved, "chat_template.jinja"))
        cfg = model_ckpt.checkpoint_model_config(saved)
        a, b = build_unsharded_model(cfg, "fp32"), build_unsharded_model(cfg, "fp32")
        model_ckpt.load_model_checkpoint(a, saved)
        model_ckpt.load_model_checkpoint(b, ckpts[name]["mcore"])
        pa, pb = model_ckpt._params_by_name(a), model_ckpt._params_by_name(b)
        assert set(pa) == set(pb)
        for k in pa:
            assert torch.equal(pa[k], pb[k]), (name, k)
        if name != "untied":  # (untied: exported by rank 0 of the 4-rank world above)
            out = str(tmp_path / f"{saved_name}-export")
            hc.convert_mcore_to_hf(saved, out, progress=False)
            src, dst = helpers.read_hf_tensors(ckpts[name]["hf"]), helpers.read_hf_tensors(out)
            assert set(src) == set(dst) and all(torch.equal(src[k], dst[k]) for k in src)
