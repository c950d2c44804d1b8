"""The inputs a run starts from, resolved the same way by training and by reference scoring: the
model (architecture and weights folder) and the tokenizer the pack must have been packed with."""
from __future__ import annotations

import os
from typing import Optional

from megatron_spot.config import ConfigError, TrainConfig


def resolve_model(cfg: TrainConfig, resume_ckpt: Optional[str]):
    """The model's architecture (its family's config): from the checkpoint we start from, else the
    preset/config.json."""
    from megatron_spot.models import config_from_hf_dict, load_model_config

    source = os.path.join(resume_ckpt, "model") if resume_ckpt else cfg.model.init_checkpoint
    if source:
        if not os.path.isdir(source):
            raise ConfigError(f"model.init_checkpoint: {source} does not exist (convert one with "
                              f"tools/convert_checkpoint.py hf-to-mcore)")
        from megatron_spot.checkpoint.model_checkpoint import read_checkpoint_metadata

        meta = read_checkpoint_metadata(source)
        return config_from_hf_dict(meta["hf_config"], source=source), source
    return load_model_config(cfg.model.preset, cfg.model.hf_config), None


def _tokenizer_hash_of(folder: Optional[str]) -> Optional[str]:
    """The tokenizer hash of a folder that holds tokenizer files (a HF folder or a model checkpoint)."""
    from megatron_spot.data import tokenizer_hash
    from megatron_spot.data.tokenization import HF_TOKENIZER_FILES

    if folder and os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in HF_TOKENIZER_FILES):
        return tokenizer_hash(folder)
    if folder and os.path.isfile(folder):  # a sentencepiece .model file
        return tokenizer_hash(folder)
    return None


def expected_tokenizer_hash(cfg: TrainConfig, model_dir: Optional[str]) -> Optional[str]:
    """The tokenizer the pack must have been packed with: data.tokenizer, which must then be the
    tokenizer stored with the model checkpoint (when it stores one), else the checkpoint's own."""
    given = _tokenizer_hash_of(cfg.data.tokenizer)
    if cfg.data.tokenizer and given is None:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: no tokenizer files there")
    stored = _tokenizer_hash_of(model_dir)
    if given and stored and given != stored:
        from megatron_spot.data import TokenizerMismatchError

        raise TokenizerMismatchError(
            f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer stored with the checkpoint {model_dir} "
            f"({given[:12]}… vs {stored[:12]}…); use the checkpoint's tokenizer, or convert the model with the "
            "tokenizer you packed with")
    return given or stored
