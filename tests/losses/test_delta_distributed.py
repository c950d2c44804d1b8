"""The spot-bco delta across 2 data-parallel ranks: the average of every rank's per-micro-batch mean
reward, identical on all ranks, and the loss uses it."""
import pytest
import torch

from tests.multiprocess import run_on_ranks

BETA = 0.1


def _batch(rank, step):
    gen = torch.Generator().manual_seed(100 * step + rank)
    lp = -torch.rand(4, 6, generator=gen) * 2
    mask = (torch.rand(4, 6, generator=gen) > 0.2).float()
    ref = -torch.rand(4, generator=gen) * 8
    return lp, mask, ref


def _mean_reward(lp, mask, ref):
    return (BETA * (torch.where(mask.bool(), lp, 0).sum(-1) - ref)).double().mean().item()


def _worker(rank, world_size):
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_spot.losses import SpotLoss

    loss_fn = SpotLoss("spot-bco", beta=BETA, dp_group=dist.group.WORLD)
    out = []
    for step in range(2):
        lp, mask, ref = _batch(rank, step)
        loss, m = loss_fn(lp, mask, ref)
        # expected: cumulative mean over all (rank, step) micro-batch means seen so far
        seen = [_mean_reward(*_batch(r, s)) for s in range(step + 1) for r in range(world_size)]
        delta = sum(seen) / len(seen)
        r = BETA * (torch.where(mask.bool(), lp, 0).sum(-1) - ref)
        expected = (-F.logsigmoid(r[:2] - delta) - F.logsigmoid(-(r[2:] - delta))).mean().item()
        out.append(dict(delta=m["delta"].item(), expected_delta=delta, loss=loss.item(), expected_loss=expected))
    out.append(loss_fn.state_dict())
    return out


@pytest.mark.slow
def test_delta_averaged_over_dp_ranks():
    res = run_on_ranks(_worker, world_size=2)
    for rank in range(2):
        for step in range(2):
            r = res[rank][step]
            assert r["delta"] == pytest.approx(r["expected_delta"], abs=1e-6)
            assert r["loss"] == pytest.approx(r["expected_loss"], abs=1e-6)
            assert r["delta"] == res[0][step]["delta"]  # identical on every rank
        assert res[rank][2]["delta"]["count"] == 4
