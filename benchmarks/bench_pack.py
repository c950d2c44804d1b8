"""Pair packing throughput: megatron_spot's packer vs a one-line-at-a-time loop like Megatron's
tools/preprocess_data.py (json.loads + tokenizer call per text + IndexedDatasetBuilder.add_item per
sequence), on 20,000 synthetic pairs with a byte-level BPE tokenizer trained here by `tokenizers`.

Both produce the same pack (the benchmark checks the .bin/.idx bytes are identical).
Run: python benchmarks/bench_pack.py [--pairs 20000] [--workers 1 2] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("we solve the equation by adding both sides then subtract three from each side so that x equals "
         "four and the area of the circle is pi times radius squared hence the final answer follows since "
         "every integer n with n squared minus five n plus six equal to zero is two or three").split()


def _vocabulary(n: int = 30000, seed: int = 42):
    """A Zipf-distributed vocabulary: real words first, then pseudo-words, numbers and LaTeX bits."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    extra = ["".join(rng.choice(letters[:rng.randint(8, 26)]) for _ in range(rng.randint(2, 11)))
             for _ in range(n)]
    words = WORDS + ["$x^2+1$", "\\frac{1}{2}", "(a+b)", "=", "+", "-", ".", ",", "\n", "\n\n"] + extra
    for k in range(30, len(words), 9):       # capitalised and numeric variants along the ranking
        words[k] = words[k].capitalize()
        if k % 27 == 0:
            words[k] = str(rng.randint(0, 99999))
    cum, total = [], 0.0
    for r in range(len(words)):
        total += 1.0 / (r + 1) ** 1.05
        cum.append(total)
    return words, cum


_WORDS, _CUM = _vocabulary()


def synth_text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(_WORDS, cum_weights=_CUM, k=rng.randint(lo, hi)))


def make_data(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"prompt": f"Problem {i}: " + synth_text(rng, 20, 80),
                   "chosen": synth_text(rng, 80, 300) + f" Therefore, the final answer is: $\\boxed{{{i}}}$.",
                   "rejected": synth_text(rng, 80, 300) + f" So the answer is $\\boxed{{{i + 1}}}$."}
            f.write(json.dumps(rec) + "\n")


# ---- the peer: one line at a time, like Megatron's preprocess_data.py --------------------------------
class PeerEncoder:
    def __init__(self, tok_dir):
        self.tok_dir = tok_dir

    def initializer(self):
        from transformers import AutoTokenizer

        PeerEncoder.tokenizer = AutoTokenizer.from_pretrained(self.tok_dir)

    def encode(self, line):
        data = json.loads(line)
        tok = PeerEncoder.tokenizer
        ids = {}
        for key in ("prompt", "chosen", "rejected"):
            ids[key] = tok(data[key], add_special_tokens=False).input_ids
            if key != "prompt":
                ids[key].append(tok.eos_token_id)
        return ids, len(line)


def run_peer(src: str, tok_dir: str, prefix: str, workers: int) -> tuple:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    t0 = time.perf_counter()
    enc = PeerEncoder(tok_dir)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    ntok = npairs = 0
    with open(src, encoding="utf-8") as fin:
        if workers == 1:
            enc.initializer()
            encoded = map(enc.encode, fin)
            pool = None
        else:
            pool = mp.get_context("fork").Pool(workers, initializer=enc.initializer)
            encoded = pool.imap(enc.encode, fin, 32)
        for ids, _ in encoded:
            for key in ("prompt", "chosen", "rejected"):
                builder.add_item(torch.IntTensor(ids[key]))
                ntok += len(ids[key])
            builder.end_document()
            npairs += 1
        if pool is not None:
            pool.close()
            pool.join()
    builder.finalize(prefix + ".idx")
    return time.perf_counter() - t0, npairs, ntok


def run_ours(src: str, tok_dir: str, prefix: str, workers: int) -> tuple:
    from megatron_spot.data import pack_pairs

    t0 = time.perf_counter()
    m = pack_pairs([src], tok_dir, prefix, workers=workers, max_length=0, max_prompt_length=0)
    return time.perf_counter() - t0, m["counts"]["kept"], m["num_tokens"]


def _child(kind, src, tok_dir, prefix, workers, q):
    try:
        # imports first: neither side's timing includes importing transformers / megatron.core
        import megatron.core.datasets.indexed_dataset  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import megatron_spot.data  # noqa: F401
        q.put(("ok", (run_ours if kind == "ours" else run_peer)(src, tok_dir, prefix, workers)))
    except BaseException as e:  # pragma: no cover
        q.put(("err", repr(e)))


