"""Benchmark of the whole loss head (output GEMM included), forward + backward to hidden and weight:

(a) `ops.linear_token_logprobs` (chunked GEMM, logits never materialised, recompute in backward)
(b) today's path: logits = hidden @ weight.T, then the fused `ops.token_logprobs` (in-place backward)
plus a breakdown of (b) into its GEMMs and kernels (CPU seconds), which shows what (a)'s one extra
GEMM costs on this machine
(c) Megatron-Core: `ColumnParallelLinear` output layer + `vocab_parallel_cross_entropy` (negated)

Each case runs in a fresh subprocess. Time: wall clock of forward+backward after a warm-up, best of
`--reps`, and the process's CPU time over the same pass (all threads; it moves less than wall clock when
other work shares the cores). Memory: torch's profiler with `profile_memory=True` records every CPU allocation and free
with the running "Total Allocated" counter (the CPU allocator is otherwise invisible to tracemalloc);
the peak of that counter during one profiled forward+backward, minus the gradients it returns
(grad_hidden + grad_weight), is the memory beyond the inputs and their gradients. The process's RSS
high-water mark (VmHWM, reset first) over the same pass is shown as a cross-check.

Usage: python benchmarks/bench_loss_head.py [--tokens 4096] [--mem-tokens 16384] [--hidden 512]
       [--vocab 151936] [--reps 2] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from measure import available_bytes, init_single_process_megatron, peak_rss_bytes, print_result, reset_peak_rss, \
    rss_bytes, run_child

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMPLS = ("linear", "today", "megatron")
LABEL = {
    "linear": "(a) `linear_token_logprobs`",
    "today": "(b) GEMM + fused `token_logprobs`",
    "megatron": "(c) Megatron-Core `ColumnParallelLinear` + `vocab_parallel_cross_entropy`",
}
# rough peak-extra (x fp32 logits bytes) used only to check free memory before starting a case
EXTRA_FACTOR = {"linear": 0.05, "today": 1.05, "megatron": 1.1}
GIB = 2**30


def _head(impl: str):
    """fn(hidden [T, 1, H], weight [V, H], targets [T, 1]) -> log-probs [T, 1]."""
    import torch

    if impl == "linear":
        from megatron_spot import ops

        return lambda h, w, t: ops.linear_token_logprobs(h, w, t), ops.active_backend("cpu")
    if impl == "today":
        from megatron_spot import ops

        def today(h, w, t):
            logits = torch.matmul(h, w.t())  # what the output layer's GEMM produces: [s, b, V]
            return ops.token_logprobs(logits, t, inplace_backward=True)

        return today, ops.active_backend("cpu")
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy

    init_single_process_megatron()
    layers = {}

    def megatron(h, w, t):
        key = (tuple(w.shape), w.dtype)
        if key not in layers:  # the weight is passed in at call time, as GPTModel does for tied embeddings
            cfg = ModelParallelConfig(use_cpu_initialization=True, params_dtype=w.dtype, perform_initialization=False)
            layers[key] = ColumnParallelLinear(w.shape[1], w.shape[0], config=cfg, init_method=lambda x: x,
                                               bias=False, gather_output=False, skip_weight_param_allocation=True)
        logits, _ = layers[key](h, weight=w)
        return -vocab_parallel_cross_entropy(logits, t)

    return megatron, "megatron.core"


def _peak_allocated(prof) -> int:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
              and e.get("args", {}).get("Device Type", 0) == 0]
    return max(totals, default=0)


def run_case(impl: str, dtype_name: str, tokens: int, hidden: int, vocab: int, reps: int, timed: bool,
             measure_memory: bool = True) -> dict:
    """Child process: time forward+backward (if `timed`) and measure its peak memory once (if asked)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    fn, backend = _head(impl)
    # warm-up on a small problem (kernels, allocator pools, Megatron's layer construction)
    hw = torch.randn(8, 1, hidden).to(dtype).requires_grad_(True)
    ww = (torch.randn(vocab, hidden) * 0.05).to(dtype).requires_grad_(True)
    torch.autograd.grad(fn(hw, ww, torch.randint(0, vocab, (8, 1))), (hw, ww), torch.ones(8, 1))
    del hw, ww
    h = torch.randn(tokens, 1, hidden).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden) * (2.0 / hidden**0.5)).to(dtype).requires_grad_(True)  # logits ~ N(0, 4)
    t = torch.randint(0, vocab, (tokens, 1))
    go = torch.ones(tokens, 1)
    times, cpu_times = [], []
    for _ in range(reps if timed else 0):
        t0, c0 = time.perf_counter(), time.process_time()
        gh, gw = torch.autograd.grad(fn(h, w, t), (h, w), go)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # CPU seconds of all threads: steadier under load
        del gh, gw
    grads_bytes = (h.numel() + w.numel()) * h.element_size()
    result = {"impl": impl, "dtype": dtype_name, "tokens": tokens, "hidden": hidden, "vocab": vocab,
              "backend": backend, "threads": torch.get_num_threads(), "times": times, "cpu_times": cpu_times}
    if not measure_memory:
        return result
    reset_peak_rss()
    rss0 = rss_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        gh, gw = torch.autograd.grad(fn(h, w, t), (h, w), go)
    rss_peak = peak_rss_bytes() - rss0
    peak = _peak_allocated(prof)
    result.update(peak_alloc_bytes=peak, extra_bytes=max(0, peak - grads_bytes),
                  rss_extra_bytes=max(0, rss_peak - grads_bytes), grads_bytes=grads_bytes,
                  logits_bytes=tokens * vocab * h.element_size())
    return result


