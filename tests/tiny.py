"""Tiny models of every family (Qwen3, Qwen3-MoE, Llama 3), batches and a training workspace shared by tests (random
weights, fp32, nothing downloaded)."""
from __future__ import annotations

import json
import os

import torch

from megatron_spot.models import load_model_config
from megatron_spot.models import GPTConfig
from megatron_spot.models import replace


def hf_config_of(cfg: GPTConfig, **changes):
    """The transformers config of `cfg` (its family's class, from the config.json we would write)."""
    import transformers

    d = dict(cfg.to_hf_dict(), **changes)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def hf_model_of(cfg: GPTConfig, seed: int = 0):
    """A transformers model of `cfg`'s family (Qwen3ForCausalLM, Qwen3MoeForCausalLM, LlamaForCausalLM; eager attention, fp32)
    with seeded random weights."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config_of(cfg, attn_implementation="eager"),
                                                          dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them so the mapping of every tensor is tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                # an MoE router (Qwen3-MoE): HF's std 0.02 makes every token's expert scores nearly equal;
                # widened, routing depends on the token and a wrong router or expert mapping shows
                p.normal_(0.0, 0.5)
    return model


def hf_state_dict(model) -> dict:
    """A transformers model's tensors under their checkpoint-file names (what save_pretrained writes and the
    converter reads): transformers 5 keeps some fused in memory (Qwen3-MoE's experts as 3-D gate_up_proj /
    down_proj) and splits them when it saves; for other models this is model.state_dict()."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, model.state_dict())


def hf_model(preset: str = "qwen3-tiny", seed: int = 0, **changes):
    """(cfg, model): the preset's config with `changes` (config fields, e.g. vocab_size=300) and
    hf_model_of(cfg, seed)."""
    cfg = replace(load_model_config(preset), **changes) if changes else load_model_config(preset)
    return cfg, hf_model_of(cfg, seed)


def random_pairs_batch(num_pairs: int, prompt_len: int, resp_len: int, vocab: int, seed: int,
                       pad_id: int = 0) -> dict:
    """One micro-batch in the engine's layout (rows: chosen..., rejected...), varied lengths."""
    g = torch.Generator().manual_seed(seed)
    L = prompt_len + resp_len
    rows = 2 * num_pairs
    tokens = torch.randint(2, vocab, (rows, L), generator=g)
    for p in range(num_pairs):  # chosen and rejected share the prompt
        tokens[num_pairs + p, :prompt_len] = tokens[p, :prompt_len]
    lengths = torch.randint(prompt_len + 2, L + 1, (rows,), generator=g)
    loss_mask = torch.zeros(rows, L)
    labels = torch.full((rows, L), -100, dtype=torch.long)
    for r in range(rows):
        n = int(lengths[r])
        tokens[r, n:] = pad_id
        labels[r, prompt_len - 1:n - 1] = tokens[r, prompt_len:n]
        loss_mask[r, prompt_len - 1:n - 1] = 1.0
    return {
        "tokens": tokens, "labels": labels, "loss_mask": loss_mask,
        "position_ids": torch.arange(L).unsqueeze(0).expand(rows, L).contiguous(),
        "attention_tokens": int(lengths.sum()),
        "ref_logps": -torch.rand(rows, generator=g) * 5 - 20.0,
    }


def build_train_workspace(root: str, num_pairs: int = 32, preset: str = "qwen3-tiny") -> dict:
    """What training and scoring read, built under `root`: a tiny HF model of `preset` (seed 0) with a byte-level BPE
    tokenizer trained on the pairs, `num_pairs` random pairs packed with the "trl" preset, and the fp32
    Megatron conversion. A plain function (no pytest), so child scripts can build the same workspace.
    Returns dict(root, hf=HF folder, pack=pack prefix, mcore=Megatron checkpoint)."""
    import numpy as np
    import transformers

    from megatron_spot.checkpoint.hf_convert import convert_hf_to_mcore
    from megatron_spot.data import build_tiny_tokenizer, pack_pairs

    rng = np.random.default_rng(0)
    words = "the a one two three plus minus equals total so answer is step then we add take".split()
    pairs = [{"prompt": f"Problem {i}: " + " ".join(rng.choice(words, 6)),
              "chosen": " ".join(rng.choice(words, int(rng.integers(4, 12)))) + f" answer {i}",
              "rejected": " ".join(rng.choice(words, int(rng.integers(4, 12)))) + f" answer {i + 1}"}
             for i in range(num_pairs)]
    ws = {"root": str(root), "hf": os.path.join(root, "hf"), "pack": os.path.join(root, "pack", "pairs"),
          "mcore": os.path.join(root, "mcore")}
    os.makedirs(os.path.dirname(ws["pack"]), exist_ok=True)
    jsonl = os.path.join(root, "pairs.jsonl")
    with open(jsonl, "w") as f:
        f.write("".join(json.dumps(p) + "\n" for p in pairs))
    build_tiny_tokenizer(ws["hf"], [p["prompt"] + " " + p["chosen"] + " " + p["rejected"] for p in pairs],
                         vocab_size=512)
    tok = transformers.AutoTokenizer.from_pretrained(ws["hf"])
    hf_cfg = hf_config_of(load_model_config(preset), eos_token_id=tok.eos_token_id, torch_dtype="float32")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).save_pretrained(ws["hf"])
    pack_pairs([jsonl], ws["hf"], ws["pack"], preset="trl")
    convert_hf_to_mcore(ws["hf"], ws["mcore"], dtype="fp32", progress=False)
    return ws


def write_reference_sidecar(ws: dict) -> None:
    """The sidecar tools/score_logprobs.py would write for ws['mcore'], with the sequence log-probs
    computed by transformers (sum over response tokens, EOS included); saves a process start."""
    import numpy as np
    import transformers

    from megatron_spot.data import PairDataset
    from megatron_spot.training.reference import reference_identity, save_ref_logps

    ds = PairDataset(ws["pack"])
    model = transformers.AutoModelForCausalLM.from_pretrained(ws["hf"], dtype=torch.float32).eval()
    values = np.zeros((len(ds), 2))
    with torch.no_grad():
        for i in range(len(ds)):
            prompt, *responses = ds.pair(i)
            for k, resp in enumerate(responses):
                ids = torch.as_tensor(np.concatenate([prompt, resp]).astype(np.int64))[None]
                logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                targets = ids[0, 1:]
                values[i, k] = logps[len(prompt) - 1:].gather(1, targets[len(prompt) - 1:, None]).sum().item()
    save_ref_logps(values, ws["pack"], ds.fingerprint, model=ws["mcore"],
                   identity=reference_identity(ws["mcore"], ds.tokenizer_hash))


def build_local_chat_model(folder: str) -> str:
    """A tiny Qwen3 with the byte-level tokenizer and a minimal chat template in `folder`, for the
    `--local-model` generation tests (random weights: they test the machinery, not the answers)."""
    import transformers

    from megatron_spot.data.tiny_tokenizer import build_tiny_tokenizer

    d = build_tiny_tokenizer(folder)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    if not tok.chat_template:
        tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16)).save_pretrained(d)
    return d
