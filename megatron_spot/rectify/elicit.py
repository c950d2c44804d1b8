"""Stage 1, elicit: sample K solutions per problem from the model being trained, grade them with
math-verify, keep the wrong ones (errors.jsonl, the authors' form) and report accuracy per data
source (eval.json: the same command is the before/after evaluation).

Sampling goes through a ChatClient (an OpenAI-compatible vLLM/SGLang server, or whatever client the
caller passes) or, with cfg.local_model, through transformers on this machine.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from typing import Optional

from .cache import RequestCache, request_key
from .client import ChatClient, Job, JobResult, api_key_from_env
from .config import PipelineConfig
from .grading import grade
from .jsonl import read_records, write_json_atomic, write_jsonl_atomic
from .records import (ground_truth, open_cache, progress, prompt_text, record_index, refuse_unusable_input, reject,
                      stage_stats)
from .report import finalize


def make_model_client(cfg: PipelineConfig) -> ChatClient:
    """The client for the model being sampled: cfg.model_base_url / cfg.model_name."""
    if not cfg.model_base_url or not cfg.model_name:
        raise ValueError("elicit needs --model-base-url and --model-name, or --local-model")
    return ChatClient(cfg.model_base_url, cfg.model_name, api_key=api_key_from_env(cfg.model_api_key_env),
                      api=cfg.model_api, timeout=cfg.timeout, max_requests=cfg.max_requests,
                      max_answer_bytes=cfg.max_answer_bytes, max_retries=cfg.max_retries)


def _batch_settings(body: dict) -> tuple:
    return body["temperature"], body["top_p"], body["max_tokens"]


def _prompt_chars(body: dict) -> int:
    return sum(len(m.get("content") or "") for m in body.get("messages", []))


class LocalGenerator:
    """Sampling with transformers on this machine (small models / smoke tests)."""

    def __init__(self, model_path: str, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megatron_spot.platform.device import current_device

        self.torch = torch
        device = current_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            self.tok = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        except Exception as exc:  # OSError (no such folder or model id), ValueError (unknown architecture)...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"--local-model {model_path}: cannot load it with transformers ({first})") from None
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size

    def _render(self, body: dict) -> str:
        kwargs = {}
        ctk = body.get("chat_template_kwargs") or {}
        if "enable_thinking" in ctk:
            kwargs["enable_thinking"] = ctk["enable_thinking"]
        return self.tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True, **kwargs)

    def generate(self, bodies: list[dict]) -> list[tuple[str, dict]]:
        """One (text, usage) per body, in order. A batch shares one generate() call, so it holds only
        consecutive bodies with the same temperature, top-p and max_tokens (evaluation mixes benchmarks
        with different caps, e.g. IFEval's 8,192) and prompts at most twice as long as its first (left
        padding a short prompt to a long one costs more than the extra call: Connect4's rules are about
        3,000 tokens, an IFEval prompt a few dozen); the batch's first seed seeds it."""
        out = []
        i = 0
        while i < len(bodies):
            n = 1
            while (n < self.batch_size and i + n < len(bodies)
                   and _batch_settings(bodies[i + n]) == _batch_settings(bodies[i])
                   and _prompt_chars(bodies[i + n]) <= 2 * max(_prompt_chars(bodies[i]), 1)):
                n += 1
            chunk = bodies[i: i + n]
            i += n
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


