"""The rectification stages. Each one reads a file, writes its outputs atomically into the output
folder, and can run alone; network stages are resumable through the SQLite cache.

  stage      input                     outputs (in --output DIR)
  elicit     problems (.jsonl/.parquet) samples.jsonl, errors.jsonl, eval.json, rejects.elicit.jsonl
  rectify    errors.jsonl               rectified.jsonl, rejects.rectify.jsonl          (stage 2)
  verify     rectified.jsonl            verified.jsonl, rejects.verify.jsonl            (stage 3)
  filter     verified.jsonl             pairs.jsonl, rejects.filter.jsonl               (stages 4-5)
  (every stage then refreshes rejects.jsonl, report.json and change_ratio_hist.png)

Every input item of ``rectify`` ends in exactly one of pairs.jsonl or rejects.jsonl, and the
report checks that (``accounting.balanced``).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Optional

from . import prompts as P
from .cache import RequestCache, request_key
from .change_ratio import change_ratio, hf_tokenizer, whitespace_tokens
from .client import DEFAULT_MAX_ANSWER_BYTES, ChatClient, Job, api_key_from_env
from .grading import answers_match, extract_boxed, grade
from .jsonl import read_json, read_records, write_json_atomic, write_jsonl_atomic
from megatron_spot.utils.atomic import atomic_file

STAGES = ("elicit", "rectify", "verify", "filter")


@dataclass
class PipelineConfig:
    output_dir: str
    # Oracle (stage 2)
    oracle_base_url: Optional[str] = None
    oracle_model: Optional[str] = None
    oracle_api_key_env: tuple = ("ORACLE_API_KEY", "OPENAI_API_KEY")
    concurrency: int = 8
    timeout: float = 300.0
    max_retries: int = 6              # the openai SDK's retries (backoff and Retry-After: see client.py)
    max_requests: Optional[int] = None
    max_answer_bytes: Optional[int] = DEFAULT_MAX_ANSWER_BYTES  # larger responses: rejected, counted as capped
    with_ground_truth: bool = False
    prompt_version: str = P.DEFAULT_PROMPT_VERSION
    start_marker: str = P.START_MARKER
    end_marker: str = P.END_MARKER
    oracle_temperature: Optional[float] = None
    oracle_max_tokens: Optional[int] = None
    oracle_extra_body: Optional[dict] = None
    price_prompt_per_mtok: float = 0.0
    price_completion_per_mtok: float = 0.0
    # Filter (stage 4)
    gamma: float = 0.6
    tokenizer: Optional[str] = None  # None: whitespace words
    # Elicit (stage 1)
    model_base_url: Optional[str] = None
    model_name: Optional[str] = None
    model_api: str = "chat"
    model_api_key_env: tuple = ("MODEL_API_KEY",)
    local_model: Optional[str] = None
    local_batch_size: int = 8
    samples: int = 4
    temperature: float = 0.7
    top_p: float = 0.8
    max_tokens: int = 4096
    seed: Optional[int] = None
    system_prompt: Optional[str] = None
    thinking: str = "off"  # off | on | unset (chat_template_kwargs.enable_thinking for vLLM/SGLang)
    # Offline oracle / student
    offline: bool = False
    offline_faults: Any = None
    # Misc
    progress: bool = True
    cache_path: Optional[str] = None

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def public(self) -> dict:
        """The config as recorded in report.json: no secrets (keys are never on the config)."""
        d = asdict(self)
        d["offline_faults"] = None if self.offline_faults is None else asdict(self.offline_faults)
        d["oracle_api_key_env"] = list(self.oracle_api_key_env)
        d["model_api_key_env"] = list(self.model_api_key_env)
        return d


# --- record normalisation --------------------------------------------------------------------------
def _prompt_text(rec: dict) -> Optional[str]:
    for k in ("prompt", "question", "problem"):
        v = rec.get(k)
        if isinstance(v, str) and v.strip():
            return v
        if isinstance(v, list):  # verl/chat style: [{"role": "user", "content": ...}]
            parts = [m.get("content", "") for m in v if isinstance(m, dict) and m.get("role") == "user"]
            if parts:
                return "\n".join(parts)
    return None


def _ground_truth(rec: dict) -> Optional[str]:
    for k in ("ground_truth", "solution", "answer"):
        v = rec.get(k)
        if v is not None and str(v).strip():
            return str(v)
    rm = rec.get("reward_model")
    if isinstance(rm, dict) and rm.get("ground_truth") is not None:
        return str(rm["ground_truth"])
    return None


def _index(rec: dict, lineno: int):
    if rec.get("index") not in (None, ""):
        return rec["index"]
    ei = rec.get("extra_info")
    if isinstance(ei, dict) and ei.get("index") not in (None, ""):
        return ei["index"]
    if rec.get("id") not in (None, ""):
        return rec["id"]
    return lineno


def _reject(stage: str, reason: str, item: dict, detail: Any = None, **extra) -> dict:
    r = {"id": item.get("id"), "stage": stage, "reason": reason}
    if detail is not None:
        r["detail"] = detail
    for k in ("problem_id", "sample", "data_source", "prompt", "ground_truth", "model_output",
              "extracted_answer", "oracle_output", "corrected"):
        if k in item and item[k] is not None:
            r[k] = item[k]
    r.update(extra)
    return r


def _stage_stats(stage: str, input_path: str, n_in: int, n_out: int, rejects: list, **extra) -> dict:
    return {"stage": stage, "input": os.path.abspath(input_path), "finished_at": time.time(),
            "input_items": n_in, "passed": n_out, "rejected": len(rejects),
            "reasons": dict(Counter(r["reason"] for r in rejects)), **extra}


def _bar(iterable, cfg: PipelineConfig, desc: str, total: Optional[int] = None):
    if not cfg.progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="item", dynamic_ncols=True)


def _open_cache(cfg: PipelineConfig) -> RequestCache:
    os.makedirs(cfg.output_dir, exist_ok=True)
    return RequestCache(cfg.cache_path or cfg.path("cache.sqlite"))


class AllRequestsFailed(RuntimeError):
    """Every request of a network stage failed: the outputs are written (rejects with reasons), but
    the stage produced nothing and the tool exits non-zero."""


def check_not_all_failed(stage: str, results: dict, client_stats) -> None:
    """Raise AllRequestsFailed when a stage sent requests and not one succeeded (a request budget that
    ran out, or Ctrl-C, is not a failure: rerunning continues)."""
    if not results or any(r.ok for r in results.values()):
        return
    errors = Counter(r.error or "unknown" for r in results.values())
    if set(errors) <= {"budget_exhausted", "interrupted"}:
        return
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(errors.items()))
    capped = f"; {client_stats.capped} answer(s) over max_answer_bytes" if client_stats.capped else ""
    raise AllRequestsFailed(f"{stage}: all {len(results)} requests failed ({reasons}{capped}); check the server, "
                            f"the model name and --max-answer-bytes, then rerun (see {stage} rejects)")


# --- clients ------------------------------------------------------------------------------------------
def make_oracle_client(cfg: PipelineConfig, transport=None) -> ChatClient:
    common = dict(timeout=cfg.timeout, max_retries=cfg.max_retries, max_requests=cfg.max_requests, max_answer_bytes=cfg.max_answer_bytes,
                  price_prompt_per_mtok=cfg.price_prompt_per_mtok,
                  price_completion_per_mtok=cfg.price_completion_per_mtok)
    if cfg.offline and transport is None:
        from .offline import OFFLINE_BASE_URL, ORACLE_MODEL, OfflineEndpoint, OfflineTransport

        transport = OfflineTransport(OfflineEndpoint(faults=cfg.offline_faults, start_marker=cfg.start_marker,
                                                     end_marker=cfg.end_marker))
        return ChatClient(cfg.oracle_base_url or OFFLINE_BASE_URL, cfg.oracle_model or ORACLE_MODEL,
                          transport=transport, **common)
    if not cfg.oracle_base_url or not cfg.oracle_model:
        raise ValueError("the Oracle needs --oracle-base-url and --oracle-model (or --offline)")
    return ChatClient(cfg.oracle_base_url, cfg.oracle_model, api_key=api_key_from_env(cfg.oracle_api_key_env),
                      transport=transport, **common)


# --- stage 1: elicit ----------------------------------------------------------------------------------
class LocalGenerator:
    """Sampling with transformers on this machine (small models / smoke tests)."""

    def __init__(self, model_path: str, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        from megatron_spot.platform.device import current_device

        device = current_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device, self.batch_size = device, batch_size

    def _render(self, body: dict) -> str:
        kwargs = {}
        ctk = body.get("chat_template_kwargs") or {}
        if "enable_thinking" in ctk:
            kwargs["enable_thinking"] = ctk["enable_thinking"]
        return self.tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True, **kwargs)

    def generate(self, bodies: list[dict]) -> list[tuple[str, dict]]:
        out = []
        for i in range(0, len(bodies), self.batch_size):
            chunk = bodies[i: i + self.batch_size]
            texts = [self._render(b) for b in chunk]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            b0 = chunk[0]
            if b0.get("seed") is not None:
                self.torch.manual_seed(int(b0["seed"]))
            with self.torch.no_grad():
                gen = self.model.generate(**enc, do_sample=b0["temperature"] > 0, temperature=b0["temperature"],
                                          top_p=b0["top_p"], max_new_tokens=b0["max_tokens"],
                                          pad_token_id=self.tok.pad_token_id)
            for j in range(len(chunk)):
                new = gen[j, enc["input_ids"].shape[1]:]
                text = self.tok.decode(new, skip_special_tokens=True)
                n_new = int((new != self.tok.pad_token_id).sum())
                out.append((text, {"prompt_tokens": int(enc["attention_mask"][j].sum()), "completion_tokens": n_new}))
        return out


def _elicit_body(cfg: PipelineConfig, prompt: str, k: int) -> dict:
    msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": prompt}]
    body: dict = {"messages": msgs, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    if cfg.seed is not None:
        body["seed"] = cfg.seed + k
    if cfg.thinking in ("on", "off"):
        body["chat_template_kwargs"] = {"enable_thinking": cfg.thinking == "on"}
    if cfg.model_api == "completions":
        body["prompt"] = "\n\n".join(m["content"] for m in msgs)
        del body["messages"]
        body.pop("chat_template_kwargs", None)
    return body


def elicit(input_path: str, cfg: PipelineConfig) -> dict:
    """Stage 1: K samples per problem, graded; writes samples/errors/eval. Also the evaluation."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    problems, rejects = [], []
    for lineno, rec in enumerate(read_records(input_path), 1):
        item = {"id": str(_index(rec, lineno)), "problem_id": _index(rec, lineno),
                "data_source": rec.get("data_source") or "unknown",
                "prompt": _prompt_text(rec), "ground_truth": _ground_truth(rec), "_rec": rec}
        missing = [k for k in ("prompt", "ground_truth") if item[k] is None]
        if missing:
            rejects.append(_reject("elicit", "missing_field", item, detail=missing))
            continue
        problems.append(item)

    if cfg.local_model:
        model_label = "local:" + cfg.local_model
    elif cfg.offline:
        from .offline import STUDENT_MODEL

        model_label = cfg.model_name or STUDENT_MODEL
    else:
        if not cfg.model_base_url or not cfg.model_name:
            raise ValueError("elicit needs --model-base-url and --model-name, --local-model, or --offline")
        model_label = cfg.model_name

    jobs, slots = [], []
    for p in problems:
        for k in range(cfg.samples):
            body = _elicit_body(cfg, p["prompt"], k)
            key = request_key(kind="elicit", model=model_label, body=body, sample=k)
            jobs.append(Job(key, body))
            slots.append((p, k, key))

    cache = _open_cache(cfg)
    client_stats = {}
    try:
        if cfg.local_model:
            results = _run_local(cfg, jobs, cache)
        else:
            transport = None
            if cfg.offline:
                from .offline import OfflineEndpoint, OfflineTransport

                ep = OfflineEndpoint()
                for p in problems:
                    if "offline" in p["_rec"]:
                        ep.register(p["_rec"])
                transport = OfflineTransport(ep)
            client = ChatClient(
                cfg.model_base_url or ("http://offline-student.invalid/v1" if cfg.offline else ""), model_label,
                api_key=api_key_from_env(cfg.model_api_key_env), transport=transport, api=cfg.model_api,
                timeout=cfg.timeout, max_requests=cfg.max_requests, max_answer_bytes=cfg.max_answer_bytes,
                max_retries=cfg.max_retries)
            results = client.run(jobs, cache, kind="elicit", concurrency=cfg.concurrency,
                                 progress=cfg.progress, desc="elicit: sampling")
            client_stats = client.stats.as_dict()
    finally:
        cache.close()

    samples, errors = [], []
    per_problem: dict = defaultdict(list)
    for p, k, key in _bar(slots, cfg, "elicit: grading"):
        r = results.get(key)
        if r is None or not r.ok:
            rejects.append(_reject("elicit", "generation_" + (r.error if r else "missing"),
                                   {**p, "sample": k, "id": f"{p['id']}:{k}"}))
            continue
        ok, extracted = grade(r.content, p["ground_truth"])
        rec = {"index": p["problem_id"], "sample": k, "prompt": p["prompt"], "ground_truth": p["ground_truth"],
               "model_output": r.content, "extracted_answer": extracted, "is_correct": ok,
               "data_source": p["data_source"], "finish_reason": r.finish_reason}
        samples.append(rec)
        per_problem[(p["data_source"], p["id"])].append(ok)
        if not ok:
            errors.append({k2: rec[k2] for k2 in ("index", "sample", "prompt", "ground_truth", "model_output",
                                                  "extracted_answer", "data_source")})

    by_src: dict = defaultdict(lambda: {"problems": 0, "samples": 0, "correct": 0, "acc_sum": 0.0, "pass_any": 0})
    for (src, _), oks in per_problem.items():
        for s in (by_src[src], by_src["__all__"]):
            s["problems"] += 1
            s["samples"] += len(oks)
            s["correct"] += sum(oks)
            s["acc_sum"] += sum(oks) / len(oks)
            s["pass_any"] += any(oks)
    evaluation = {}
    for src, s in sorted(by_src.items()):
        evaluation[src] = {"problems": s["problems"], "samples": s["samples"], "correct_samples": s["correct"],
                           "accuracy": s["acc_sum"] / s["problems"],  # mean over problems of mean over K
                           f"pass@{cfg.samples}": s["pass_any"] / s["problems"]}
    write_jsonl_atomic(cfg.path("samples.jsonl"), samples)
    write_jsonl_atomic(cfg.path("errors.jsonl"), errors)
    write_jsonl_atomic(cfg.path("rejects.elicit.jsonl"), rejects)
    eval_doc = {"model": model_label, "samples_per_problem": cfg.samples, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "by_data_source": evaluation}
    write_json_atomic(cfg.path("eval.json"), eval_doc)
    stats = _stage_stats("elicit", input_path, len(problems) + sum(1 for r in rejects if r["reason"] == "missing_field"),
                         len(samples), rejects, errors=len(errors), client=client_stats, accuracy=evaluation)
    write_json_atomic(cfg.path("stats.elicit.json"), stats)
    if cfg.progress:
        _print_eval(eval_doc)
    finalize(cfg)
    return stats


