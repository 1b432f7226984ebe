"""Rollout engines behind one interface: transformers (CPU/GPU) and vLLM (GPU, optional extra)."""

from __future__ import annotations

from caopd.config.sampling import SamplingConfig
from caopd.method.types import EngineName
from caopd.rollout.base import Completion, RolloutEngine


def make_engine(loaded, engine: EngineName = "auto") -> RolloutEngine:
    """vLLM when asked for, or on ``auto`` when it is installed and a GPU is present; else transformers."""
    from caopd.rollout.transformers_engine import TransformersEngine
    from caopd.rollout.vllm_engine import VLLMEngine, vllm_available

    if engine == "vllm" or (engine == "auto" and vllm_available()):
        from caopd.models.loading import resolve_model_path

        return VLLMEngine(resolve_model_path(loaded.source), loaded.tokenizer)
    return TransformersEngine(loaded.model, loaded.tokenizer)


def make_training_engine(loaded, engine: EngineName, rank: int = 0, world_size: int = 1,
                         gpu_memory_utilization: float = 0.3) -> RolloutEngine:
    """The training rollouts' engine: transformers samples from the live student; vLLM (asked for, or ``auto``
    with vLLM and a GPU) runs beside the trainer on the same GPU and is synced after every optimizer step."""
    from caopd.rollout.transformers_engine import TransformersEngine
    from caopd.rollout.vllm_engine import VLLMEngine, vllm_available

    if engine == "vllm" or (engine == "auto" and vllm_available()):
        from caopd.models.loading import resolve_model_path

        return VLLMEngine(resolve_model_path(loaded.source), loaded.tokenizer, gpu_memory_utilization,
                          rank=rank, world_size=world_size)
    return TransformersEngine(loaded.model, loaded.tokenizer)


__all__ = ["Completion", "RolloutEngine", "SamplingConfig", "make_engine", "make_training_engine"]