def measure(kind, src, tok_dir, prefix, workers):
    """Run in a fresh process (imports done before timing starts), so neither side warms the other."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, src, tok_dir, prefix, workers, q))
    p.start()
    status, val = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"{kind} failed: {val}")
    return val


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest counts")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()

    from megatron_spot.data.tiny_tokenizer import build_tiny_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench_pack_")
    try:
        src = os.path.join(tmp, "pairs.jsonl")
        make_data(src, args.pairs)
        rng = random.Random(1)
        corpus = [synth_text(rng, 50, 200) for _ in range(2000)]
        tok_dir = build_tiny_tokenizer(os.path.join(tmp, "tok"), corpus, vocab_size=args.vocab_size)
        rows = []
        results = {}
        for w in args.workers:
            for rep in range(args.repeats):
                for kind in ("peer", "ours"):
                    prefix = os.path.join(tmp, f"{kind}_{w}")
                    dt, n, ntok = measure(kind, src, tok_dir, prefix, w)
                    if (kind, w) not in results or dt < results[(kind, w)][0]:
                        results[(kind, w)] = (dt, n, ntok)
                    print(f"{kind:5s} workers={w}: {n} pairs, {ntok} tokens in {dt:.2f}s = {n / dt:,.0f} pairs/s, "
                          f"{ntok / dt:,.0f} tokens/s", flush=True)
            for ext in (".bin", ".idx"):
                a = open(os.path.join(tmp, f"peer_{w}{ext}"), "rb").read()
                b = open(os.path.join(tmp, f"ours_{w}{ext}"), "rb").read()
                assert a == b, f"peer and ours differ in {ext} at workers={w}"
        def rate(kind, w):
            return results[(kind, w)][1] / results[(kind, w)][0]

        best_peer = max(rate("peer", w) for w in args.workers)
        best_ours = max(rate("ours", w) for w in args.workers)
        for w in args.workers:
            for kind in ("peer", "ours"):
                dt, n, ntok = results[(kind, w)]
                label = ("peer: per-line loop like Megatron preprocess_data.py" if kind == "peer"
                         else "megatron_spot pack_pairs")
                rows.append(f"| {label} | {w} | {dt:.2f} | {n / dt:,.0f} | {ntok / dt:,.0f} | "
                            f"{rate(kind, w) / rate('peer', w):.2f}x |")
        n_tok = results[("ours", args.workers[0])][2]
        body = (
            f"{args.pairs:,} synthetic plain-string pairs ({n_tok:,} tokens; prompt 20-80 words, responses "
            f"80-300 words drawn from a Zipf(1.05) vocabulary of ~30,000 words, numbers and LaTeX bits) from JSONL, byte-level BPE (vocab {args.vocab_size}) trained here with `tokenizers`, "
            f"TRL tokenisation (prompt ids, response ids + EOS), uint16 .bin/.idx. Times include reading, "
            f"tokenizer loading and writing, not Python start-up or imports; best of {args.repeats} run(s), "
            f"each in a fresh process. Both write byte-identical packs (checked).\n\n"
            f"| packer | workers | seconds | pairs/s | tokens/s | vs peer, same workers |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n"
            f"Best of each: megatron_spot {best_ours:,.0f} pairs/s vs peer {best_peer:,.0f} pairs/s = "
            f"**{best_ours / best_peer:.1f}x** (target: at least 3x).\n\n"
            "The peer tokenises each text with one `tokenizer(text)` call (as Megatron's HuggingFace tokenizer "
            "wrapper does) and adds each sequence with `IndexedDatasetBuilder.add_item`; with >1 worker it uses "
            "`Pool.imap(encode, lines, 32)` like preprocess_data.py. megatron_spot parses JSON and tokenises "
            "512 records per batch in its workers, with a memoising byte-level BPE front end "
            "(`megatron_spot/data/fast_bpe.py`: the pre-tokeniser split is cut at word boundaries proven not "
            "to change it, and word segments and pre-tokens are looked up in caches; unseen pieces go to the "
            "Rust BPE model; it is enabled only for pipelines it reproduces, checked on probe strings at load "
            "and on one text per batch), then writes with a vectorised index writer. The machine's 2 cores "
            "are shared with other jobs, so absolute numbers vary between runs.\n"
        )
        print(body)
        if not args.no_write:
            from benchmarks.report import write_section

            write_section("pack", "Pair packing (tools/pack_pairs.py)",
                          "python benchmarks/bench_pack.py --pairs %d --workers %s"
                          % (args.pairs, " ".join(map(str, args.workers))), body)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
