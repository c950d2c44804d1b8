"""megatron_spot.ops.linear_token_logprobs against a naive PyTorch computation
(logits = hidden @ weight.T, log_softmax over the unpadded vocabulary, gather): values and both
gradients in fp64 and fp32, bf16 inputs, extreme logits, ignored / out-of-range targets, token and
vocabulary chunks that do not divide the tokens / columns, bad input; TP=2 (and sequence parallel) over gloo
equals TP=1 in one spawn."""
import pytest
import torch

from megatron_spot import ops
from megatron_spot.ops.linear_token_logprobs import DEFAULT_CHUNK_BYTES, default_chunk_size, plan_chunks
from tests.multiprocess import run_on_ranks

BACKENDS = [b for b in ("cpu", "reference") if b in ops.available_backends()]


def naive(hidden, weight, targets, valid_vocab=None, ignore_index=-100):
    """The textbook head, in the inputs' dtype for the GEMM and fp64 for the softmax."""
    vv = weight.shape[0] if valid_vocab is None else valid_vocab
    logits = (hidden @ weight.t()).double()[..., :vv]
    valid = (targets != ignore_index) & (targets >= 0) & (targets < vv)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def naive_grads(hidden, weight, targets, grad_out, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    y = naive(h, w, targets, **kw)
    gh, gw = torch.autograd.grad(y, (h, w), grad_out.to(y.dtype))
    return y, gh, gw


def fused(hidden, weight, targets, grad_out, backend, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    y = ops.linear_token_logprobs(h, w, targets, backend=backend, **kw)
    gh, gw = torch.autograd.grad(y, (h, w), grad_out.to(y.dtype))
    return y, gh, gw


def make_case(s=9, b=3, H=24, V=700, dtype=torch.float64, seed=0, scale=1.0, valid_vocab=None):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(s, b, H, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) / H ** 0.5 * 4).to(dtype)
    vv = V if valid_vocab is None else valid_vocab
    targets = torch.randint(0, vv, (s, b), generator=gen)
    flat = targets.view(-1)
    flat[0] = -100  # ignored
    flat[1] = vv + 2 if vv + 2 < V else V + 5  # vocabulary padding / beyond the vocabulary: ignored
    flat[2] = -3
    flat[3] = vv - 1  # the last real token
    grad_out = torch.randn(s, b, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, grad_out


# 27 tokens, 23 scored: token chunks of 4 and 10 leave a remainder; 650 real columns: vocabulary chunks of
# 64 and 300 leave one; {} = the automatic plan (here vocabulary chunks: 23 tokens < 650 columns)
CHUNKINGS = [dict(chunk_size=1), dict(chunk_size=4), dict(chunk_size=10), dict(vocab_chunk_size=1),
             dict(vocab_chunk_size=64), dict(vocab_chunk_size=300), dict(vocab_chunk_size=5000), {}]
CHUNK_IDS = ["tok1", "tok4", "tok10", "voc1", "voc64", "voc300", "voc_all", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunking", CHUNKINGS, ids=CHUNK_IDS)
def test_matches_naive_values_and_grads(backend, dtype, tol, chunking):
    V, vv = 700, 650  # 50 padding rows in the weight
    hidden, weight, targets, go = make_case(dtype=dtype, V=V, valid_vocab=vv)
    y, gh, gw = fused(hidden, weight, targets, go, backend, valid_vocab_size=vv, **chunking)
    yr, ghr, gwr = naive_grads(hidden.double(), weight.double(), targets, go, valid_vocab=vv)
    assert y.shape == targets.shape and y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gh.dtype == dtype and gh.shape == hidden.shape and gw.dtype == dtype and gw.shape == weight.shape
    torch.testing.assert_close(y.double(), yr, atol=tol, rtol=0)
    torch.testing.assert_close(gh.double(), ghr, atol=tol, rtol=0)
    torch.testing.assert_close(gw.double(), gwr, atol=tol, rtol=0)
    assert torch.all(y.view(-1)[:3] == 0)  # ignored, padding and negative targets
    assert torch.all(gh.view(-1, gh.shape[-1])[:3] == 0)
    assert torch.all(gw[vv:] == 0)  # padding rows never receive gradient
    assert gwr.abs().max() > 0.1 and ghr.abs().max() > 0.1  # the comparison is not between near-zeros


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunking", [dict(chunk_size=8), dict(vocab_chunk_size=96)], ids=["tokens", "vocab"])
def test_bf16_inputs(backend, chunking):
    hidden, weight, targets, go = make_case(dtype=torch.bfloat16, V=1000, H=64, seed=3)
    y, gh, gw = fused(hidden, weight, targets, go, backend, **chunking)
    # oracle on the same bf16 numbers in fp64: the remaining error is the bf16 rounding of the logits
    yr, ghr, gwr = naive_grads(hidden.double(), weight.double(), targets, go)
    assert y.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    scale_lp = yr.abs().max().item()
    assert (y.double() - yr).abs().max().item() <= 2e-2 * scale_lp
    for g, gr in ((gh, ghr), (gw, gwr)):
        err = (g.double() - gr).abs().max().item()
        assert err <= 2e-2 * gr.abs().max().item(), (err, gr.abs().max().item())
    # and the same as today's path on bf16 logits (GEMM in bf16, then the fused token_logprobs)
    logits = (hidden @ weight.t()).contiguous()
    assert (y - ops.token_logprobs(logits, targets, backend=backend)).abs().max().item() <= 1e-2 * scale_lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunking", [dict(chunk_size=7), dict(vocab_chunk_size=33)], ids=["tokens", "vocab"])
def test_extreme_logits(backend, chunking):
    """|logits| ~ 1e4: the max-shifted statistics (merged across vocabulary chunks) stay exact in fp32."""
    hidden, weight, targets, go = make_case(dtype=torch.float32, V=500, H=16, seed=5, scale=600.0)
    y, gh, gw = fused(hidden, weight, targets, go, backend, **chunking)
    yr, ghr, gwr = naive_grads(hidden.double(), weight.double(), targets, go)
    assert (hidden.double() @ weight.double().t()).abs().max() > 5e3
    assert torch.isfinite(y).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(gh.double(), ghr, rtol=1e-4, atol=1e-3 * ghr.abs().max().item())
    torch.testing.assert_close(gw.double(), gwr, rtol=1e-4, atol=1e-3 * gwr.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunking", [dict(chunk_size=4), dict(vocab_chunk_size=64), {}], ids=["tokens", "vocab", "auto"])
def test_all_targets_ignored_gives_zeros(backend, chunking):
    hidden, weight, _, go = make_case(dtype=torch.float32)
    targets = torch.full(hidden.shape[:-1], -100)
    y, gh, gw = fused(hidden, weight, targets, go, backend, **chunking)
    assert torch.all(y == 0) and torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("chunking", [dict(chunk_size=2), dict(vocab_chunk_size=5)], ids=["tokens", "vocab"])
def test_gradcheck_fp64(chunking):
    hidden, weight, targets, _ = make_case(s=3, b=2, H=5, V=37, seed=1)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.linear_token_logprobs(a, b, targets, valid_vocab_size=33, **chunking), (h, w)
    )


def test_default_chunk_fits_budget():
    rows = default_chunk_size(151_936, torch.float32)
    assert rows % 8 == 0 and rows * 151_936 * 4 <= DEFAULT_CHUNK_BYTES < (rows + 8) * 151_936 * 4
    rows_tp8_bf16 = default_chunk_size(151_936 // 8, torch.bfloat16)  # a TP=8 shard in bf16: 16x the rows
    assert rows_tp8_bf16 * 18_992 * 2 <= DEFAULT_CHUNK_BYTES and rows_tp8_bf16 >= 15 * rows
    assert default_chunk_size(10**9, torch.float64) == 1  # a row larger than the budget still runs


def test_plan_chunks_picks_the_layout_that_rereads_less():
    # fewer tokens than columns: vocabulary chunks of the budget's width; more tokens: token chunks
    assert plan_chunks(16_384, 151_936, torch.float32) == ("vocab", default_chunk_size(16_384, torch.float32))
    assert plan_chunks(200_000, 151_936, torch.float32) == ("tokens", default_chunk_size(151_936, torch.float32))
    assert plan_chunks(16_384, 151_936 // 8, torch.bfloat16)[0] == "vocab"
    assert plan_chunks(32_768, 151_936 // 8, torch.bfloat16)[0] == "tokens"  # TP8 shard: 18,992 columns
    assert plan_chunks(10, 10, torch.float32, chunk_size=3) == ("tokens", 3)  # an explicit size wins
    assert plan_chunks(10, 10, torch.float32, vocab_chunk_size=4) == ("vocab", 4)


def test_bad_inputs_are_clear_errors():
    h, w, t, _ = make_case(dtype=torch.float32)
    f = ops.linear_token_logprobs
    with pytest.raises(TypeError, match="weight dtype torch.float64 must equal hidden dtype torch.float32"):
        f(h, w.double(), t)
    with pytest.raises(ValueError, match="does not match hidden size H=24"):
        f(h, w[:, :20], t)
    with pytest.raises(ValueError, match=r"weight must be 2-D \[V/tp, H\]"):
        f(h, w[0], t)
    with pytest.raises(ValueError, match=r"targets shape \(9, 2\) must be \(9, 3\)"):
        f(h, w, t[:, :2])
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        f(h, w, t.float())
    with pytest.raises(TypeError, match="hidden must be float32"):
        f(h.to(torch.int32), w.to(torch.int32), t)
    with pytest.raises(ValueError, match="valid_vocab_size=701 must lie in"):
        f(h, w, t, valid_vocab_size=701)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        f(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_chunk_size must be a positive int"):
        f(h, w, t, vocab_chunk_size=-1)
    with pytest.raises(ValueError, match="not both"):
        f(h, w, t, chunk_size=4, vocab_chunk_size=4)
    with pytest.raises(ValueError, match="targets is on meta but hidden is on cpu"):
        f(h, w, t.to("meta"))
    with pytest.raises(ValueError, match="sequence_parallel=True needs"):
        f(h, w, t, sequence_parallel=True)


# ---- TP=2 over gloo equals TP=1 (one spawn for every case) ------------------------------------------
def _tp_worker(rank, world_size, backends):
    import torch.distributed as dist

    from megatron_spot import ops
    from tests.ops.tp_cases import plant_edge_targets, record_all_reduces

    calls = record_all_reduces()
    group = dist.group.WORLD
    s, b, H, V_local = 6, 2, 16, 300
    V = V_local * world_size
    report = []
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            for valid_vocab in (V, V - 13, V_local - 40):  # none / part of rank 1 / all of rank 1 padded
                for sp, chunking in ((False, dict(chunk_size=5)), (True, dict(chunk_size=5)),
                                     (False, dict(vocab_chunk_size=70)), (True, dict(vocab_chunk_size=70))):
                    gen = torch.Generator().manual_seed(11)
                    hidden = torch.randn(s, b, H, generator=gen).to(dtype)
                    weight = (torch.randn(V, H, generator=gen) / 2).to(dtype)
                    targets = plant_edge_targets(torch.randint(0, valid_vocab, (s, b), generator=gen),
                                                 valid_vocab, V_local)
                    go = torch.randn(s, b, generator=gen)
                    rows = slice(rank * (s // world_size), (rank + 1) * (s // world_size))
                    h = (hidden[rows] if sp else hidden).clone().requires_grad_(True)
                    w = weight[rank * V_local:(rank + 1) * V_local].clone().requires_grad_(True)
                    before = len(calls)
                    y = ops.linear_token_logprobs(h, w, targets, tp_group=group, valid_vocab_size=valid_vocab,
                                                  sequence_parallel=sp, backend=backend, **chunking)
                    n_fwd = len(calls) - before
                    gh, gw = torch.autograd.grad(y, (h, w), go)
                    n_bwd = len(calls) - before - n_fwd
                    h1 = hidden.clone().requires_grad_(True)
                    w1 = weight.clone().requires_grad_(True)
                    y1 = ops.linear_token_logprobs(h1, w1, targets, valid_vocab_size=valid_vocab, chunk_size=7,
                                                   backend=backend)
                    gh1, gw1 = torch.autograd.grad(y1, (h1, w1), go)
                    gh1 = gh1[rows] if sp else gh1
                    gw1 = gw1[rank * V_local:(rank + 1) * V_local]
                    report.append(dict(
                        case=(backend, str(dtype), valid_vocab, sp, tuple(chunking)), n_fwd=n_fwd, n_bwd=n_bwd,
                        dy=(y - y1).abs().max().item(), ymax=y1.abs().max().item(),
                        dgh=(gh.float() - gh1.float()).abs().max().item(), ghmax=gh1.float().abs().max().item(),
                        dgw=(gw.float() - gw1.float()).abs().max().item(), gwmax=gw1.float().abs().max().item(),
                        ignored_zero=bool((y[0, 0] == 0) & (y[1, 1] == 0)),
                    ))
    return report


@pytest.mark.slow
def test_tp2_equals_tp1():
    reports = run_on_ranks(_tp_worker, world_size=2, args=(BACKENDS,))
    for rank, report in enumerate(reports):
        for r in report:
            bf16 = "bfloat16" in r["case"][1]
            # forward: MAX + SUM for all tokens (token chunks of 5 or vocabulary chunks of 70, both several
            # per rank); backward: one all-reduce of grad_hidden
            # (under sequence parallel gloo's stand-in for reduce-scatter is that same one all-reduce)
            assert r["n_fwd"] == 2 and r["n_bwd"] == 1, (rank, r)
            assert r["ignored_zero"], r
            rel = 1e-2 if bf16 else 1e-5
            assert r["dy"] <= rel * r["ymax"], (rank, r)
            assert r["dgh"] <= rel * r["ghmax"], (rank, r)
            assert r["dgw"] <= rel * r["gwmax"], (rank, r)
            shard_all_padding = r["case"][2] <= rank * 300
            assert r["ghmax"] > 0.01 and (r["gwmax"] == 0 if shard_all_padding else r["gwmax"] > 0.01), (rank, r)
        assert len(report) == len(BACKENDS) * 2 * 3 * 4 and any(r["case"][3] for r in report)
        assert {r["case"][4] for r in report} == {("chunk_size",), ("vocab_chunk_size",)}


# ---- CUDA ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference_and_naive(dtype):
    if ops.EXT_CUDA:
        backends = ["cuda", "reference"]
    else:
        backends = ["reference"]  # extension built without CUDA: still check the GEMM path on the GPU
    hidden, weight, targets, go = make_case(s=64, b=2, H=128, V=4096, dtype=dtype, seed=9, valid_vocab=4000)
    hidden, weight, targets, go = hidden.cuda(), weight.cuda(), targets.cuda(), go.cuda()
    yr, ghr, gwr = naive_grads(hidden.double(), weight.double(), targets, go, valid_vocab=4000)
    for backend in backends:
        for chunking in (dict(chunk_size=24), dict(vocab_chunk_size=700), {}):
            y, gh, gw = fused(hidden, weight, targets, go, backend, valid_vocab_size=4000, **chunking)
            rel = 2e-2 if dtype == torch.bfloat16 else 1e-4
            for got, want in ((y, yr), (gh, ghr), (gw, gwr)):
                err = (got.double() - want).abs().max().item()
                assert err <= rel * want.abs().max().item(), (backend, dtype, chunking, err)
