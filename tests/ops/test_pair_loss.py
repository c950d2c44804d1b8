"""megatron_spot.ops.pair_loss (fused per-sequence sums + pairwise objectives) against autograd of
direct PyTorch transcriptions of each formula (tests/spot_formulas.py)."""
import pytest
import torch

from megatron_spot import ops
from tests.spot_formulas import pair_objectives

BACKENDS = [b for b in ("cpu", "reference") if b in ops.available_backends()]
BETA = 0.1


def make(B=3, L=11, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(2 * B, L, generator=gen, dtype=torch.float64) * 3
    mask = (torch.rand(2 * B, L, generator=gen) > 0.3).to(dtype)
    mask[1] = 0  # an empty response (chosen row of pair 1)
    lp[0, ~mask[0].bool()] = float("-inf")  # masked-out -inf log-probs must not poison the sums
    ref = -torch.rand(2 * B, generator=gen, dtype=torch.float64) * 10
    return lp.to(dtype), mask, ref.to(dtype)


WEIGHTS = [
    {"spot-bco": 1.0},
    {"spot-bce": 1.0},
    {"dpo": 1.0},
    {"reward-sft": 1.0},
    {"spot-bco": 0.7, "dpo": 0.2, "spot-bce": 0.5, "reward-sft": 1.5},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: "+".join(w))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pair_loss_matches_formulas(backend, weights, dtype):
    lp, mask, ref = make(dtype=dtype)
    delta, eps = 0.37, 0.1
    x = lp.clone().requires_grad_(True)
    out = ops.pair_loss(x, mask, ref, beta=BETA, delta=delta, weights=weights, label_smoothing=eps, backend=backend)
    go = torch.linspace(0.5, 1.5, out.loss.shape[0], dtype=dtype)
    (g,) = torch.autograd.grad(out.loss, x, go)

    xr = lp.double().clone().requires_grad_(True)
    terms, seq, r = pair_objectives(xr, mask.double(), ref.double(), BETA, delta, eps)
    total = sum(w * terms[k] for k, w in weights.items())
    (gr,) = torch.autograd.grad(total, xr, go.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.loss.double(), total.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(g.double(), torch.where(mask.bool(), gr, 0), atol=tol, rtol=tol)
    assert torch.isfinite(g).all() and torch.all(g[~mask.bool()] == 0)
    for k, name in enumerate(ops.PAIR_OBJECTIVES):
        torch.testing.assert_close(out.losses[k].double(), terms[name].detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.seq_logps.double(), seq.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.rewards.double(), r.detach(), atol=tol, rtol=tol)
    assert out.seq_logps[1] == 0  # empty mask: sequence log-prob 0, reward = -beta * ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_loss_delta_tensor_and_bool_mask(backend):
    lp, mask, ref = make(dtype=torch.float32)
    a = ops.pair_loss(lp, mask.bool(), ref, delta=torch.tensor(0.2, dtype=torch.float64), backend=backend)
    b = ops.pair_loss(lp, mask, ref, delta=0.2, backend=backend)
    torch.testing.assert_close(a.loss, b.loss)


def test_pair_loss_bad_inputs():
    lp, mask, ref = make(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[2B, L\]"):
        ops.pair_loss(lp[:5], mask[:5], ref[:5])
    with pytest.raises(ValueError, match="loss_mask shape"):
        ops.pair_loss(lp, mask[:, :3], ref)
    with pytest.raises(ValueError, match="ref_logps must be"):
        ops.pair_loss(lp, mask, ref[:4])
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.pair_loss(lp.half(), mask, ref)
    with pytest.raises(ValueError, match="on meta"):
        ops.pair_loss(lp, mask.to("meta"), ref)
    with pytest.raises(ValueError, match="unknown objectives"):
        ops.pair_loss(lp, mask, ref, weights={"kto": 1.0})


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_loss_meta(backend):
    lp = torch.empty(4, 7, device="meta", requires_grad=True)
    out = ops.pair_loss(lp, torch.empty(4, 7, device="meta"), torch.empty(4, device="meta"), backend=backend)
    assert out.loss.shape == (2,) and out.losses.shape == (4, 2) and out.rewards.shape == (4,)
    (g,) = torch.autograd.grad(out.loss.sum(), lp)
    assert g.shape == (4, 7)