def run_breakdown(tokens: int, hidden: int, vocab: int, reps: int = 2) -> dict:
    """Child process: CPU seconds of each piece of the unchunked head at T tokens (fp32), to show what
    the recompute GEMM costs on this machine: (b) = forward GEMM + stats + gradient kernel + the two
    backward GEMMs; (a) adds one more forward-shaped GEMM [T, H] x [H, V]."""
    import torch

    from megatron_spot.ops import _backend

    _, impl = _backend.impl_for(torch.device("cpu"), None)
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden)
    w = torch.randn(vocab, hidden) * (2.0 / hidden**0.5)
    t = torch.randint(0, vocab, (tokens,))
    g = torch.ones(tokens)

    def best(f):
        out = []
        for _ in range(reps):
            c0 = time.process_time()
            f()
            out.append(time.process_time() - c0)
        return min(out)

    logits = torch.mm(h, w.t())
    stats = impl.token_logprobs_stats(logits, t, 0, vocab, -100)
    m, logs = stats[0].contiguous(), torch.log(stats[1]).contiguous()
    pieces = {
        "forward GEMM [T,H]x[H,V]": best(lambda: torch.mm(h, w.t(), out=logits)),
        "statistics kernel": best(lambda: impl.token_logprobs_stats(logits, t, 0, vocab, -100)),
        "gradient kernel (in place)": best(lambda: impl.token_logprobs_grad_(logits, t, g, m, logs, 0, vocab, -100)),
        "grad_hidden GEMM [T,V]x[V,H]": best(lambda: torch.mm(logits, w)),
        "grad_weight GEMM [V,T]x[T,H]": best(lambda: torch.mm(logits.t(), h)),
    }
    return {"impl": "breakdown", "tokens": tokens, "hidden": hidden, "vocab": vocab,
            "threads": torch.get_num_threads(), "cpu_seconds": pieces}


_CACHE: dict = {}
_CACHE_PATH = None


def _cache_key(impl, dtype_name, tokens, hidden, vocab, timed, measure_memory, chunk_bytes) -> str:
    return json.dumps([impl, dtype_name, tokens, hidden, vocab, bool(timed), bool(measure_memory),
                       chunk_bytes if impl == "linear" else None])


def _load_cache(path: str) -> None:
    global _CACHE_PATH
    _CACHE_PATH = path
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    _CACHE[rec["key"]] = rec["result"]


def spawn(impl, dtype_name, tokens, hidden, vocab, reps, timed, measure_memory=True) -> dict:
    """Run one case in a child process; with --cache, a case already measured there is reused."""
    from megatron_spot.ops.linear_token_logprobs import DEFAULT_CHUNK_BYTES

    key = _cache_key(impl, dtype_name, tokens, hidden, vocab, timed, measure_memory, DEFAULT_CHUNK_BYTES)
    if key in _CACHE:
        return _CACHE[key]
    res = _spawn(impl, dtype_name, tokens, hidden, vocab, reps, timed, measure_memory)
    if _CACHE_PATH and "error" not in res:
        res["load_avg"] = os.getloadavg()[0]
        with open(_CACHE_PATH, "a") as f:
            f.write(json.dumps({"key": key, "result": res}) + "\n")
    return res


