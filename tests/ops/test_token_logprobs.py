"""megatron_spot.ops.token_logprobs: compiled CPU kernel and PyTorch reference against a direct
log_softmax + gather transcription (fp64), on values and gradients."""
import logging
import math

import pytest
import torch

from megatron_spot import ops
from megatron_spot.ops import _backend

BACKENDS = [b for b in ("cpu", "reference") if b in ops.available_backends()]
EXT = pytest.mark.skipif(not ops.EXT_LOADED, reason=f"megatron_spot._C not built: {ops.EXT_ERROR}")


def oracle(logits, targets, ignore_index=-100, valid_vocab=None):
    """Direct transcription: log_softmax over the unpadded vocabulary, gather, 0 for ignored targets."""
    vv = logits.shape[-1] if valid_vocab is None else valid_vocab
    x = logits.double()[..., :vv]
    valid = (targets != ignore_index) & (targets >= 0) & (targets < vv)
    lp = torch.log_softmax(x, dim=-1).gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def oracle_grad(logits, targets, grad_out, **kw):
    x = logits.detach().double().requires_grad_(True)
    oracle(x, targets, **kw).backward(grad_out.double())
    return x.grad


def run(logits, targets, grad_out, backend, inplace=False, **kw):
    x = logits.detach().clone().requires_grad_(True)
    y = ops.token_logprobs(x, targets, backend=backend, inplace_backward=inplace, **kw)
    (g,) = torch.autograd.grad(y, x, grad_out)
    return y, g, x


TOL = {  # (value atol, grad atol): values are computed in fp32/fp64 from the given logits; grads are
    torch.float64: (1e-12, 1e-12),  # stored in the logits' dtype
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-5, 2e-2),
    torch.float16: (2e-5, 2e-3),
}


def make_case(shape, V, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, V, shape, generator=gen)
    flat = targets.view(-1)
    flat[0] = -100  # ignored
    if flat.numel() > 3:
        flat[1] = V + 5  # outside the vocabulary
        flat[2] = -3
        flat[3] = V - 1
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    return logits, targets, grad_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_log_softmax_gather(backend, dtype, inplace):
    logits, targets, go = make_case((6, 3), 2600, dtype)  # V > one 2048-column CPU chunk, not a multiple
    y, g, _ = run(logits, targets, go.to(ops.token_logprobs.__globals__["acc_dtype"](dtype)), backend, inplace)
    ref = oracle(logits, targets)
    vt, gt = TOL[dtype]
    assert y.shape == targets.shape and y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(y.double(), ref, atol=vt, rtol=vt)
    assert g.dtype == dtype and g.shape == logits.shape
    torch.testing.assert_close(g.double(), oracle_grad(logits, targets, go), atol=gt, rtol=0)
    flat = g.view(-1, logits.shape[-1])
    assert torch.all(flat[:3] == 0)  # ignored / out-of-vocab targets: zero gradient rows
    assert torch.all(y.view(-1)[:3] == 0)


@EXT
def test_gradcheck_fp64_extension():
    logits, targets, _ = make_case((3, 2), 37, torch.float64, seed=1)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.token_logprobs(x, targets, backend="cpu"), (x,))


