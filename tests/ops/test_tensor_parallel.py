"""TP=2 over gloo equals TP=1: values and the logits-shard gradients, fp32 and bf16, padded vocabularies
(a partly padded shard and a shard that is all padding), ignored targets, and at most two all-reduces."""
import pytest
import torch

from megatron_spot import ops
from tests.multiprocess import run_on_ranks

BACKENDS = [b for b in ("cpu", "reference") if b in ops.available_backends()]


def _worker(rank, world_size, backends):
    import torch.distributed as dist

    from megatron_spot import ops
    from tests.ops.tp_cases import plant_edge_targets, record_all_reduces

    calls = record_all_reduces()
    group = dist.group.WORLD
    s, b, V_local = 5, 2, 1100  # V_local not a multiple of the 2048-column CPU chunk
    V = V_local * world_size
    report = []
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            for valid_vocab in (V, V - 13, V_local - 50):  # none / part of rank 1 / all of rank 1 padded
                for inplace in (False, True):
                    gen = torch.Generator().manual_seed(7)
                    full = (torch.randn(s, b, V, generator=gen) * 4).to(dtype)
                    targets = plant_edge_targets(torch.randint(0, valid_vocab, (s, b), generator=gen),
                                                 valid_vocab, V_local)
                    go = torch.randn(s, b, generator=gen)
                    shard = full[..., rank * V_local:(rank + 1) * V_local].clone().requires_grad_(True)
                    before = len(calls)
                    y = ops.token_logprobs(shard, targets, tp_group=group, valid_vocab_size=valid_vocab,
                                           backend=backend, inplace_backward=inplace)
                    n_ar = len(calls) - before
                    (g,) = torch.autograd.grad(y, shard, go)
                    x1 = full.clone().requires_grad_(True)
                    y1 = ops.token_logprobs(x1, targets, valid_vocab_size=valid_vocab, backend=backend)
                    (g1,) = torch.autograd.grad(y1, x1, go)
                    g1 = g1[..., rank * V_local:(rank + 1) * V_local]
                    report.append(dict(
                        case=(backend, str(dtype), valid_vocab, inplace), n_allreduce=n_ar,
                        dy=(y - y1).abs().max().item(), dg=(g.float() - g1.float()).abs().max().item(),
                        gscale=g1.float().abs().max().item(), ignored_zero=bool((y[0, 0] == 0) & (y[1, 1] == 0)),
                        finite=bool(torch.isfinite(y).all() and torch.isfinite(g).all()),
                    ))
    return report


@pytest.mark.slow
def test_tp2_equals_tp1():
    reports = run_on_ranks(_worker, world_size=2, args=(BACKENDS,))
    for rank, report in enumerate(reports):
        for r in report:
            bf16 = "bfloat16" in r["case"][1]
            assert r["n_allreduce"] <= 2, r
            assert r["finite"] and r["ignored_zero"], r
            assert r["dy"] <= 3e-5, (rank, r)
            assert r["dg"] <= (1e-2 * max(r["gscale"], 1e-3) if bf16 else 1e-5), (rank, r)