def _print_eval(doc: dict) -> None:
    print(f"accuracy (mean over {doc['samples_per_problem']} samples) of {doc['model']}:", file=sys.stderr)
    for src, e in doc["by_data_source"].items():
        print(f"  {src:<28} problems={e['problems']:<6} accuracy={e['accuracy']:.4f}", file=sys.stderr)


def _run_local(cfg: PipelineConfig, jobs: list, cache: RequestCache) -> dict:
    from .client import JobResult

    results, todo = {}, []
    for j in jobs:
        hit = cache.get(j.key)
        if hit is not None:
            results[j.key] = JobResult(j.key, True, hit["content"], hit["finish_reason"], hit["usage"], cached=True)
        else:
            todo.append(j)
    if todo:
        gen = LocalGenerator(cfg.local_model, cfg.local_batch_size)
        step = max(1, cfg.local_batch_size)
        for i in _bar(range(0, len(todo), step), cfg, "elicit: local generation"):
            chunk = todo[i: i + step]
            for j, (text, usage) in zip(chunk, gen.generate([j.body for j in chunk])):
                cache.put(j.key, "elicit", "local:" + cfg.local_model, text, "stop", usage)
                results[j.key] = JobResult(j.key, True, text, "stop", usage)
    return results


# --- stage 2: rectify ---------------------------------------------------------------------------------
def _oracle_sampling(cfg: PipelineConfig) -> dict:
    s: dict = {}
    if cfg.oracle_temperature is not None:
        s["temperature"] = cfg.oracle_temperature
    if cfg.oracle_max_tokens is not None:
        s["max_tokens"] = cfg.oracle_max_tokens
    if cfg.oracle_extra_body:
        s.update(cfg.oracle_extra_body)
    return s


