"""vLLM rollouts for GPU machines: the same interface and outputs as the transformers engine. For training rollouts
the engine is colocated with the trainer on its GPU (one engine per torchrun process) and takes the trained
weights after every optimizer step, as TRL's colocate mode does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from caopd.config.sampling import SamplingConfig
from caopd.rollout.base import Completion, Prompt, RolloutEngine


def vllm_available() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class VLLMEngine(RolloutEngine):
    def __init__(self, model_path: str, tokenizer: Any, gpu_memory_utilization: float = 0.85,
                 dtype: str = "bfloat16", rank: int = 0, world_size: int = 1) -> None:
        """Under torchrun (``world_size`` > 1) each process runs its own engine inside the existing process group
        (vLLM's external launcher) and samples with its own seed."""
        from vllm import LLM

        from caopd.models.loading import remote_code_allowed

        self.tokenizer = tokenizer
        launcher = {"distributed_executor_backend": "external_launcher"} if world_size > 1 else {}
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       trust_remote_code=remote_code_allowed(), seed=rank, **launcher)

    def sync_weights(self, model: Any) -> None:
        """Load the student's current weights into the engine, one tensor at a time (whole ones under FSDP: every
        process takes part in gathering each), and drop the prefix cache computed with the old ones."""
        from caopd.models.distributed import full_tensor

        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, param in model.named_parameters():
            runner.load_weights([(name, full_tensor(param.detach()))])
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        # vLLM 0.33: ``vllm.inputs.TokensPrompt`` is a TypedDict whose required key is ``prompt_token_ids``
        # (list[int]); ``LLM.generate`` takes a sequence of them. Texts are encoded here, as the transformers engine
        # encodes them, so that both engines sample from the same ids.
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from caopd.models.loading import encode_text

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, seed=sampling.seed)
        requests = [TokensPrompt(prompt_token_ids=encode_text(self.tokenizer, p) if isinstance(p, str) else list(p))
                    for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        return [[Completion(o.text, list(o.token_ids), o.finish_reason == "stop") for o in out.outputs]
                for out in outputs]
