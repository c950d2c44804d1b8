"""Every TP/PP/VPP layout computes what TP1PP1 computes: logits (vs transformers) and training losses.

One spawn of 4 gloo ranks runs all layouts (process start-up dominates on 2 cores).
"""
import math

import pytest
import torch

from tests.multiprocess import run_on_ranks

LAYOUTS = [  # (tp, pp, vpp)
    (1, 1, None),
    (2, 1, None),
    (1, 2, None),
    (2, 2, None),
    (1, 2, 2),  # interleaved: PP2 x VPP2 over 4 layers
    (2, 2, 2),
]
STEPS = 3


def _logits_through_pipeline(engine, tokens):
    """Full-vocab logits on the last stage via Megatron's forward-only schedule (gathered over TP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    batch = {"tokens": tokens, "position_ids": torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)}

    def step(it, model):
        b = next(it)
        out = model(b["tokens"], b["position_ids"], None)
        return out, lambda o: (o.new_zeros(()), {"logits": gather_from_tensor_model_parallel_region(o)})

    iters = [iter([batch, batch]) for _ in engine.model]  # interleaving needs >= PP micro-batches
    with torch.no_grad():
        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iters if len(iters) > 1 else iters[0],
                                          model=engine.model, num_microbatches=2, seq_length=tokens.shape[1],
                                          micro_batch_size=tokens.shape[0], forward_only=True)
    return out[0]["logits"] if ps.is_pipeline_last_stage() else None


def _worker(rank, world_size):
    from megatron.core import parallel_state as ps

    from megatron_spot.config import TrainConfig
    from megatron_spot.models.qwen3.hf_mapping import hf_to_mcore_state_dict, load_full_state_dict
    from megatron_spot.platform import initialize
    from megatron_spot.training.engine import Engine
    from tests.tiny import hf_model, random_pairs_batch

    cfg, hf = hf_model("qwen3-tiny", seed=0)
    full = hf_to_mcore_state_dict(hf.state_dict(), cfg)
    tokens = torch.randint(2, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    global_batch = [random_pairs_batch(1, 8, 16, cfg.vocab_size, seed=100 + i) for i in range(4)]
    results = {}
    for tp, pp, vpp in LAYOUTS:
        tc = TrainConfig()
        tc.parallel.tensor_parallel, tc.parallel.pipeline_parallel, tc.parallel.virtual_pipeline = tp, pp, vpp
        tc.parallel.use_distributed_optimizer = True
        tc.loss.objective, tc.loss.beta = "spot-bce", 0.5
        tc.optimizer.lr, tc.optimizer.warmup_fraction = 1e-3, 0.0
        info = initialize(tc.parallel, seed=7)
        engine = Engine(tc, cfg, total_steps=STEPS, load_weights=lambda chunks: load_full_state_dict(chunks, full))
        logits = _logits_through_pipeline(engine, tokens)
        diff = None
        if logits is not None:
            diff = (logits[..., : cfg.vocab_size] - hf_logits).abs().max().item()
        # the same global batch of 4 pairs, split over data-parallel ranks in order
        per_rank = len(global_batch) // info.dp
        mine = [dict(mb) for mb in global_batch[info.dp_rank * per_rank:(info.dp_rank + 1) * per_rank]]
        # reference log-probs scored by this layout's forward-only path: step 1 then has zero rewards
        for mb, seq in zip(mine, engine.sequence_logps(mine)):
            mb["ref_logps"] = seq.float()
        losses = [engine.train_step(mine)["loss"] for _ in range(STEPS)]
        results[(tp, pp, vpp)] = {"logit_diff": diff, "losses": losses}
        ps.destroy_model_parallel()
    return results


@pytest.mark.slow
def test_layouts_match_tp1pp1_and_transformers():
    per_rank = run_on_ranks(_worker, world_size=4)
    reference = per_rank[0][(1, 1, None)]["losses"]
    assert reference[0] == pytest.approx(2 * math.log(2), abs=1e-6)  # policy == reference at step 1
    assert abs(reference[-1] - reference[0]) > 1e-4  # training moved the loss
    for layout in LAYOUTS:
        diffs = [r[layout]["logit_diff"] for r in per_rank if r[layout]["logit_diff"] is not None]
        assert diffs, layout
        assert max(diffs) <= 1e-5, (layout, diffs)
        for r in per_rank:
            assert r[layout]["losses"] == pytest.approx(reference, rel=1e-5, abs=1e-6), (layout, r[layout]["losses"])
