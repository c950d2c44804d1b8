"""Tiny HF checkpoints on disk (tests/tiny.py's models, tokenizer files, logits), and the planted or damaged
checkpoint files the fault tests (checkpoint, training, quantization) feed in."""
from __future__ import annotations

import os
import shutil

import torch

from tests.tiny import hf_model

SEQ, BATCH = 16, 2


def write_tokenizer_files(folder: str) -> None:
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 1024, "tokenizer_class": "PreTrainedTokenizerFast"}\n')
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }}{% endfor %}\n")


def tokens(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1).contiguous()
    return tok, pos


@torch.no_grad()
def hf_logits(model, tok) -> torch.Tensor:
    return model(tok).logits.float()


def make_hf_checkpoint(folder: str, preset: str, seed: int = 0, max_shard_size=None, **changes):
    _, model = hf_model(preset, seed, **changes)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    write_tokenizer_files(folder)
    return model


def read_hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


class PlantedPickle:
    """Unpickling this calls os.mkdir(marker): what a planted checkpoint file would do. The marker folder
    existing afterwards is the proof that a loader ran the payload."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def first_distcp(folder: str) -> str:
    """The first torch_dist shard (``*.distcp``) of a Megatron checkpoint folder, by name."""
    return os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith(".distcp"))[0])


def copy_with_other_weights(src: str, dst: str) -> str:
    """A copy of Megatron checkpoint `src` at `dst` whose first shard has every byte flipped: the same
    files, names, sizes and tokenizer, other weights (a checkpoint replaced in place). Returns `dst`."""
    shutil.copytree(src, dst)
    with open(first_distcp(dst), "r+b") as f:
        data = bytearray(f.read())
        f.seek(0)
        f.write(bytes(b ^ 0x55 for b in data))
    return dst
