"""SpotLoss: every objective against a direct PyTorch transcription of its formula, the running
delta (update-then-use, cumulative mean, eval mode, checkpoint round trip), metrics, parsing."""
import math

import pytest
import torch

from megatron_spot.losses import OBJECTIVES, SpotLoss, parse_objective, sequence_logps
from tests.spot_formulas import pair_objectives

BETA = 0.1


def batch(B=4, L=9, seed=0, ref_equals_policy=False):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(2 * B, L, generator=gen) * 2
    mask = (torch.rand(2 * B, L, generator=gen) > 0.25).float()
    mask[B + 1] = 0  # empty rejected response
    ref = torch.where(mask.bool(), lp, 0).sum(-1) if ref_equals_policy else -torch.rand(2 * B, generator=gen) * 12
    return lp, mask, ref


def formulas(lp, mask, ref, delta, eps=0.0):
    """The batch losses SpotLoss reports: the mean over pairs of each pairwise objective
    (tests/spot_formulas.py), and the SFT token mean over the chosen rows."""
    per_pair, _, r = pair_objectives(lp, mask, ref, BETA, delta, eps)
    terms = {name: losses.mean() for name, losses in per_pair.items()}
    B = lp.shape[0] // 2
    terms["sft"] = -(lp[:B] * mask[:B]).sum() / mask[:B].sum()
    return terms, r


@pytest.mark.parametrize("objective", ["spot-bco", "spot-bce", "dpo", "reward-sft", "sft", "spot-bco:1,sft:0.1",
                                       "dpo:0.5,spot-bce:2,reward-sft:0.25"])