@EXT
def test_extension_equals_reference_fp32():
    """The compiled kernel and the PyTorch reference agree with each other in fp32 (and each with the
    fp64 oracle): the two backends a user can switch between give the same numbers."""
    logits, targets, go = make_case((4, 5), 5000, torch.float32, seed=2)
    y, g, _ = run(logits, targets, go.float(), "cpu")
    y2, g2, _ = run(logits, targets, go.float(), "reference")
    torch.testing.assert_close(y, y2, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(g, g2, atol=2e-6, rtol=0)
    torch.testing.assert_close(y.double(), oracle(logits, targets), atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(g.double(), oracle_grad(logits, targets, go), atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_empty(backend):
    for shape in [(), (7,), (2, 3, 4)]:
        logits, _, _ = make_case(shape if shape else (1,), 50, torch.float32, seed=3)
        logits = logits.reshape(*shape, 50)
        targets = torch.randint(0, 50, shape)
        y = ops.token_logprobs(logits, targets, backend=backend)
        assert y.shape == targets.shape
        torch.testing.assert_close(y.double(), oracle(logits, targets), atol=2e-5, rtol=0)
    x = torch.randn(0, 3, 50, requires_grad=True)
    y = ops.token_logprobs(x, torch.zeros(0, 3, dtype=torch.long), backend=backend)
    y.sum().backward()
    assert y.shape == (0, 3) and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocab_excluded(backend, dtype):
    V, valid = 300, 293
    logits, targets, go = make_case((5, 2), V, dtype, seed=4)
    logits[..., valid:] = 1e4  # padding columns hold garbage: they must not count
    targets.view(-1)[4] = valid + 2  # a target inside the padding: invalid
    y, g, _ = run(logits, targets, go.float(), backend, inplace=True, valid_vocab_size=valid)
    torch.testing.assert_close(y.double(), oracle(logits, targets, valid_vocab=valid), atol=2e-5, rtol=1e-6)
    assert torch.all(g[..., valid:] == 0)
    gt = TOL[dtype][1]
    torch.testing.assert_close(g[..., :valid].double(), oracle_grad(logits, targets, go, valid_vocab=valid)[..., :valid],
                               atol=gt, rtol=0)
    assert y.view(-1)[4] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(backend, dtype):
    V = 4500
    x = torch.full((6, V), float("-inf"), dtype=torch.float64)
    t = torch.tensor([10, 4000, 7, 3000, 1, 2])
    x[0, 10], x[0, 11] = 1e4, -1e4  # confident and right
    x[1, 4000], x[1, 5] = -1e4, 1e4  # confident and wrong: log-prob -2e4
    x[2] = torch.linspace(-1e4, 1e4, V, dtype=torch.float64)  # huge spread, max at the last column
    x[3, 3000] = 0.0  # only the target is finite (whole first chunks are -inf): log-prob 0
    x[4, :] = 1e4  # all equal and huge
    x[5, :] = -1e4
    x = x.to(dtype)
    go = torch.ones(6, dtype=torch.float64)
    y, g, _ = run(x, t, go.float(), backend)
    ref = oracle(x, t)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    torch.testing.assert_close(y.double(), ref, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(g.double(), oracle_grad(x, t, go), atol=TOL[dtype][1], rtol=0)
    assert y[1].item() == pytest.approx((x[1, 4000].double() - x[1, 5].double()).item(), rel=1e-6)  # ~ -2e4
    assert y[3].item() == 0.0
    assert y[4].item() == pytest.approx(-math.log(V), abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_reuses_logits_storage(backend):
    logits, targets, go = make_case((4, 3), 700, torch.bfloat16, seed=5)
    y_ref, g_ref, _ = run(logits, targets, go.float(), backend, inplace=False)
    x = logits.clone().requires_grad_(True)
    y = ops.token_logprobs(x, targets, backend=backend, inplace_backward=True)
    (g,) = torch.autograd.grad(y, x, go.float())
    assert g.data_ptr() == x.data_ptr()  # the gradient lives in the logits' storage
    torch.testing.assert_close(g, g_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_guards_other_saved_uses(backend):
    """Another op that saved the logits notices they were overwritten (autograd version counter)."""
    logits, targets, _ = make_case((3,), 40, torch.float32, seed=6)
    x = logits.clone().requires_grad_(True)
    h = x * 1.0  # a non-leaf intermediate, as the output layer's logits are
    other = (h * h).sum()  # saves h; created first, so its backward runs after ours
    lp = ops.token_logprobs(h, targets, backend=backend, inplace_backward=True).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp + other).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_trace(backend):
    x = torch.empty(5, 2, 128, dtype=torch.bfloat16, device="meta", requires_grad=True)
    t = torch.empty(5, 2, dtype=torch.long, device="meta")
    y = ops.token_logprobs(x, t, backend=backend, inplace_backward=False)
    assert y.device.type == "meta" and y.shape == (5, 2) and y.dtype == torch.float32
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape and g.dtype == torch.bfloat16


@EXT
def test_fake_tensor_mode_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(8, 64)
        t = torch.zeros(8, dtype=torch.long)
        s = torch.ops.megatron_spot.token_logprobs_stats(x, t, 0, 64, -100)
        assert s.shape == (3, 8)
        lp = torch.empty(4, 9)
        out = torch.ops.megatron_spot.pair_loss(lp, lp, torch.empty(4), torch.empty(1), 0.1, 0.0, [1.0, 0, 0, 0])
        assert [o.shape for o in out] == [(4, 2), (4,), (4,), (4,)]

    def f(x, t):
        return ops.token_logprobs(x, t).sum()

    x = torch.randn(6, 33, requires_grad=True)
    t = torch.randint(0, 33, (6,))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, t)
    out.backward()
    torch.testing.assert_close(out.double(), oracle(x, t).sum(), atol=1e-5, rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 3, 10)
    t = torch.zeros(4, 3, dtype=torch.long)
    cases = [
        (lambda: ops.token_logprobs(x, torch.zeros(4, 2, dtype=torch.long)), ValueError, "targets shape"),
        (lambda: ops.token_logprobs(x, t.float()), TypeError, "integer"),
        (lambda: ops.token_logprobs(x.long(), t), TypeError, "float32, bfloat16"),
        (lambda: ops.token_logprobs(x, t.to("meta")), ValueError, "on meta"),
        (lambda: ops.token_logprobs(x.transpose(0, 1), t.t()), ValueError, "contiguous"),
        (lambda: ops.token_logprobs(x, t, valid_vocab_size=11), ValueError, "valid_vocab_size"),
        (lambda: ops.token_logprobs(x, t, backend="triton"), ValueError, "not one of"),
    ]
    if not ops.EXT_CUDA:
        cases.append((lambda: ops.token_logprobs(x, t, backend="cuda"), RuntimeError, "unavailable"))
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


@EXT
def test_compiled_op_validates_too():
    x, t = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    stats = torch.ops.megatron_spot.token_logprobs_stats
    with pytest.raises(RuntimeError, match="2-D"):
        stats(x[None], t, 0, 10, -100)
    with pytest.raises(RuntimeError, match="int64"):
        stats(x, t.int(), 0, 10, -100)
    with pytest.raises(RuntimeError, match="contiguous"):
        stats(torch.randn(10, 4).t(), t, 0, 10, -100)
    with pytest.raises(RuntimeError, match="must be \\[4\\]"):
        stats(x, t[:3], 0, 10, -100)
    with pytest.raises(RuntimeError, match="valid_local"):
        stats(x, t, 0, 11, -100)


def test_backend_selection(monkeypatch, caplog):
    assert ops.active_backend("cpu") == ("cpu" if ops.EXT_LOADED else "reference")
    assert ops.active_backend("cpu", "reference") == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend._env_default() == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="MEGATRON_SPOT_OPS_BACKEND"):
        _backend._env_default()
    monkeypatch.setattr(_backend, "DEFAULT", "reference")
    assert ops.active_backend("cpu") == "reference"
    monkeypatch.setattr(_backend, "_logged", set())
    with caplog.at_level(logging.INFO, logger="megatron_spot.ops"):
        ops.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
        ops.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    lines = [r.getMessage() for r in caplog.records if "megatron_spot.ops" in r.getMessage()]
    assert len(lines) == 1 and "reference" in lines[0]
