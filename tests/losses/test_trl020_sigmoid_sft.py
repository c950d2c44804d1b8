"""`dpo:1,sft:w` per step against TRL 0.20's loss_type ["sigmoid", "sft"], loss_weights [1, w].

tests/fixtures/trl020/loss_sigmoid_sft.json holds, for four optimizer steps of a tiny Qwen3 trained by
TRL 0.20.0 itself (real vocabulary, so Qwen's id 0 "!" occurs), the plain-PyTorch per-token log-probs of
the policy and the reference sequence log-probs of each row, and the loss and metrics TRL computed.

Intended differences, checked here:
- TRL's sft term is F.cross_entropy(..., ignore_index=0): token id 0 is never scored. SpotLoss scores
  every response token, so on a micro-batch whose chosen responses contain id 0 the sft terms differ by
  exactly the token-0 NLL share; elsewhere the losses agree.
- TRL weight-sums the rewards of a multi-loss (rewards/chosen = (1 + w) r+ for sigmoid + sft); SpotLoss
  reports the implicit reward r itself.
"""
import json
import os

import pytest
import torch

from megatron_spot.losses import SpotLoss

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "trl020", "loss_sigmoid_sft.json")


def load():
    with open(FIXTURE) as f:
        return json.load(f)


def rows(step):
    """[2B, L] token log-probs and mask (B chosen rows, then B rejected), and the matching token ids."""
    lps, ids = step["policy_token_logps"], step["chosen_ids"] + step["rejected_ids"]
    L = max(len(r) for r in lps)
    lp = torch.zeros(len(lps), L, dtype=torch.float64)
    mask = torch.zeros_like(lp)
    tok = torch.full((len(lps), L), -1, dtype=torch.long)
    for i, (r, t) in enumerate(zip(lps, ids)):
        assert len(r) == len(t)
        lp[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
        mask[i, :len(r)] = 1
        tok[i, :len(t)] = torch.tensor(t)
    return lp, mask, tok


@pytest.mark.parametrize("k", range(4))
def test_dpo_plus_sft_matches_trl020_per_step(k):
    doc = load()
    w = doc["loss_weights"][1]
    step = doc["steps"][k]
    lp, mask, tok = rows(step)
    B = lp.shape[0] // 2
    ref = torch.tensor(step["ref_logps"], dtype=torch.float64)
    loss, metrics = SpotLoss(f"dpo:1,sft:{w}", beta=doc["beta"])(lp, mask, ref)

    # TRL's sft term, restated from the fixture's log-probs: mean NLL over chosen tokens that are not id 0
    chosen, cmask, ctok = lp[:B], mask[:B].bool(), tok[:B]
    scored_by_trl = cmask & (ctok != 0)
    sft_ours = -chosen[cmask].mean()
    sft_trl = -chosen[scored_by_trl].mean()
    assert float(metrics["loss/sft"]) == pytest.approx(float(sft_ours), rel=1e-12)
    assert float(sft_trl) == pytest.approx(step["trl_metrics"]["nll_loss"], rel=1e-5)

    n_zero = int((cmask & (ctok == 0)).sum())
    expected = step["trl_loss"] + w * float(sft_ours - sft_trl)   # equal to TRL's when no id 0 is scored
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if n_zero == 0:
        assert float(loss) == pytest.approx(step["trl_loss"], rel=1e-5)
    else:   # the documented difference is real here, far above float noise
        assert abs(float(loss) - step["trl_loss"]) > 1e-3

    # metrics: TRL reports (1 + w) * r for a sigmoid + sft multi-loss; accuracy is unaffected
    tm = step["trl_metrics"]
    scale = 1.0 + w
    for ours, theirs in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins")):
        assert float(metrics[ours]) * scale == pytest.approx(tm[theirs], rel=1e-4, abs=1e-5)
    assert float(metrics["rewards/accuracy"]) == pytest.approx(tm["rewards/accuracies"])
    assert float(metrics["logps/chosen"]) == pytest.approx(tm["logps/chosen"], rel=1e-5)
    assert float(metrics["logps/rejected"]) == pytest.approx(tm["logps/rejected"], rel=1e-5)


def test_fixture_covers_both_cases_and_moving_policy():
    doc = load()
    zeros = [sum(ids.count(0) for ids in s["chosen_ids"]) for s in doc["steps"]]
    assert any(z == 0 for z in zeros) and any(z > 0 for z in zeros)
    # past the first step the policy has moved away from the reference (non-zero rewards)
    assert doc["steps"][0]["trl_metrics"]["rewards/chosen"] == 0.0
    assert all(abs(s["trl_metrics"]["rewards/margins"]) > 1e-3 for s in doc["steps"][1:])