def load_errors(input_path: str, stage: str = "rectify") -> tuple[list, list]:
    """Normalise errors.jsonl records; returns (items, rejects). Exact duplicates are rejected."""
    items, rejects, ids, seen = [], [], set(), {}
    for lineno, rec in enumerate(read_records(input_path), 1):
        pid = _index(rec, lineno)
        sample = rec.get("sample")
        iid = str(pid) if sample is None else f"{pid}:{sample}"
        if iid in ids:
            iid = f"{iid}@{lineno}"
        ids.add(iid)
        item = {"id": iid, "problem_id": pid, "sample": sample, "data_source": rec.get("data_source") or "unknown",
                "prompt": _prompt_text(rec), "ground_truth": _ground_truth(rec),
                "model_output": rec.get("model_output") or rec.get("original_answer") or rec.get("response"),
                "extracted_answer": rec.get("extracted_answer")}
        missing = [k for k in ("prompt", "ground_truth", "model_output") if not item[k]]
        if missing:
            rejects.append(_reject(stage, "missing_field", item, detail=missing))
            continue
        sig = (item["prompt"], item["model_output"])
        if sig in seen:
            rejects.append(_reject(stage, "duplicate", item, detail=f"same prompt and model_output as {seen[sig]}"))
            continue
        seen[sig] = iid
        items.append(item)
    return items, rejects


