"""Shared fixture of the quantized-export tests: the tiny training workspace (tests/tiny.py: HF Qwen3 with
its tokenizer, a pack made with that tokenizer, the Megatron conversion), built once for the folder; every
test writes its exports into a folder of its own."""
import pytest


@pytest.fixture(scope="package")
def sources(tmp_path_factory):
    """dict(root, hf, pack, mcore) from tests/tiny.build_train_workspace, plus model: the HF folder's
    transformers model (fp32, eager attention), the reference the quantized outputs are compared with."""
    import torch
    import transformers

    from tests.tiny import build_train_workspace

    ws = build_train_workspace(str(tmp_path_factory.mktemp("quant")))
    model = transformers.AutoModelForCausalLM.from_pretrained(ws["hf"], dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return dict(ws, model=model)
