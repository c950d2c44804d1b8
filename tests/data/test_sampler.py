"""PairBatchSampler: DP sharding, determinism, bucketing, mid-epoch resume."""
import itertools

import numpy as np
import pytest

from megatron_spot.data import PairBatchSampler

LENGTHS = np.random.default_rng(0).integers(10, 500, 103)


def sampler(rank=0, dp=2, **kw):
    args = dict(micro_batch_size=3, num_micro_batches=2, dp_rank=rank, dp_size=dp, seed=7)
    args.update(kw)
    return PairBatchSampler(LENGTHS, **args)


def flat(step):
    return [i for mb in step for i in mb]


@pytest.mark.parametrize("bucket,drop_last", [(True, True), (False, True), (True, False)])
def test_dp_shards_disjoint_and_complete(bucket, drop_last):
    dp = 3
    samplers = [sampler(r, dp, bucket_by_length=bucket, drop_last=drop_last) for r in range(dp)]
    G = 3 * 2 * dp
    steps = len(samplers[0])
    assert steps == (103 // G if drop_last else -(-103 // G))
    per_rank = [list(s) for s in samplers]
    assert all(len(x) == steps for x in per_rank)
    seen = []
    for k in range(steps):
        shares = [flat(per_rank[r][k]) for r in range(dp)]
        assert all(len(mb) == 3 for r in range(dp) for mb in per_rank[r][k])
        step_all = sum(shares, [])
        assert len(set(step_all)) == G            # disjoint within a step
        seen += step_all
    if drop_last:
        assert len(set(seen)) == len(seen) == steps * G   # each pair at most once per epoch
    else:
        assert set(seen) == set(range(103))               # every pair at least once


def test_deterministic_per_seed_and_epoch():
    a, b = sampler(), sampler()
    ea, eb = list(a), list(b)
    assert ea == eb and a.epoch == 1
    assert list(a) != ea                                  # epoch 1 differs from epoch 0
    c = sampler()
    c.set_epoch(1)
    assert list(c) == [mb for _, _, mb in itertools.islice(sampler().iter_epochs(2), len(ea), None)]
    assert list(sampler(seed=8)) != ea
    # without shuffle the global order is sequential
    ns = [flat(s) for s in sampler(shuffle=False, bucket_by_length=False, dp=1)]
    assert sum(ns, []) == list(range(len(ns) * 6))


def test_bucketing_keeps_step_sets_and_cuts_padding():
    plain = PairBatchSampler(LENGTHS, 4, 4, 0, 1, seed=1, bucket_by_length=False)
    buck = PairBatchSampler(LENGTHS, 4, 4, 0, 1, seed=1, bucket_by_length=True)

    def padding(s):
        return sum(len(mb) * LENGTHS[mb].max() - LENGTHS[mb].sum() for step in s for mb in step)

    sp, sb = list(plain), list(buck)
    assert [sorted(flat(x)) for x in sp] == [sorted(flat(x)) for x in sb]
    assert padding(sb) < 0.5 * padding(sp)
    wide = PairBatchSampler(LENGTHS, 4, 4, 0, 1, seed=1, bucket_window_steps=4)
    assert padding(list(wide)) <= padding(sb)


@pytest.mark.parametrize("k", [0, 1, 3, 7, 8, 11])
def test_resume_mid_epoch_yields_exactly_the_rest(k):
    ref = sampler(rank=1)
    full = [(e, s, mb) for e, s, mb in ref.iter_epochs(3)]
    live = sampler(rank=1)
    it = live.iter_epochs(3)
    head = [next(it) for _ in range(k)]
    sd = live.state_dict()
    resumed = sampler(rank=1)
    resumed.load_state_dict(sd)
    resumed.set_epoch(sd["epoch"])                        # harmless after a resume
    rest = list(resumed.iter_epochs(3))
    assert head + rest == full
    assert len(full) == 3 * len(ref)


def test_state_mismatch_and_bad_args():
    sd = sampler().state_dict()
    with pytest.raises(ValueError, match="seed"):
        sampler(seed=99).load_state_dict(sd)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairBatchSampler(LENGTHS[:5], 3, 2, 0, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        PairBatchSampler(LENGTHS, 1, 1, 2, 2)
