"""Pack preference pairs into a Megatron indexed dataset plus a JSON manifest.

Pack layout for prefix P:
  P.bin            token ids (uint16 if vocab < 65,500 else int32), native little-endian
  P.idx            Megatron index; one document per pair with three sequences
                   [prompt, chosen_response + EOS, rejected_response + EOS]
  P.manifest.json  inputs, field mapping, options, counts kept/dropped by reason, length statistics,
                   tokenizer hash, file sizes/sha256 and the pack's fingerprint
Storing the prompt once per pair keeps the pack small, and the sequence boundaries are the loss masks:
training scores exactly the response sequences (EOS included), conditioned on the prompt.

All three files are written under a temporary name and renamed only when complete; on any error (or
Ctrl-C) the temporary files are removed, so a prefix either holds a complete pack or nothing new.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from megatron_spot.utils.atomic import makedirs_tracked, publish_file, remove_empty_dirs, remove_stale_temps, temp_path

from .indexed import IndexedWriter
from .readers import InputError, count_records, detect_format, expand_inputs, iter_chunks
from .schema import REASONS, FieldMapping, PairError, extract_pair, resolve_mapping
from .tokenization import (CHAT_TEMPLATE_MODES, ChatTemplateRecordError, PairTokenizer, TokenizerError,
                           default_chat_template_mode, token_dtype)

FORMAT_NAME = "megatron_spot.pairs"
FORMAT_VERSION = 1
SEQUENCES_PER_PAIR = 3
# keep-end: TRL 0.20's trainer default (truncation_mode="keep_end"), each row prompt+response keeps its last
#   max_length tokens; the default with the authors' rendering. keep-start (alias "truncate"): TRL's
#   "keep_start", each row keeps its first max_length tokens (responses keep their start). drop: skip the pair.
TRUNCATION_MODES = ("keep-end", "keep-start", "truncate", "drop")
MAX_EXAMPLES = 20


class PackError(RuntimeError):
    """The pack could not be written (bad input under --strict, no pairs kept, unreadable input...)."""


@dataclasses.dataclass
class PackOptions:
    tokenizer: str
    mapping: FieldMapping
    apply_chat_template: bool = False
    system_prompt: Optional[str] = None
    chat_template_mode: str = "non-thinking"
    chat_template: Optional[str] = None
    max_length: int = 8192
    max_prompt_length: int = 4096
    truncation: str = "keep-start"
    token_dtype: str = "int32"


def pack_fingerprint(tokenizer_hash: str, bin_sha256: str, idx_sha256: str,
                     chat_template_mode: Optional[str] = None) -> str:
    """Stable identity of a pack's content (independent of paths, timestamps and worker count).

    The chat-template mode (manifest options.chat_template_mode) is part of it, so that two renderings
    are never taken for one another; packs written before the mode existed (None) keep their fingerprint.
    """
    s = f"{FORMAT_NAME}/{FORMAT_VERSION}\0{tokenizer_hash}\0{bin_sha256}\0{idx_sha256}"
    if chat_template_mode is not None:
        s += f"\0chat_template_mode={chat_template_mode}"
    return hashlib.sha256(s.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Worker side: parse + validate + render + tokenise + length policy for one chunk of records.
_CTX = None


def _init_worker(opts: PackOptions, in_subprocess: bool, tok: Optional[PairTokenizer] = None) -> None:
    global _CTX
    if in_subprocess:
        # One process per core already; keep the Rust tokenizer single-threaded inside each worker.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tok is None:   # in-process packing reuses the caller's tokenizer (loading a 151k vocabulary takes seconds)
        tok = PairTokenizer(opts.tokenizer, chat_template=opts.chat_template,
                            chat_template_mode=opts.chat_template_mode)
    _CTX = (opts, tok)


def _texts_for(opts: PackOptions, tok: PairTokenizer, rp):
    if rp.conversational or opts.apply_chat_template:
        if rp.conversational:
            prompt, chosen, rejected = rp.prompt, rp.chosen, rp.rejected
        else:
            prompt = [{"role": "user", "content": rp.prompt}]
            chosen = [{"role": "assistant", "content": rp.chosen}]
            rejected = [{"role": "assistant", "content": rp.rejected}]
        if opts.system_prompt and not (prompt and prompt[0]["role"] == "system"):
            prompt = [{"role": "system", "content": opts.system_prompt}] + list(prompt)
        return tok.render_pair(prompt, chosen, rejected)
    return rp.prompt, rp.chosen, rp.rejected


def _process_chunk(chunk):
    src, items = chunk
    opts, tok = _CTX
    errors = []
    texts: List[str] = []
    wheres: List[str] = []
    for where, raw in items:
        try:
            rec = raw
            if isinstance(raw, (bytes, str)):
                try:
                    rec = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise PairError("malformed_json", f"not valid UTF-8 ({e.reason})", where) from None
                except json.JSONDecodeError as e:
                    raise PairError("malformed_json", f"malformed JSON: {e.msg} at column {e.colno}", where) from None
            rp = extract_pair(rec, opts.mapping, where)
            try:
                p, c, r = _texts_for(opts, tok, rp)
            except ChatTemplateRecordError as e:
                raise PairError("chat_template_error", str(e), where) from None
        except PairError as e:
            errors.append((e.reason, e.where, e.message))
            continue
        texts += (p, c, r)
        wheres.append(where)

    ids = tok.encode_batch(texts)
    eos = tok.eos_token_id
    maxp, maxl = opts.max_prompt_length, opts.max_length
    flat: List[int] = []
    lens: List[int] = []
    trunc_p = trunc_r = shared_cut = 0
    for k, where in enumerate(wheres):
        p, c, r = ids[3 * k], ids[3 * k + 1], ids[3 * k + 2]
        c = c + [eos]
        r = r + [eos]
        if not p:
            errors.append(("empty_prompt", where, "prompt tokenises to no tokens"))
            continue
        lp, lc, lr = len(p), len(c), len(r)
        if opts.truncation == "drop":
            if (maxp and lp > maxp) or (maxl and lp + max(lc, lr) > maxl):
                errors.append(("over_length", where,
                               f"prompt {lp} + longest response {max(lc, lr)} tokens exceeds "
                               f"--max-length {maxl} / --max-prompt-length {maxp}"))
                continue
        else:
            if maxp and lp > maxp:
                p = p[-maxp:]       # keep the end of the prompt (left truncation), as TRL's tokenize_row
                lp = maxp
                trunc_p += 1
            if opts.truncation == "keep-end" and maxl and lp + max(lc, lr) > maxl:
                # TRL 0.20 concatenated_forward, keep_end: each row prompt+response keeps its last maxl
                # tokens, i.e. loses its first lp + len(response) - maxl tokens, from the prompt.
                cut_c, cut_r = max(0, lp + lc - maxl), max(0, lp + lr - maxl)
                cut = max(cut_c, cut_r)
                if cut >= lp:
                    errors.append(("over_length", where,
                                   f"a response of {max(lc, lr)} tokens (EOS included) alone reaches --max-length "
                                   f"{maxl}: TRL would keep only its end, with no prompt"))
                    continue
                # One prompt serves both rows: the longer row is cut exactly as TRL cuts it; when the
                # other row needs a smaller cut, TRL would give it more prompt tokens (counted).
                shared_cut += cut_c != cut_r
                p = p[cut:]
                lp -= cut
                trunc_p += 1
            elif maxl and lp + max(lc, lr) > maxl:
                budget = maxl - lp
                if budget <= 0:
                    errors.append(("over_length", where, f"prompt of {lp} tokens leaves no room under "
                                                         f"--max-length {maxl}"))
                    continue
                c, r = c[:budget], r[:budget]   # keep the start of each response (right truncation)
                lc, lr = len(c), len(r)
                trunc_r += 1
        if c == r:
            errors.append(("identical_responses", where, "chosen and rejected tokenise identically"
                                                          + (" after truncation" if trunc_r else "")))
            continue
        flat += p
        flat += c
        flat += r
        lens += (lp, lc, lr)
    errors.sort(key=lambda e: _where_order(e[1], items))
    return {"src": src, "read": len(items), "tokens": np.array(flat, dtype=opts.token_dtype),
            "lengths": np.array(lens, dtype=np.int64), "errors": errors,
            "truncated_prompt": trunc_p, "truncated_response": trunc_r, "keep_end_shared_cut": shared_cut}


def _where_order(where, items):
    # errors are few; keep them in input order for readable reports
    for i, (w, _) in enumerate(items):
        if w == where:
            return i
    return len(items)


# ------------------------------------------------------------------------------------------------
def _length_stats(x: np.ndarray) -> dict:
    if x.size == 0:
        return {}
    q = np.percentile(x, [50, 90, 99])
    return {"min": int(x.min()), "mean": round(float(x.mean()), 2), "p50": float(q[0]), "p90": float(q[1]),
            "p99": float(q[2]), "max": int(x.max()), "total": int(x.sum())}


def _remove(paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def pack_pairs(inputs: Sequence[str], tokenizer: str, output_prefix: str, *, preset: str = "trl",
               prompt_field: Optional[str] = None, chosen_field: Optional[str] = None,
               rejected_field: Optional[str] = None, apply_chat_template: Optional[bool] = None,
               system_prompt: Optional[str] = None, chat_template_mode: Optional[str] = None,
               chat_template: Optional[str] = None, max_length: int = 8192, max_prompt_length: int = 4096,
               truncation: Optional[str] = None, workers: int = 1, strict: bool = False, chunk_size: int = 512,
               split: str = "train", progress: bool = False,
               on_error: Optional[Callable[[str, str, str], None]] = None) -> dict:
    """Pack pairs from `inputs` into `output_prefix`.{bin,idx,manifest.json}; returns the manifest.

    `apply_chat_template` defaults to True for the `spot` preset (the authors' pipeline) and False otherwise.
    `chat_template_mode` ("authors" | "non-thinking", see tokenization.py) defaults to "authors" for the
    `spot` preset and "non-thinking" otherwise; `truncation` defaults to "keep-end" (TRL 0.20's trainer)
    with the authors' rendering and "keep-start" otherwise.
    Invalid records are counted and skipped (their reasons in the manifest's `dropped`), or with
    `strict=True` the first one raises PackError. `chat_template` is template text overriding the
    tokenizer's. Raises PackError / InputError / TokenizerError on failure; nothing is left behind.
    """
    t0 = time.time()
    if apply_chat_template is None:   # the authors' script always turns their strings into chat messages
        apply_chat_template = preset == "spot"
    if chat_template_mode is None:
        chat_template_mode = default_chat_template_mode(preset)
    if chat_template_mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template_mode must be one of {CHAT_TEMPLATE_MODES}, got {chat_template_mode!r}")
    if truncation is None:
        truncation = "keep-end" if chat_template_mode == "authors" else "keep-start"
    if truncation == "truncate":
        truncation = "keep-start"
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length and max_prompt_length and max_prompt_length >= max_length:
        raise ValueError(f"--max-prompt-length ({max_prompt_length}) must be below --max-length ({max_length})")
    if workers < 1 or chunk_size < 1:
        raise ValueError("workers and chunk_size must be >= 1")
    mapping = resolve_mapping(preset, prompt_field, chosen_field, rejected_field)
    paths = expand_inputs(list(inputs))
    formats = [detect_format(p) for p in paths]
    tok = PairTokenizer(tokenizer, chat_template=chat_template, chat_template_mode=chat_template_mode)
    dtype = np.dtype(token_dtype(tok.vocab_size))
    opts = PackOptions(tokenizer, mapping, apply_chat_template, system_prompt, chat_template_mode, chat_template,
                       max_length, max_prompt_length, truncation, dtype.name)

    final = {ext: output_prefix + ext for ext in (".bin", ".idx", ".manifest.json")}
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    created = makedirs_tracked(out_dir)  # removed again if the pack fails
    # temps named by megatron_spot.utils.atomic, which also removes those of earlier killed runs
    for path in final.values():
        remove_stale_temps(path)
    tmp = {ext: temp_path(path) for ext, path in final.items()}

    per_src = [{"path": os.path.abspath(p), "format": f, "records": 0, "kept": 0} for p, f in zip(paths, formats)]
    dropped = collections.Counter({r: 0 for r in REASONS})
    examples: List[dict] = []
    trunc_p = trunc_r = shared_cut = 0
    read = kept = 0
    bar = None
    if progress:
        from tqdm import tqdm

        counts = [count_records(p, split) for p in paths]
        total = sum(counts) if all(c is not None for c in counts) else None
        bar = tqdm(total=total, unit=" pairs", desc="packing", dynamic_ncols=True, smoothing=0.1)

    pool = None
    writer = None
    try:
        writer = IndexedWriter(tmp[".bin"], dtype)
        chunks = iter_chunks(paths, chunk_size=chunk_size, split=split)
        if workers == 1:
            _init_worker(opts, in_subprocess=False, tok=tok)
            results = map(_process_chunk, chunks)
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(opts, True))
            results = _bounded_imap(pool, chunks, 2 * workers)
        for res in results:
            n_ok = res["lengths"].size // SEQUENCES_PER_PAIR
            read += res["read"]
            kept += n_ok
            per_src[res["src"]]["records"] += res["read"]
            per_src[res["src"]]["kept"] += n_ok
            trunc_p += res["truncated_prompt"]
            trunc_r += res["truncated_response"]
            shared_cut += res["keep_end_shared_cut"]
            for reason, where, message in res["errors"]:
                if strict:
                    raise PackError(f"{where}: {message} [{reason}] (--strict: no output written)")
                dropped[reason] += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"reason": reason, "where": where, "message": message})
                if on_error is not None:
                    on_error(reason, where, message)
            if n_ok:
                writer.add_documents(res["tokens"], res["lengths"], SEQUENCES_PER_PAIR)
            if bar is not None:
                bar.update(res["read"])
                bar.set_postfix(kept=kept, dropped=read - kept, refresh=False)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        files = writer.finalize(tmp[".idx"])
        if kept == 0:
            first = f"; the first: {examples[0]['where']}: {examples[0]['message']}" if examples else ""
            raise PackError(f"no pairs kept out of {read} read "
                            f"({', '.join(f'{k}: {v}' for k, v in dropped.items() if v) or 'empty input'}){first}")

        lengths = np.concatenate(writer._lengths).reshape(-1, SEQUENCES_PER_PAIR).astype(np.int64)
        pair_len = lengths[:, 0] + np.maximum(lengths[:, 1], lengths[:, 2])
        fingerprint = pack_fingerprint(tok.hash, files["bin_sha256"], files["idx_sha256"], chat_template_mode)
        elapsed = time.time() - t0
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layout": {"sequences_per_pair": SEQUENCES_PER_PAIR, "sequences": ["prompt", "chosen", "rejected"],
                       "eos_appended_to_responses": True,
                       "loss": "response sequences (chosen, rejected) are scored, EOS included; "
                               "the prompt only conditions"},
            "dtype": dtype.name,
            "tokenizer": tok.describe(),
            "tokenizer_hash": tok.hash,
            "fingerprint": fingerprint,
            "inputs": per_src,
            "field_mapping": {"preset": preset, **mapping.to_json()},
            "options": {"apply_chat_template": apply_chat_template, "system_prompt": system_prompt,
                        "chat_template_mode": chat_template_mode, "max_length": max_length,
                        "max_prompt_length": max_prompt_length, "truncation": truncation, "strict": strict,
                        "split": split},
            "counts": {"read": read, "kept": kept, "dropped": read - kept,
                       "dropped_by_reason": dict(dropped),
                       "truncated_prompt": trunc_p, "truncated_response": trunc_r,
                       # keep-end pairs whose shorter row TRL would have given more prompt tokens
                       "keep_end_shared_cut": shared_cut},
            "dropped_examples": examples,
            "length_stats": {"prompt": _length_stats(lengths[:, 0]), "chosen": _length_stats(lengths[:, 1]),
                             "rejected": _length_stats(lengths[:, 2]), "pair": _length_stats(pair_len)},
            "num_pairs": kept,
            "num_tokens": int(lengths.sum()),
            "files": {"bin": {"bytes": files["bin_bytes"], "sha256": files["bin_sha256"]},
                      "idx": {"bytes": files["idx_bytes"], "sha256": files["idx_sha256"]}},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(elapsed, 3),
            "workers": workers,
        }
        with open(tmp[".manifest.json"], "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        # Commit: drop the old manifest first so a reader never pairs a new .bin with an old manifest.
        _remove([final[".manifest.json"]])
        for ext in (".bin", ".idx", ".manifest.json"):
            publish_file(tmp[ext], final[ext])
        return manifest
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        if writer is not None:
            writer.abort()
        _remove(tmp.values())
        remove_empty_dirs(created)
        raise
    finally:
        if bar is not None:
            bar.close()


def _bounded_imap(pool, iterable, max_in_flight: int):
    """Ordered imap that keeps at most `max_in_flight` chunks queued (bounded memory)."""
    pending = collections.deque()
    for item in iterable:
        pending.append(pool.apply_async(_process_chunk, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


__all__ = ["pack_pairs", "PackError", "InputError", "TokenizerError", "pack_fingerprint", "FORMAT_NAME",
           "FORMAT_VERSION", "TRUNCATION_MODES"]
