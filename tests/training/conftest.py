"""Shared fixtures of the training tests: one tiny model, tokenizer, pack and Megatron checkpoint for the
whole session (building them costs seconds; every test writes its runs into its own sub-folder)."""
import pytest

from tests.tiny import build_train_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny HF Qwen3 + tokenizer, 32 packed pairs and the converted Megatron checkpoint."""
    return build_train_workspace(str(tmp_path_factory.mktemp("train")))