def _spawn(impl, dtype_name, tokens, hidden, vocab, reps, timed, measure_memory=True) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, dtype_name, "--tokens", str(tokens),
           "--hidden", str(hidden), "--vocab", str(vocab), "--reps", str(reps)] + ([] if timed else ["--mem-only"])
    cmd += [] if measure_memory else ["--no-mem"]
    return run_child(cmd, ROOT, on_error={"impl": impl, "dtype": dtype_name, "tokens": tokens})


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _largest_tokens(per_token: float, fixed: float, budget: float) -> int:
    return int(max(0.0, budget - fixed) // per_token) if per_token > 0 else 0


def gpu_paper(hidden: int, vocab: int, chunk_bytes: int) -> str:
    peak_bf16, hbm = 989e12, 3.35e12  # H100 SXM: dense BF16 tensor-core FLOP/s, HBM3 bytes/s
    lines = [
        "| per token, bf16, TP1 | (b) GEMM + `token_logprobs` | (a) `linear_token_logprobs` |",
        "|---|---|---|",
    ]
    for H, name in ((hidden, f"H={hidden}"), (4096, "H=4096 (Qwen3-8B)")):
        fb, fa = 6 * H * vocab, 8 * H * vocab  # (a) recomputes the forward GEMM in backward
        # HBM bytes: (b) writes the logits, reads them for the stats, reads+writes them in place for the
        # gradient, reads that gradient in both backward GEMMs: 2+2+4+4 = 12 bytes per column.
        # (a) the same per chunk plus the recompute's write: 14 bytes per column, none of it resident.
        bb, ba = 12 * vocab, 14 * vocab
        lines.append(
            f"| {name}: FLOPs | {fb / 1e9:.2f} GFLOP ({fb / peak_bf16 * 1e6:.2f} us at peak) | "
            f"{fa / 1e9:.2f} GFLOP ({fa / peak_bf16 * 1e6:.2f} us at peak, +33%) |"
        )
        lines.append(
            f"| {name}: HBM traffic | {bb / 2**20:.2f} MiB ({bb / hbm * 1e6:.2f} us) | "
            f"{ba / 2**20:.2f} MiB ({ba / hbm * 1e6:.2f} us) |"
        )
    lines.append(
        f"| resident between forward and backward | {2 * vocab / 1024:.0f} KiB of bf16 logits | "
        f"12 bytes of statistics (+ one {chunk_bytes / 2**20:.0f} MiB chunk while running) |"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "DTYPE"))
    ap.add_argument("--mem-only", action="store_true")
    ap.add_argument("--no-mem", action="store_true")
    # torch's bf16 GEMMs on CPUs without bf16 instructions (AVX2) run at 0.1-2.7 GFLOP/s: bf16 is timed
    # on fewer tokens there (every head does the same GEMMs, so the ratios still compare the heads)
    ap.add_argument("--bf16-tokens", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--mem-tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--no-write", action="store_true")
    # JSON-lines file of finished cases: a rerun (e.g. after an interruption on a busy machine) only
    # measures what is missing
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    if args.child and args.child[0] == "breakdown":
        sys.path.insert(0, ROOT)
        print_result(run_breakdown(args.tokens, args.hidden, args.vocab))
        return
    if args.child:
        sys.path.insert(0, ROOT)
        print_result(run_case(args.child[0], args.child[1], args.tokens, args.hidden, args.vocab, args.reps,
                              timed=not args.mem_only, measure_memory=not args.no_mem))
        return

    sys.path.insert(0, ROOT)
    from megatron_spot.ops.linear_token_logprobs import DEFAULT_CHUNK_BYTES, plan_chunks

    if args.cache:
        _load_cache(args.cache)
    load_before = _load()
    started = time.perf_counter()
    import torch

    bf16_native = torch.cuda.is_available() or "avx512_bf16" in open("/proc/cpuinfo").read()
    bf16_tokens = args.bf16_tokens or (args.tokens if bf16_native else 32)
    timed = {}
    for dtype_name in ("float32", "bfloat16"):
        for impl in IMPLS:
            bf16 = dtype_name == "bfloat16"
            r = spawn(impl, dtype_name, bf16_tokens if bf16 else args.tokens, args.hidden, args.vocab,
                      1 if bf16 else args.reps, True, measure_memory=not bf16)
            timed[(impl, dtype_name)] = r
            print(json.dumps(r)[:400], flush=True)
    breakdown = spawn("breakdown", "float32", args.tokens, args.hidden, args.vocab, 2, True, measure_memory=False)
    print(json.dumps(breakdown)[:400], flush=True)
    mem = {}
    for impl in IMPLS:
        need = args.mem_tokens * args.vocab * 4 * EXTRA_FACTOR[impl] * 1.1 + GIB  # + inputs, grads, slack
        if need > available_bytes():
            mem[impl] = {"impl": impl, "skipped": f"needs ~{need / GIB:.0f} GiB, {available_bytes() / GIB:.0f} GiB free"}
        else:
            mem[impl] = spawn(impl, "float32", args.mem_tokens, args.hidden, args.vocab, 1, False)
        print(json.dumps(mem[impl])[:400], flush=True)
    load_after = _load()
    minutes = (time.perf_counter() - started) / 60

    T, Tm, H, V = args.tokens, args.mem_tokens, args.hidden, args.vocab
    def load_of(r):  # 1-min load average when the case finished (2 cores); cached cases keep theirs
        if r.get("note"):
            return "2-10, earlier run"
        return f"{r['load_avg']:.1f}" if r.get("load_avg") is not None else "-"

    rows = ["| head | dtype | T | backend | fwd+bwd time (s) | vs (b) | CPU time (s) | vs (b), CPU | "
            "extra memory (GiB) | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dtype_name in ("float32", "bfloat16"):
        base = timed[("today", dtype_name)]
        for impl in IMPLS:
            r = timed[(impl, dtype_name)]
            if "error" in r:
                rows.append(f"| {LABEL[impl]} | {dtype_name} | {r['tokens']} | - | failed: "
                            f"{r['error'].splitlines()[-1][:120]} | | | | | |")
                continue
            best = min(r["times"])
            rel = f"{best / min(base['times']):.2f}x" if "times" in base else "-"
            cpu = f"{min(r['cpu_times']):.2f}" if r.get("cpu_times") else "-"
            rel_cpu = (f"{min(r['cpu_times']) / min(base['cpu_times']):.2f}x"
                       if r.get("cpu_times") and base.get("cpu_times") else "-")
            extra = f"{r['extra_bytes'] / GIB:.3f}" if "extra_bytes" in r else "not measured"
            rows.append(f"| {LABEL[impl]} | {dtype_name} | {r['tokens']} | {r['backend']} | {best:.2f} | {rel} | "
                        f"{cpu} | {rel_cpu} | {extra} | {load_of(r)} |")
    # what the recompute costs here: (b) is the sum of its pieces, (a) adds one forward-shaped GEMM
    brows, floor = [], None
    if "cpu_seconds" in breakdown:
        pieces = breakdown["cpu_seconds"]
        today_sum = sum(pieces.values())
        floor = (today_sum + pieces["forward GEMM [T,H]x[H,V]"]) / today_sum
        brows = ["| piece of (b), fp32, T=" + str(args.tokens) + " | CPU seconds | share of (b) |", "|---|---|---|"]
        brows += [f"| {k} | {v:.2f} | {100 * v / today_sum:.0f}% |" for k, v in pieces.items()]
        brows.append(f"| sum = (b) without autograd | {today_sum:.2f} | 100% |")
    logits_gib = Tm * V * 4 / GIB
    mrows = [f"| head | extra memory, profiler (GiB) | % of the fp32 logits ({logits_gib:.2f} GiB) | "
             "RSS high-water cross-check (GiB) |", "|---|---|---|---|"]  # memory does not depend on load
    for impl in IMPLS:
        r = mem[impl]
        if "extra_bytes" not in r:
            mrows.append(f"| {LABEL[impl]} | {r.get('skipped') or r.get('error', '').splitlines()[-1][:120]} | | |")
            continue
        mrows.append(f"| {LABEL[impl]} | {r['extra_bytes'] / GIB:.3f} | {100 * r['extra_bytes'] / (Tm * V * 4):.1f}% | "
                     f"{r['rss_extra_bytes'] / GIB:.3f} |")
    # largest T in the budget: inputs + their gradients (2 x (T*H + V*H) fp32) + extra(T), with
    # extra(T) linear in T through the two measured points (T and Tm)
    fits = []
    for impl in ("linear", "today"):
        a, b = timed[(impl, "float32")], mem[impl]
        if "extra_bytes" in a and "extra_bytes" in b:
            per_tok_extra = (b["extra_bytes"] - a["extra_bytes"]) / (Tm - T)
            fixed_extra = a["extra_bytes"] - per_tok_extra * T
            per_token = per_tok_extra + 2 * H * 4
            fixed = fixed_extra + 2 * V * H * 4
            n = _largest_tokens(per_token, fixed, args.budget_gib * GIB)
            fits.append(f"| {LABEL[impl]} | {per_token / 1024:.1f} KiB | {fixed / GIB:.2f} GiB | {n:,} |")
    plans = {n: plan_chunks(n, V, torch.float32) for n in (T, Tm)}
    tgt_mem = mem["linear"].get("extra_bytes")
    tgt_time = None
    if "times" in timed[("linear", "float32")] and "times" in timed[("today", "float32")]:
        tgt_time = min(timed[("linear", "float32")]["times"]) / min(timed[("today", "float32")]["times"])
    verdict = []
    if tgt_mem is not None:
        verdict.append(f"extra memory at T={Tm} fp32 is {100 * tgt_mem / (Tm * V * 4):.1f}% of the materialised "
                       f"logits (target <= 5%)")
    if tgt_time is not None:
        verdict.append(f"fp32 time is {tgt_time:.2f}x of (b) (target <= 1.35x)")
    if floor is not None:
        pieces = breakdown["cpu_seconds"]
        gemms = {k: v for k, v in pieces.items() if "GEMM" in k}
        slowest = max(gemms, key=gemms.get) == "forward GEMM [T,H]x[H,V]"
        verdict.append(f"the one extra forward-shaped GEMM alone puts the floor at {floor:.2f}x on this CPU"
                       + (" (the slowest of the three GEMM shapes here: K = H is small and the whole [T, V] output "
                          "is written)" if slowest else "")
                       + "; on a GPU, where these GEMMs are FLOP-bound, the floor is 8/6 = 1.33x")
    body = "\n".join([
        f"V={V:,}, H={H}, one sequence of T tokens ([T, 1, H] hidden), TP=1, every target scored; "
        f"load average (1/5/15 min) {load_before} before and {load_after} after ({minutes:.0f} min). "
        f"(a) runs with its default plan (`plan_chunks`, {DEFAULT_CHUNK_BYTES >> 20} MiB of fp32 logits per chunk): "
        + "; ".join(f"T={n}: {k} chunks of {c}" + (" columns" if k == "vocab" else " tokens") for n, (k, c) in plans.items())
        + ". Memory is torch's profiler allocation counter (see the script's docstring); "
        "'extra' = peak beyond the inputs and their gradients.",
        "",
        f"**Time (best of {args.reps} fp32, 1 bf16) and memory:**"
        + ("" if bf16_native else f" bf16 runs at T={bf16_tokens}: this CPU has no bf16 instructions and "
           "torch's bf16 GEMMs run at 0.1-2.7 GFLOP/s on it (fp32: ~25-50; `[T, V] @ [V, H]` is the 0.1 one), so "
           "T=4096 would take hours for every head; all three do the same bf16 GEMMs, so the ratios still "
           "compare the heads."),
        "", *rows, "",
        *(["**Where (b)'s time goes** (CPU seconds of both threads, best of 2, unchunked, outside autograd): "
            "(a) does all of it plus one more forward GEMM, to recompute the logits in backward.", "", *brows, ""]
          if brows else []),
        f"**Memory at T={Tm}, fp32:**", "", *mrows, "",
        f"**Largest T whose head fits in {args.budget_gib:.0f} GiB (fp32)**, computed (not run) from the measured "
        f"extra memory at T={T} and T={Tm} (a line through both) plus inputs and gradients "
        "(2 x (T x H + V x H) x 4 bytes):", "",
        "| head | bytes per token | fixed | largest T |", "|---|---|---|---|", *fits, "",
        "Verdict: " + ("; ".join(verdict) if verdict else "incomplete (see failures above)") + ".",
        "",
        "**GPU on paper (H100 SXM; no GPU run yet).** The price of never storing the logits is one more GEMM: "
        "(a) does 8 H V FLOPs per token against 6 H V for (b) (+33%); the GEMMs are compute-bound, the "
        "statistics/gradient kernels memory-bound and small beside them:", "",
        gpu_paper(H, V, DEFAULT_CHUNK_BYTES),
    ])
    if not args.no_write:
        sys.path.insert(0, HERE)
        from report import write_section

        cmd = "python benchmarks/bench_loss_head.py"
        write_section("loss_head", "Loss head without logits (`linear_token_logprobs`)", cmd, body)
    print(body)


if __name__ == "__main__":
    main()