def rectify(input_path: str, cfg: PipelineConfig, transport=None) -> dict:
    """Stage 2: ask the Oracle for a minimal correction of each wrong solution; parse the markers."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    items, rejects = load_errors(input_path)
    client = make_oracle_client(cfg, transport)
    version = P.effective_version(cfg.prompt_version, cfg.with_ground_truth)
    sampling = _oracle_sampling(cfg)
    keyed = []
    for it in items:
        msgs = P.build_oracle_messages(it["prompt"], it["model_output"],
                                       it["ground_truth"] if cfg.with_ground_truth else None,
                                       cfg.prompt_version, cfg.start_marker, cfg.end_marker)
        key = request_key(kind="oracle", model=client.model, prompt_version=version, messages=msgs, sampling=sampling)
        keyed.append((it, Job(key, {"messages": msgs, **sampling})))
    cache = _open_cache(cfg)
    try:
        results = client.run([j for _, j in keyed], cache, kind="oracle", concurrency=cfg.concurrency,
                             progress=cfg.progress, desc="rectify: oracle")
    finally:
        cache.close()
    out = []
    for it, job in keyed:
        r = results[job.key]
        if not r.ok:
            reason = r.error if r.error in ("budget_exhausted", "interrupted") else "oracle_" + (r.error or "error")
            rejects.append(_reject("rectify", reason, it, attempts=r.attempts))
            continue
        corrected, why = P.parse_corrected(r.content, cfg.start_marker, cfg.end_marker)
        if corrected is None:
            if why == "no_end_marker" and r.finish_reason == "length":
                why = "truncated"
            rejects.append(_reject("rectify", why, {**it, "oracle_output": r.content}))
            continue
        out.append({**it, "corrected": corrected, "oracle_output": r.content, "oracle_model": client.model,
                    "prompt_version": version, "with_ground_truth": cfg.with_ground_truth,
                    "finish_reason": r.finish_reason, "usage": r.usage, "cached": r.cached})
    write_jsonl_atomic(cfg.path("rectified.jsonl"), out)
    write_jsonl_atomic(cfg.path("rejects.rectify.jsonl"), rejects)
    n_in = len(items) + sum(1 for r in rejects if r["reason"] in ("missing_field", "duplicate"))
    stats = _stage_stats("rectify", input_path, n_in, len(out), rejects, oracle_model=client.model,
                         prompt_version=version, client=client.stats.as_dict())
    write_json_atomic(cfg.path("stats.rectify.json"), stats)
    finalize(cfg)
    check_not_all_failed("rectify", results, client.stats)
    return stats


# --- stage 3: verify ----------------------------------------------------------------------------------
def verify(input_path: str, cfg: PipelineConfig) -> dict:
    """Stage 3: the corrected solution's final answer must equal the ground truth (math-verify)."""
    recs = read_records(input_path)
    out, rejects = [], []
    for rec in _bar(recs, cfg, "verify", total=len(recs)):
        chosen_answer = extract_boxed(rec.get("corrected"))
        rejected_answer = extract_boxed(rec.get("model_output")) or rec.get("extracted_answer")
        if chosen_answer is None:
            rejects.append(_reject("verify", "no_boxed_answer", rec))
        elif not answers_match(chosen_answer, rec["ground_truth"]):
            rejects.append(_reject("verify", "wrong_answer", rec, chosen_answer=chosen_answer))
        elif rejected_answer is not None and answers_match(rejected_answer, rec["ground_truth"]):
            rejects.append(_reject("verify", "rejected_is_correct", rec, rejected_answer=rejected_answer))
        else:
            out.append({**rec, "chosen_answer": chosen_answer, "rejected_answer": rejected_answer})
    write_jsonl_atomic(cfg.path("verified.jsonl"), out)
    write_jsonl_atomic(cfg.path("rejects.verify.jsonl"), rejects)
    stats = _stage_stats("verify", input_path, len(recs), len(out), rejects)
    write_json_atomic(cfg.path("stats.verify.json"), stats)
    finalize(cfg)
    return stats


