"""Per-token log-probs of the targets straight from the final hidden states: the output GEMM and the
vocab-parallel log-softmax fused chunk by chunk, so the `[tokens, V/tp]` logits never exist at once.

Forward, per chunk of tokens: logits_c = hidden_c @ weight.T (torch GEMM: cuBLAS / MKL), then our
statistics kernel (`token_logprobs_stats`) reduces them to per-token (local max, local sum-exp,
target logit) and the chunk is freed. The statistics of ALL tokens are then combined over the
tensor-parallel group with two all-reduces in total (MAX, then one SUM), however many chunks.
Backward recomputes each chunk's logits (the price of not storing them: one extra GEMM), turns them
into the softmax gradient in place with our gradient kernel, and accumulates grad_hidden and
grad_weight from that buffer; grad_hidden is all-reduced over TP once (a column-parallel linear's
input gradient), or reduce-scattered along the sequence under sequence parallelism.

Chunks run along the tokens or along this rank's vocabulary, whichever re-reads less: every chunk
re-reads (and in backward re-writes, as an accumulator) the operand that is NOT chunked, which is the
[V_local, H] weight and its gradient for token chunks but only the [T, H] hidden states and their
gradient for vocabulary chunks. With the same logits budget both make T x V_local / budget chunks, so
vocabulary chunks move less memory whenever T < V_local (16k tokens against 151,936 columns at TP1:
9x less), and token chunks win beyond it. A vocabulary chunk is handled exactly like a tensor-parallel
shard (its own column offset); its statistics are merged into the running per-token ones in place
(online softmax), so the TP all-reduces stay two in all.

Tokens whose target is ignored or outside the vocabulary are dropped before the first GEMM (their
log-prob is 0 and their gradient zero by definition), so prompt tokens in preference batches cost
nothing; vocabulary padding rows of `weight` are never multiplied either.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _backend
from .reference import acc_dtype
from .token_logprobs import IGNORE_INDEX, _tp_info, combine_vocab_parallel_stats

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Memory for one chunk's logits when chunk_size=None. 256 MiB is 440 tokens x 151,936 fp32 columns:
# under 3% of the 9.3 GiB the logits of 16k tokens would take. Fewer, larger chunks matter on CPUs:
# every chunk GEMM re-packs the [V_local, H] weight and re-reads/writes the grad_weight accumulator.
DEFAULT_CHUNK_BYTES = 256 << 20


def default_chunk_size(vocab_local: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk of logits [chunk, vocab_local] fits `budget_bytes`."""
    row_bytes = max(1, vocab_local) * torch.empty((), dtype=dtype).element_size()
    rows = max(1, budget_bytes // row_bytes)
    return rows - rows % 8 if rows >= 16 else rows  # multiples of 8 keep GEMM tiles whole


def default_vocab_chunk_size(tokens: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Vocabulary columns per chunk so that one chunk of logits [tokens, columns] fits `budget_bytes`."""
    return default_chunk_size(tokens, dtype, budget_bytes)  # same arithmetic with the roles swapped


def plan_chunks(tokens: int, vocab_local: int, dtype: torch.dtype, chunk_size: int | None = None,
                vocab_chunk_size: int | None = None) -> tuple[str, int]:
    """('tokens', rows) or ('vocab', columns) for `tokens` scored tokens against `vocab_local` columns.

    An explicit size picks its layout; with neither, the one that re-reads less memory (see the module
    docstring): vocabulary chunks when tokens < vocab_local, token chunks otherwise, sized from the
    DEFAULT_CHUNK_BYTES logits budget.
    """
    if chunk_size is not None:
        return "tokens", chunk_size
    if vocab_chunk_size is not None:
        return "vocab", vocab_chunk_size
    if tokens < vocab_local:
        return "vocab", default_vocab_chunk_size(tokens, dtype)
    return "tokens", default_chunk_size(vocab_local, dtype)


def _validate(hidden, weight, targets, tp_size: int, sequence_parallel: bool) -> None:
    name = "linear_token_logprobs"
    for arg, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"{name}: hidden must be [s, b, H] (or [tokens, H]), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D [V/tp, H], got shape {tuple(weight.shape)}")
    if hidden.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name}: hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name}: weight [V/tp, H] = {tuple(weight.shape)} does not match hidden size H={hidden.shape[-1]} "
            f"(hidden {tuple(hidden.shape)})"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name}: targets must be an integer tensor (token ids), got {targets.dtype}")
    expected = list(hidden.shape[:-1])
    if sequence_parallel:
        expected[0] *= tp_size  # hidden holds this rank's 1/tp of the sequence, targets the whole sequence
    if list(targets.shape) != expected:
        sp = f" (sequence parallel: hidden's first dim x tp={tp_size})" if sequence_parallel else ""
        raise ValueError(
            f"{name}: targets shape {tuple(targets.shape)} must be {tuple(expected)}{sp} for hidden {tuple(hidden.shape)}"
        )
    for arg, t in (("weight", weight), ("targets", targets)):
        if t.device != hidden.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but hidden is on {hidden.device}")


def _gather_sequence(x: torch.Tensor, group, tp_size: int) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * tp_size,) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_sequence(x: torch.Tensor, group, tp_size: int, tp_rank: int) -> torch.Tensor:
    shard = x.shape[0] // tp_size
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter (the op is tested on CPU with it)
        dist.all_reduce(x, group=group)
        return x[tp_rank * shard:(tp_rank + 1) * shard].clone()
    out = x.new_empty((shard,) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _ChunkBuffer:
    """One logits buffer reused by every chunk of a pass. Each chunk otherwise allocates afresh, and on
    CPUs an allocation this large is a new mapping whose pages the kernel faults in and zeroes every
    time (the CPU allocator caches nothing); the GPU's caching allocator would reuse the block anyway."""

    def __init__(self, h: torch.Tensor, rows: int, cols: int):
        self.flat = torch.empty(rows * cols, dtype=h.dtype, device=h.device)

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h @ w.T into the buffer: [chunk rows, chunk columns], contiguous, in the inputs' dtype."""
        out = self.flat[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
        return torch.mm(h, w.t(), out=out)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc in fp32 for 16-bit inputs (a gradient summed over chunks)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:  # cuBLAS accumulates 16-bit inputs into an fp32 output without a temporary
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:  # the CPU mm has no fp32 output for bf16 inputs: round each chunk's partial sum once
        acc.add_(torch.mm(a, b))


def _merge_stats_(stats: torch.Tensor, chunk: torch.Tensor) -> None:
    """Fold one vocabulary chunk's per-token (max, sum-exp, target logit) into the running `stats`
    [3, n] in place: the online-softmax merge (a chunk never holding the target contributes 0)."""
    m, c_m = stats[0], chunk[0]
    new_m = torch.maximum(m, c_m)
    # a side whose max is -inf (nothing seen yet, or every column -inf) adds nothing, without NaNs
    safe = torch.where(torch.isinf(new_m) & (new_m < 0), torch.zeros_like(new_m), new_m)
    stats[1].mul_(torch.exp(m - safe)).add_(chunk[1] * torch.exp(c_m - safe))
    stats[2].add_(chunk[2])
    stats[0].copy_(new_m)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, impl, tp_group, tp_size, tp_rank, vocab_start, valid_local,
                valid_vocab, ignore_index, chunk_rows, chunk_cols, sequence_parallel):
        H = hidden.shape[-1]
        full = _gather_sequence(hidden, tp_group, tp_size) if sequence_parallel else hidden
        h_all = full.reshape(-1, H)
        t_all = targets.reshape(-1).to(torch.int64)
        n = t_all.shape[0]
        acc = acc_dtype(hidden.dtype)
        valid = (t_all != ignore_index) & (t_all >= 0) & (t_all < valid_vocab)
        rows = valid.nonzero().squeeze(1)
        all_valid = rows.numel() == n
        h = h_all if all_valid else h_all.index_select(0, rows)
        t = t_all if all_valid else t_all.index_select(0, rows)
        t = t.contiguous()
        w = weight[:valid_local]  # vocabulary padding rows are never multiplied
        nv = h.shape[0]
        stats = torch.empty(3, nv, dtype=acc, device=hidden.device)
        stats[0].fill_(float("-inf"))
        stats[1:].zero_()
        layout, size = plan_chunks(nv, valid_local, hidden.dtype, chunk_rows, chunk_cols)
        if valid_local > 0 and nv > 0 and layout == "tokens":
            buf = _ChunkBuffer(h, min(size, nv), valid_local)
            for r0 in range(0, nv, size):
                r1 = min(nv, r0 + size)
                logits = buf.logits(h[r0:r1], w)
                stats[:, r0:r1] = impl.token_logprobs_stats(logits, t[r0:r1], vocab_start, valid_local, ignore_index)
        elif valid_local > 0 and nv > 0:
            buf = _ChunkBuffer(h, nv, min(size, valid_local))
            for c0 in range(0, valid_local, size):
                c1 = min(valid_local, c0 + size)
                logits = buf.logits(h, w[c0:c1])
                _merge_stats_(stats, impl.token_logprobs_stats(logits, t, vocab_start + c0, c1 - c0, ignore_index))
        m, s, tgt = combine_vocab_parallel_stats(stats[0], stats[1], stats[2], tp_group, tp_size)
        logs = torch.log(s)
        logp = torch.zeros(n, dtype=acc, device=hidden.device)
        logp_valid = (tgt - m) - logs
        if all_valid:
            logp = logp_valid
        else:
            logp.index_copy_(0, rows, logp_valid)
        # the gathered sequence is dropped and re-gathered in backward, as Megatron's output layer does
        ctx.save_for_backward(hidden, weight, t, rows, m.contiguous(), logs.contiguous())
        ctx.cfg = (impl, tp_group, tp_size, tp_rank, vocab_start, valid_local, ignore_index, layout, size,
                   sequence_parallel, all_valid, n)
        return logp.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, t, rows, m, logs = ctx.saved_tensors
        (impl, tp_group, tp_size, tp_rank, vocab_start, valid_local, ignore_index, layout, size, sequence_parallel,
         all_valid, n) = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        H = hidden.shape[-1]
        acc = m.dtype
        full = _gather_sequence(hidden, tp_group, tp_size) if sequence_parallel else hidden
        h_all = full.reshape(-1, H)
        h = h_all if all_valid else h_all.index_select(0, rows)
        g_all = grad_out.reshape(-1).to(acc)
        g = (g_all if all_valid else g_all.index_select(0, rows)).contiguous()
        w = weight[:valid_local]
        nv = h.shape[0]
        grad_h = None
        if need_h:  # rows of dropped (ignored) tokens stay zero
            alloc = torch.empty if all_valid else torch.zeros
            grad_h = alloc(n, H, dtype=hidden.dtype, device=hidden.device)
        work = valid_local > 0 and nv > 0
        grad_h_valid = grad_w_valid = None
        if layout == "tokens":
            # each token chunk's grad_hidden rows are final at once; grad_weight sums over all chunks
            if need_h:
                grad_h_valid = grad_h if all_valid else torch.empty(nv, H, dtype=hidden.dtype, device=hidden.device)
                if not work:
                    grad_h_valid.zero_()
            if need_w:
                grad_w_valid = torch.zeros(valid_local, H, dtype=acc, device=weight.device)
            buf = _ChunkBuffer(h, min(size, nv), valid_local) if work else None
            for r0 in range(0, nv if work else 0, size):
                r1 = min(nv, r0 + size)
                grad_logits = buf.logits(h[r0:r1], w)  # recomputed: the forward kept no logits
                impl.token_logprobs_grad_(grad_logits, t[r0:r1], g[r0:r1], m[r0:r1], logs[r0:r1], vocab_start,
                                          valid_local, ignore_index)
                if need_h:
                    torch.mm(grad_logits, w, out=grad_h_valid[r0:r1])
                if need_w:
                    _accumulate_mm(grad_w_valid, grad_logits.t(), h[r0:r1])
        else:
            # each vocabulary chunk's grad_weight rows are final at once; grad_hidden sums over all chunks
            if need_h:  # fp32 accumulator for 16-bit inputs; grad_h itself when nothing is dropped
                in_place = all_valid and hidden.dtype == acc
                grad_h_valid = grad_h.zero_() if in_place else torch.zeros(nv, H, dtype=acc, device=hidden.device)
            if need_w:
                grad_w_valid = torch.empty(valid_local, H, dtype=weight.dtype, device=weight.device)
            buf = _ChunkBuffer(h, nv, min(size, valid_local)) if work else None
            for c0 in range(0, valid_local if work else 0, size):
                c1 = min(valid_local, c0 + size)
                grad_logits = buf.logits(h, w[c0:c1])  # recomputed: the forward kept no logits
                impl.token_logprobs_grad_(grad_logits, t, g, m, logs, vocab_start + c0, c1 - c0, ignore_index)
                if need_h:
                    _accumulate_mm(grad_h_valid, grad_logits, w[c0:c1])
                if need_w:
                    torch.mm(grad_logits.t(), h, out=grad_w_valid[c0:c1])
            if need_w and not work:
                grad_w_valid.zero_()
            if need_h and not all_valid:
                grad_h_valid = grad_h_valid.to(hidden.dtype)  # index_copy_ below needs matching dtypes
        grad_hidden = grad_weight = None
        if need_h:
            if not all_valid:
                grad_h.index_copy_(0, rows, grad_h_valid)
            elif grad_h_valid is not grad_h:
                grad_h.copy_(grad_h_valid)  # the fp32 accumulator, rounded once
            grad_h = grad_h.view(full.shape)
            if sequence_parallel:
                grad_hidden = _reduce_scatter_sequence(grad_h, tp_group, tp_size, tp_rank)
            else:
                if tp_size > 1:  # every vocab shard contributes to each token's hidden-state gradient
                    dist.all_reduce(grad_h, group=tp_group)
                grad_hidden = grad_h
        if need_w:
            if valid_local == weight.shape[0] and grad_w_valid.dtype == weight.dtype:
                grad_weight = grad_w_valid
            else:
                grad_weight = torch.zeros_like(weight)
                grad_weight[:valid_local] = grad_w_valid
        return (grad_hidden, grad_weight) + (None,) * 12


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    ignore_index: int = IGNORE_INDEX,
    valid_vocab_size: int | None = None,
    chunk_size: int | None = None,
    sequence_parallel: bool = False,
    backend: str | None = None,
    vocab_chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probability of each target under softmax(hidden @ weight.T) over the full (TP-sharded)
    vocabulary, without materialising the logits.

    Args:
        hidden: [s, b, H] final hidden states (the final norm's output; any leading dims work),
            float32/bfloat16/float16/float64. Under `sequence_parallel`, this rank's [s/tp, b, H].
        weight: [V/tp, H] this rank's vocabulary shard of the output layer (or the tied embedding),
            same dtype and device as hidden. Rank r of `tp_group` holds rows [r*V/tp, (r+1)*V/tp).
        targets: [s, b] integer token ids (the whole sequence, also under sequence parallel).
        tp_group: tensor-parallel group the vocabulary is split over; None = unsplit. Forward costs
            two all-reduces for all tokens (MAX, then SUM of [sum-exp; target logit]); backward one
            all-reduce of grad_hidden (a reduce-scatter under sequence parallel).
        ignore_index: targets equal to it, and targets outside [0, valid_vocab_size), get log-prob 0
            and contribute no gradient.
        valid_vocab_size: global vocabulary without padding; weight rows >= it are excluded from the
            softmax and get zero gradient (default: V/tp x tp).
        chunk_size: tokens per GEMM chunk (chunks along the tokens).
        vocab_chunk_size: vocabulary columns per GEMM chunk (chunks along this rank's vocabulary).
            Give at most one of the two; with neither, `plan_chunks` picks the layout that re-reads
            less memory (vocabulary chunks when the scored tokens are fewer than V/tp) and sizes it
            from a 256 MiB logits budget.
        sequence_parallel: hidden arrives split along the sequence over `tp_group`: all-gather it
            (re-gathered in backward) and reduce-scatter its gradient, as Megatron's output layer does.
        backend: 'auto' | 'cuda' | 'cpu' | 'reference' for the chunk kernels (default:
            MEGATRON_SPOT_OPS_BACKEND); the GEMMs are torch's on every backend.

    Returns:
        float32 tensor shaped like `targets` (float64 for float64 inputs), differentiable with
        respect to hidden and weight.
    """
    tp_size, tp_rank = _tp_info(tp_group)
    sequence_parallel = bool(sequence_parallel)
    if sequence_parallel and tp_group is None:
        raise ValueError("linear_token_logprobs: sequence_parallel=True needs the tensor-parallel tp_group")
    _validate(hidden, weight, targets, tp_size, sequence_parallel)
    _, impl = _backend.impl_for(hidden.device, backend)
    V_local = weight.shape[0]
    global_V = V_local * tp_size
    valid_vocab_size = global_V if valid_vocab_size is None else int(valid_vocab_size)
    if not 0 < valid_vocab_size <= global_V:
        raise ValueError(
            f"linear_token_logprobs: valid_vocab_size={valid_vocab_size} must lie in [1, {global_V}] "
            f"(weight rows V/tp={V_local} x tp={tp_size})"
        )
    for name, size in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"linear_token_logprobs: {name} must be a positive int or None, got {size!r}")
    if chunk_size is not None and vocab_chunk_size is not None:
        raise ValueError("linear_token_logprobs: give chunk_size (token chunks) or vocab_chunk_size "
                         "(vocabulary chunks), not both")
    vocab_start = tp_rank * V_local
    valid_local = max(0, min(V_local, valid_vocab_size - vocab_start))
    return _LinearTokenLogprobs.apply(
        hidden, weight, targets, impl, tp_group, tp_size, tp_rank, vocab_start, valid_local, valid_vocab_size,
        int(ignore_index), chunk_size, vocab_chunk_size, sequence_parallel,
    )


__all__ = ["DEFAULT_CHUNK_BYTES", "default_chunk_size", "default_vocab_chunk_size", "linear_token_logprobs",
           "plan_chunks"]