def test_objective_matches_formula(objective):
    weights = parse_objective(objective)
    eps = 0.1 if "dpo" in weights else 0.0
    loss_fn = SpotLoss(objective, beta=BETA, label_smoothing=eps)
    lp, mask, ref = batch()
    x = lp.clone().requires_grad_(True)
    loss, metrics = loss_fn(x, mask, ref)
    (g,) = torch.autograd.grad(loss, x)

    xr = lp.double().clone().requires_grad_(True)
    r_det = BETA * (torch.where(mask.bool(), lp, 0).sum(-1) - ref)
    delta = r_det.double().mean()  # first micro-batch: delta = its own mean reward (update, then use)
    terms, r = formulas(xr, mask.double(), ref.double(), delta, eps)
    expected = sum(w * terms[k] for k, w in weights.items())
    (gr,) = torch.autograd.grad(expected, xr)
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g.double(), gr, atol=1e-7, rtol=1e-5)
    for k in weights:
        torch.testing.assert_close(metrics[f"loss/{k}"].double(), terms[k].detach(), atol=1e-6, rtol=1e-6)
    B = lp.shape[0] // 2
    assert metrics["rewards/chosen"].item() == pytest.approx(r[:B].mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"].item() == pytest.approx(r[B:].mean().item(), abs=1e-6)
    assert metrics["rewards/margin"].item() == pytest.approx((r[:B] - r[B:]).mean().item(), abs=1e-6)
    assert metrics["rewards/accuracy"].item() == pytest.approx((r[:B] > r[B:]).double().mean().item())
    seq = sequence_logps(lp, mask)
    assert metrics["logps/chosen"].item() == pytest.approx(seq[:B].mean().item(), abs=1e-5)
    assert metrics["logps/rejected"].item() == pytest.approx(seq[B:].mean().item(), abs=1e-5)
    expect_delta = delta.item() if "spot-bco" in weights else 0.0
    assert metrics["delta"].item() == pytest.approx(expect_delta, abs=1e-7)
    assert all(not v.requires_grad for v in metrics.values())


def test_first_step_equals_ln2_constants():
    lp, mask, ref = batch(ref_equals_policy=True)  # policy == reference: every reward is 0
    for objective, value in [("spot-bco", 2 * math.log(2)), ("spot-bce", 2 * math.log(2)), ("dpo", math.log(2))]:
        loss, _ = SpotLoss(objective)(lp, mask, ref)
        assert loss.item() == pytest.approx(value, abs=1e-6)


def test_delta_is_cumulative_mean_update_then_use_and_checkpointed():
    loss_fn = SpotLoss("spot-bco", beta=BETA)
    means = []
    for step in range(3):
        lp, mask, ref = batch(seed=10 + step)
        means.append((BETA * (torch.where(mask.bool(), lp, 0).sum(-1) - ref)).double().mean().item())
        loss, m = loss_fn(lp.requires_grad_(True), mask, ref)
        expected_delta = sum(means) / len(means)
        assert m["delta"].item() == pytest.approx(expected_delta, abs=1e-6)
        terms, _ = formulas(lp.detach().double(), mask.double(), ref.double(), expected_delta)
        assert loss.item() == pytest.approx(terms["spot-bco"].item(), abs=1e-6)
    sd = loss_fn.state_dict()
    assert sd["delta"]["count"] == 3 and sd["delta"]["delta"] == pytest.approx(sum(means) / 3)

    # eval mode does not move delta
    lp, mask, ref = batch(seed=99)
    _, m = loss_fn(lp, mask, ref, update_delta=False)
    assert m["delta"].item() == pytest.approx(sum(means) / 3, abs=1e-6)
    assert loss_fn.state_dict() == sd

    # a restored loss continues exactly like the original
    restored = SpotLoss("spot-bco", beta=BETA)
    restored.load_state_dict(sd)
    a, ma = loss_fn(lp, mask, ref)
    b, mb = restored(lp, mask, ref)
    assert a.item() == b.item() and ma["delta"].item() == mb["delta"].item()
    assert restored.state_dict()["delta"]["count"] == 4


def test_delta_untouched_without_bco():
    loss_fn = SpotLoss("dpo")
    loss_fn(*batch())
    assert loss_fn.state_dict()["delta"] == {"delta": 0.0, "count": 0}


def test_empty_masks_are_finite():
    lp, mask, ref = batch()
    mask[:] = 0
    for objective in ["spot-bco", "dpo", "sft", "spot-bco:1,sft:0.1"]:
        x = lp.clone().requires_grad_(True)
        loss, metrics = SpotLoss(objective)(x, mask, ref)
        loss.backward()
        assert torch.isfinite(loss) and torch.all(x.grad == 0)
        assert all(torch.isfinite(v) for v in metrics.values())


def test_sequence_logps_masks_minus_inf():
    lp = torch.tensor([[-1.0, float("-inf"), -2.0], [-0.5, -0.5, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    s = sequence_logps(lp, mask)
    assert s.tolist() == [-3.0, -1.0]
    s.sum().backward()
    assert lp.grad.tolist() == mask.tolist()


def test_parse_objective():
    assert parse_objective("spot-bco") == {"spot-bco": 1.0}
    assert parse_objective("spot-bco:1, sft:0.1") == {"spot-bco": 1.0, "sft": 0.1}
    assert parse_objective("SPOT_BCE:2") == {"spot-bce": 2.0}
    with pytest.raises(ValueError) as e:
        parse_objective("spot-bco:1,kto:1")
    assert "kto" in str(e.value) and all(name in str(e.value) for name in OBJECTIVES)
    for bad, msg in [("", "empty"), ("dpo,dpo", "twice"), ("dpo:x", "not a number"), ("dpo:inf", "finite")]:
        with pytest.raises(ValueError, match=msg):
            parse_objective(bad)
    with pytest.raises(ValueError, match="valid objectives"):
        SpotLoss("ipo")


def test_bad_shapes():
    lp, mask, ref = batch()
    loss_fn = SpotLoss()
    with pytest.raises(ValueError, match=r"\[2B, L\]"):
        loss_fn(lp[:3], mask[:3], ref[:3])
    with pytest.raises(ValueError, match="loss_mask"):
        loss_fn(lp, mask[:, :2], ref)
    with pytest.raises(ValueError, match="ref_logps"):
        loss_fn(lp, mask, ref[:2])
