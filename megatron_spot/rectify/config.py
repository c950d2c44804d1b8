"""The rectification pipeline's settings (one dataclass for every stage; tools/rectify.py fills it)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

from . import prompts as P
from .client import DEFAULT_MAX_ANSWER_BYTES

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
    # Misc
    progress: bool = True
    cache_path: Optional[str] = None

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def public(self) -> dict:
        """The config as recorded in report.json: no secrets (keys are never on the config)."""
        d = asdict(self)
        d["oracle_api_key_env"] = list(self.oracle_api_key_env)
        d["model_api_key_env"] = list(self.model_api_key_env)
        return d