# --- stages 4-5: filter + write pairs -------------------------------------------------------------------
def filter_pairs(input_path: str, cfg: PipelineConfig) -> dict:
    """Stage 4: R = 1 - LCS(rejected, chosen)/len(chosen) over tokens; drop R > gamma. Stage 5: pairs."""
    recs = read_records(input_path)
    tokenize = hf_tokenizer(cfg.tokenizer) if cfg.tokenizer else whitespace_tokens
    pairs, rejects, ratios = [], [], []
    for rec in _bar(recs, cfg, "filter", total=len(recs)):
        chosen, rejected = rec["corrected"], rec["model_output"]
        if chosen.strip() == rejected.strip():
            rejects.append(_reject("filter", "identical_to_rejected", rec))
            continue
        R = round(change_ratio(rejected, chosen, tokenize), 6)
        ratios.append(R)
        if R > cfg.gamma:
            rejects.append(_reject("filter", "change_ratio_above_gamma", rec, change_ratio=R, gamma=cfg.gamma))
            continue
        pairs.append({"prompt": rec["prompt"], "chosen": chosen, "rejected": rejected, "metadata": {
            "id": rec["id"], "problem_id": rec["problem_id"], "sample": rec.get("sample"),
            "ground_truth": rec["ground_truth"], "rejected_answer": rec.get("rejected_answer"),
            "chosen_answer": rec.get("chosen_answer"), "change_ratio": R, "oracle_model": rec.get("oracle_model"),
            "prompt_version": rec.get("prompt_version"), "data_source": rec.get("data_source")}})
    write_jsonl_atomic(cfg.path("pairs.jsonl"), pairs)
    write_jsonl_atomic(cfg.path("rejects.filter.jsonl"), rejects)
    stats = _stage_stats("filter", input_path, len(recs), len(pairs), rejects, gamma=cfg.gamma,
                         tokenization=("hf:" + cfg.tokenizer) if cfg.tokenizer else "whitespace",
                         change_ratio=_summary(ratios), change_ratios=ratios)
    write_json_atomic(cfg.path("stats.filter.json"), stats)
    finalize(cfg, plot=True)
    return stats


