"""Rollout engines behind one interface: transformers (CPU/GPU) and vLLM (GPU, optional extra).

A stage first asks ``wants_vllm``: when vLLM samples, the stage loads the model's tokenizer and config only
(``caopd.models.loading.load_tokenizer_and_config``) and vLLM loads the weights itself; when transformers samples,
the stage loads the model (``load_model``). The factories take what was loaded.
"""

from __future__ import annotations

from typing import Any

from caopd.config.engines import RunLengths, VLLMConfig
from caopd.config.sampling import SamplingConfig
from caopd.method.types import EngineName
from caopd.rollout.base import Completion, RolloutEngine


def wants_vllm(engine: EngineName) -> bool:
    """vLLM when asked for, or on ``auto`` when it is installed and a GPU is present."""
    from caopd.rollout.vllm_engine import vllm_available

    return engine == "vllm" or (engine == "auto" and vllm_available())


def _vllm_inputs(loaded: Any) -> tuple[str, dict[str, Any], int | None]:
    """A vLLM engine's model path, config.json values and exact parameter count, from a model loaded without its
    weights; a loaded HF model is refused (its weights would sit on the GPU beside vLLM's copy)."""
    from caopd.models.loading import LoadedTokenizer, safetensors_parameters

    if not isinstance(loaded, LoadedTokenizer):
        raise TypeError("a vLLM engine starts from a model's path, tokenizer and config "
                        "(caopd.models.loading.load_tokenizer_and_config), not from a loaded model")
    return loaded.path, loaded.config.to_dict(), safetensors_parameters(loaded.path)


def make_engine(loaded: Any, engine: EngineName = "auto", vllm: VLLMConfig | None = None,
                run: RunLengths | None = None) -> RolloutEngine:
    """A standalone engine (rollout estimation, evaluation): vLLM (``wants_vllm``) from a ``LoadedTokenizer``, sized
    by ``vllm`` for the requests ``run`` describes; else transformers, sampling from the ``LoadedModel``."""
    from caopd.rollout.transformers_engine import TransformersEngine

    if wants_vllm(engine):
        from caopd.rollout.vllm_engine import VLLMEngine

        if run is None:
            raise ValueError("a vLLM engine is sized for the run: give its RunLengths")
        path, config, parameters = _vllm_inputs(loaded)
        return VLLMEngine(path, loaded.tokenizer, config, vllm or VLLMConfig(), run, parameters=parameters)
    return TransformersEngine(loaded.model, loaded.tokenizer)


def trainer_pending_bytes(model: Any) -> int:
    """What the trainer allocates on its GPU after a colocated engine has started: a gradient and AdamW's two
    moments for every trainable parameter (this process's shard under FSDP), in the parameter's dtype."""
    total = 0
    for param in model.parameters():
        if param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param
            total += 3 * local.numel() * local.element_size()
    return total


def make_training_engine(loaded: Any, engine: EngineName, rank: int = 0, world_size: int = 1,
                         vllm: VLLMConfig | None = None, run: RunLengths | None = None) -> RolloutEngine:
    """The training rollouts' engine: transformers samples from the live student (``loaded``, a ``LoadedModel``);
    vLLM (asked for, or ``auto`` with vLLM and a GPU) runs beside the trainer on the same GPU, started from the
    student's checkpoint, sized by ``vllm`` for the requests ``run`` describes within what the trainer leaves free,
    asleep from the end of each sampling to the next weight load, and synced after every optimizer step."""
    from caopd.rollout.transformers_engine import TransformersEngine

    if wants_vllm(engine):
        from caopd.models.loading import checked_model_path, safetensors_parameters
        from caopd.rollout.vllm_engine import VLLMEngine

        if run is None:
            raise ValueError("a colocated vLLM engine is sized for the run: give its RunLengths")
        path = checked_model_path(loaded.source)
        return VLLMEngine(path, loaded.tokenizer, loaded.model.config.to_dict(), vllm or VLLMConfig(), run,
                          colocated=True, rank=rank, world_size=world_size,
                          trainer_pending_bytes=trainer_pending_bytes(loaded.model),
                          parameters=safetensors_parameters(path))
    return TransformersEngine(loaded.model, loaded.tokenizer)


__all__ = ["Completion", "RolloutEngine", "RunLengths", "SamplingConfig", "VLLMConfig", "make_engine",
           "make_training_engine", "trainer_pending_bytes", "wants_vllm"]
