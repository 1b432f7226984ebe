"""vLLM rollouts for GPU machines: the same interface and outputs as the transformers engine."""

from __future__ import annotations

from typing import Any

from caopd.rollout.base import Completion, RolloutEngine, SamplingConfig


def vllm_available() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class VLLMEngine(RolloutEngine):
    def __init__(self, model_path: str, tokenizer: Any, gpu_memory_utilization: float = 0.85,
                 dtype: str = "bfloat16") -> None:
        from vllm import LLM

        from caopd.models.loading import remote_code_allowed

        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       trust_remote_code=remote_code_allowed(), seed=0)

    def generate(self, prompts: list[str], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from caopd.models.loading import encode_text

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, seed=sampling.seed)
        requests = [TokensPrompt(prompt_token_ids=encode_text(self.tokenizer, p)) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        return [[Completion(o.text, list(o.token_ids), o.finish_reason == "stop") for o in out.outputs]
                for out in outputs]