def _summary(xs: list) -> dict:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    return {"n": len(s), "mean": round(statistics.fmean(s), 6), "median": round(statistics.median(s), 6),
            "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "min": s[0], "max": s[-1]}


# --- report -------------------------------------------------------------------------------------------
def finalize(cfg: PipelineConfig, plot: bool = False) -> dict:
    """Merge the stage files into rejects.jsonl and report.json (and, with ``plot``, redraw
    change_ratio_hist.png from the filter stage's ratios; the filter stage does that)."""
    stats = {s: read_json(cfg.path(f"stats.{s}.json")) for s in STAGES}
    stats = {k: v for k, v in stats.items() if v is not None}
    all_rejects = []
    for s in STAGES:
        p = cfg.path(f"rejects.{s}.jsonl")
        if os.path.exists(p):
            all_rejects.extend(read_records(p))
    write_jsonl_atomic(cfg.path("rejects.jsonl"), all_rejects)
    n_pairs = sum(1 for _ in open(cfg.path("pairs.jsonl"), encoding="utf-8")) if os.path.exists(cfg.path("pairs.jsonl")) else None
    report: dict = {"output_dir": os.path.abspath(cfg.output_dir), "pairs": n_pairs,
                    "rejects": len(all_rejects),
                    "rejects_by_stage_and_reason": {}, "stages": {}, "config": cfg.public()}
    for r in all_rejects:
        d = report["rejects_by_stage_and_reason"].setdefault(r["stage"], {})
        d[r["reason"]] = d.get(r["reason"], 0) + 1
    for s, st in stats.items():
        report["stages"][s] = {k: v for k, v in st.items() if k != "change_ratios"}
    if all(s in stats for s in ("rectify", "verify", "filter")) and n_pairs is not None:
        n_in = stats["rectify"]["input_items"]
        n_rej = sum(stats[s]["rejected"] for s in ("rectify", "verify", "filter"))
        report["accounting"] = {"rectify_inputs": n_in, "pairs": n_pairs, "rejects_after_elicit": n_rej,
                                "balanced": n_in == n_pairs + n_rej}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "http_requests": 0, "cache_hits": 0}
    for st in stats.values():
        c = st.get("client") or {}
        for k in usage:
            usage[k] += c.get(k, 0) or 0
    report["usage"] = usage  # summed over each stage's latest run (stats.<stage>.json)
    if "filter" in stats and plot:
        _histogram(cfg, stats["filter"].get("change_ratios", []))
    if os.path.exists(cfg.path("change_ratio_hist.png")):
        report["histogram_png"] = cfg.path("change_ratio_hist.png")
    write_json_atomic(cfg.path("report.json"), report)
    return report


