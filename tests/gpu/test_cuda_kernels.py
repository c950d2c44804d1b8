"""GPU only: the CUDA kernels of megatron_spot.ops against plain PyTorch in fp64 (values and gradients).

token_logprobs: fp32 and bf16 logits, ordinary and extreme (|logit| ~ 1e4) values, ignored targets,
padding columns (valid_vocab_size) and out-of-vocab targets, in-place backward. pair_loss: every
objective against direct F.logsigmoid transcriptions. The oracle is fp64 log_softmax + gather on
the same (upcast) inputs, so the tolerances measure the kernels' fp32 arithmetic only.
A missing CUDA build fails here with the reason (backend="cuda" refuses to fall back).
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_spot import ops

pytestmark = pytest.mark.gpu
IGNORE = -100


def _oracle(logits, targets, valid, go):
    """fp64 log-probs of the targets over the first `valid` columns, and d(sum go*lp)/d logits."""
    x = logits.detach().double().requires_grad_(True)
    masked = x.masked_fill(torch.arange(x.shape[-1], device=x.device) >= valid, float("-inf"))
    scored = (targets != IGNORE) & (targets >= 0) & (targets < valid)
    lp = torch.log_softmax(masked, -1).gather(-1, torch.where(scored, targets, 0)[..., None]).squeeze(-1)
    lp = torch.where(scored, lp, torch.zeros_like(lp))
    (g,) = torch.autograd.grad((lp * go.double()).sum(), x)
    return lp.detach(), g


def _case(dtype, scale, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s, b, V = 37, 3, 5003  # odd sizes: no row or vector-width alignment to lean on
    logits = (torch.randn(s, b, V, device="cuda", generator=g) * scale).to(dtype)
    targets = torch.randint(0, V - 3, (s, b), device="cuda", generator=g)
    targets[0, 0] = IGNORE
    targets[5, 1] = IGNORE
    targets[7, 2] = V - 1  # a padding column (>= valid_vocab_size): log-prob 0, no gradient
    targets[9, 0] = V + 50  # out of vocabulary: same
    return logits, targets, V - 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [3.0, 1e4], ids=["ordinary", "extreme"])
def test_token_logprobs_cuda_matches_fp64_torch(dtype, scale):
    logits, targets, valid = _case(dtype, scale)
    go = torch.linspace(0.5, 1.5, targets.numel(), device="cuda").reshape(targets.shape)
    exact, g_exact = _oracle(logits, targets, valid, go)

    x = logits.clone().requires_grad_(True)
    lp = ops.token_logprobs(x, targets, valid_vocab_size=valid, backend="cuda")
    (g,) = torch.autograd.grad(lp, x, go)
    assert lp.dtype == torch.float32 and g.dtype == dtype
    # fp32 accumulation: ~1e-7 relative to the largest |logit| (the row max enters every log-prob)
    tol = 1e-5 + 4e-7 * scale
    torch.testing.assert_close(lp.double(), exact, atol=tol, rtol=0)
    assert (lp[targets == IGNORE] == 0).all() and lp[7, 2] == 0 and lp[9, 0] == 0
    # gradients are softmax - onehot in [-1, 1]; bf16 gradients carry bf16 rounding (2^-8 relative)
    g_tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=8e-3)
    torch.testing.assert_close(g.double(), g_exact, **g_tol)
    assert (g[..., valid:] == 0).all() and (g[0, 0] == 0).all()

    # in-place backward writes the same gradient into the logits' own storage
    y = logits.clone().requires_grad_(True)
    lp2 = ops.token_logprobs(y, targets, valid_vocab_size=valid, inplace_backward=True, backend="cuda")
    (g2,) = torch.autograd.grad(lp2, y, go)
    assert torch.equal(lp2, lp)
    torch.testing.assert_close(g2, g, atol=0, rtol=0)


def _transcription(lp, mask, ref, beta, delta, eps):
    B = lp.shape[0] // 2
    seq = torch.where(mask.bool(), lp, torch.zeros_like(lp)).sum(-1)
    r = beta * (seq - ref)
    rc, rr = r[:B], r[B:]
    terms = {
        "spot-bco": -F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta)),
        "spot-bce": -F.logsigmoid(rc) - F.logsigmoid(-rr),
        "dpo": -(1 - eps) * F.logsigmoid(rc - rr) - eps * F.logsigmoid(-(rc - rr)),
        "reward-sft": -F.logsigmoid(rc),
    }
    return terms, seq, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_pair_loss_cuda_matches_formulas(dtype):
    g = torch.Generator().manual_seed(0)
    B, L, beta, delta, eps = 5, 301, 0.1, 0.37, 0.1
    lp = -torch.rand(2 * B, L, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(2 * B, L, generator=g) > 0.3).double()
    mask[1] = 0  # an empty response
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 300
    weights = {"spot-bco": 0.7, "dpo": 0.2, "spot-bce": 0.5, "reward-sft": 1.5}
    go = torch.linspace(0.5, 1.5, B, dtype=torch.float64)

    x = lp.to(dtype).cuda().requires_grad_(True)
    out = ops.pair_loss(x, mask.to(dtype).cuda(), ref.to(dtype).cuda(), beta=beta, delta=delta, weights=weights,
                        label_smoothing=eps, backend="cuda")
    (gx,) = torch.autograd.grad(out.loss, x, go.to(dtype).cuda())

    xr = lp.clone().requires_grad_(True)
    terms, seq, r = _transcription(xr, mask, ref, beta, delta, eps)
    total = sum(w * terms[k] for k, w in weights.items())
    (gr,) = torch.autograd.grad(total, xr, go)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.loss.double().cpu(), total.detach(), **tol)
    torch.testing.assert_close(out.seq_logps.double().cpu(), seq.detach(), **tol)
    torch.testing.assert_close(out.rewards.double().cpu(), r.detach(), **tol)
    torch.testing.assert_close(gx.double().cpu(), gr, **tol)


def test_fused_linear_head_cuda_matches_fp64_torch():
    """The fused linear + log-prob head (issue 12) on CUDA, once it exists, against fp64 PyTorch."""
    if not hasattr(ops, "linear_token_logprobs"):
        pytest.skip("megatron_spot.ops.linear_token_logprobs does not exist yet (issue 12)")
    torch.set_float32_matmul_precision("highest")  # fp32 GEMMs, not TF32, so the fp32 tolerances hold
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, H, V = 67, 2, 96, 3001
    # bf16: the GEMMs round inputs and partial sums to bf16, so gradients are compared by their
    # relative Frobenius error (<= 1e-2), fp32 element by element
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 6e-2)):
        hidden = torch.randn(s, b, H, device="cuda", generator=g).to(dtype)
        weight = (torch.randn(V, H, device="cuda", generator=g) * H**-0.5).to(dtype)
        targets = torch.randint(0, V, (s, b), device="cuda", generator=g)
        targets[3, 0] = IGNORE
        go = torch.rand(s, b, device="cuda", generator=g)

        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp = ops.linear_token_logprobs(h, w, targets, chunk_size=29)  # 29 does not divide 134 tokens
        gh, gw = torch.autograd.grad(lp, (h, w), go)

        hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
        logits = hr @ wr.t()
        scored = targets != IGNORE
        ref = torch.log_softmax(logits, -1).gather(-1, torch.where(scored, targets, 0)[..., None]).squeeze(-1)
        ref = torch.where(scored, ref, torch.zeros_like(ref))
        ghr, gwr = torch.autograd.grad((ref * go.double()).sum(), (hr, wr))
        torch.testing.assert_close(lp.double(), ref.detach(), atol=tol, rtol=0)
        for got, want in ((gh, ghr), (gw, gwr)):
            if dtype == torch.float32:
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
            else:
                rel = float((got.double() - want).norm() / want.norm())
                assert rel <= 1e-2, f"bf16 gradient relative error {rel:.2e} > 1e-2"