def sampling_body(cfg, prompt: str, sample: int) -> dict:
    """The chat request that samples the model once: elicitation's k-th sample and evaluation's trial t
    alike. `cfg` is a PipelineConfig or an EvalConfig (system_prompt, temperature, top_p, max_tokens,
    seed: sample s sends seed + s, thinking: on | off | unset)."""
    msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": prompt}]
    body: dict = {"messages": msgs, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    if cfg.seed is not None:
        body["seed"] = cfg.seed + sample
    if cfg.thinking in ("on", "off"):
        body["chat_template_kwargs"] = {"enable_thinking": cfg.thinking == "on"}
    return body


def _elicit_body(cfg: PipelineConfig, prompt: str, k: int) -> dict:
    body = sampling_body(cfg, prompt, k)
    if cfg.model_api == "completions":  # one plain-text prompt; a completions endpoint has no chat template
        body["prompt"] = "\n\n".join(m["content"] for m in body.pop("messages"))
        body.pop("chat_template_kwargs", None)
    return body


def elicit(input_path: str, cfg: PipelineConfig, client: Optional[ChatClient] = None) -> dict:
    """Stage 1: K samples per problem, graded; writes samples/errors/eval. Also the evaluation.

    ``client`` samples the model (None: a ChatClient on cfg.model_base_url, or cfg.local_model)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    problems, rejects = [], []
    recs = read_records(input_path)
    for lineno, rec in enumerate(recs, 1):
        item = {"id": str(record_index(rec, lineno)), "problem_id": record_index(rec, lineno),
                "data_source": rec.get("data_source") or "unknown",
                "prompt": prompt_text(rec), "ground_truth": ground_truth(rec)}
        missing = [k for k in ("prompt", "ground_truth") if item[k] is None]
        if missing:
            rejects.append(reject("elicit", "missing_field", item, detail=missing))
            continue
        problems.append(item)
    refuse_unusable_input(input_path, "elicit", len(recs), len(problems), rejects,
                          "prompt|question|problem, ground_truth|solution|answer")

    if cfg.local_model:
        model_label = "local:" + cfg.local_model
    else:
        client = client or make_model_client(cfg)
        model_label = client.model

    jobs, slots = [], []
    for p in problems:
        for k in range(cfg.samples):
            body = _elicit_body(cfg, p["prompt"], k)
            key = request_key(kind="elicit", model=model_label, body=body, sample=k)
            jobs.append(Job(key, body))
            slots.append((p, k, key))

    cache = open_cache(cfg)
    client_stats = {}
    try:
        if cfg.local_model:
            results = generate_locally(cfg, jobs, cache)
        else:
            results = client.run(jobs, cache, kind="elicit", concurrency=cfg.concurrency,
                                 progress=cfg.progress, desc="elicit: sampling")
            client_stats = client.stats.as_dict()
    finally:
        cache.close()

    samples, errors = [], []
    per_problem: dict = defaultdict(list)
    for p, k, key in progress(slots, cfg, "elicit: grading"):
        r = results.get(key)
        if r is None or not r.ok:
            rejects.append(reject("elicit", "generation_" + (r.error if r else "missing"),
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
    stats = stage_stats("elicit", input_path, len(problems) + sum(1 for r in rejects if r["reason"] == "missing_field"),
                         len(samples), rejects, errors=len(errors), client=client_stats, accuracy=evaluation)
    write_json_atomic(cfg.path("stats.elicit.json"), stats)
    if cfg.progress:
        print_eval(eval_doc)
    finalize(cfg)
    return stats


def print_eval(doc: dict) -> None:
    print(f"accuracy (mean over {doc['samples_per_problem']} samples) of {doc['model']}:", file=sys.stderr)
    for src, e in doc["by_data_source"].items():
        print(f"  {src:<28} problems={e['problems']:<6} accuracy={e['accuracy']:.4f}", file=sys.stderr)


def generate_locally(cfg: PipelineConfig, jobs: list, cache: RequestCache) -> dict:
    """Answer jobs with transformers on this machine (cfg.local_model), through the same cache."""
    results, todo = {}, []
    for j in jobs:
        hit = cache.get(j.key)
        if hit is not None:
            results[j.key] = JobResult(j.key, True, hit["content"], hit["finish_reason"], hit["usage"], cached=True)
        else:
            todo.append(j)
    if todo:
        # similar requests side by side, so that batches fill up (see LocalGenerator.generate)
        todo.sort(key=lambda j: (_batch_settings(j.body), _prompt_chars(j.body)))
        gen = LocalGenerator(cfg.local_model, cfg.local_batch_size)
        step = max(1, cfg.local_batch_size)
        for i in progress(range(0, len(todo), step), cfg, "elicit: local generation"):
            chunk = todo[i: i + step]
            for j, (text, usage) in zip(chunk, gen.generate([j.body for j in chunk])):
                cache.put(j.key, "elicit", "local:" + cfg.local_model, text, "stop", usage)
                results[j.key] = JobResult(j.key, True, text, "stop", usage)
    return results