def _histogram(cfg: PipelineConfig, ratios: list) -> Optional[str]:
    path = cfg.path("change_ratio_hist.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # plotting is optional
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    bins = [i / 40 for i in range(41)]
    kept = [r for r in ratios if r <= cfg.gamma]
    dropped = [r for r in ratios if r > cfg.gamma]
    ax.hist([kept, dropped], bins=bins, stacked=True, color=["#3a7bd5", "#d9534f"],
            label=[f"kept ({len(kept)})", f"dropped R > {cfg.gamma} ({len(dropped)})"])
    ax.axvline(cfg.gamma, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("change ratio R = 1 - LCS(rejected, chosen) / |chosen|")
    ax.set_ylabel("pairs")
    ax.set_title("Rectified pairs: change ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


# --- compositions -------------------------------------------------------------------------------------
def run_rectify(errors_path: str, cfg: PipelineConfig, transport=None) -> dict:
    """Stages 2-5 on an errors.jsonl; returns the report."""
    rectify(errors_path, cfg, transport)
    verify(cfg.path("rectified.jsonl"), cfg)
    filter_pairs(cfg.path("verified.jsonl"), cfg)
    return read_json(cfg.path("report.json"))


def run_all(problems_path: str, cfg: PipelineConfig, transport=None) -> dict:
    """Stages 1-5."""
    elicit(problems_path, cfg)
    return run_rectify(cfg.path("errors.jsonl"), cfg, transport)
