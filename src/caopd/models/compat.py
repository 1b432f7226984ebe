"""What differs between the transformers versions the project allows, in one place: the KV cache's name in a model
call and its output, the name of activation (gradient) checkpointing, and where its per-layer checkpoint sits.

transformers 5.24 renamed the cache ``past_key_values`` → ``cache``, both the model's keyword and the output's field
(the old keyword still works until 5.40, with a deprecation warning); 5.20–5.23 know only ``past_key_values``, and the
GPU image has 5.20 (vLLM 0.33 requires transformers below 5.21). 5.24 also renamed ``gradient_checkpointing_enable`` /
``is_gradient_checkpointing`` to ``activation_checkpointing_*`` (the old names warn until 6). Each name is read from
the installed classes, so each version gets its own names and no warning.

Both versions checkpoint each decoder layer (``GradientCheckpointingLayer``): 5.24 wraps the layer's ``forward``, so
module hooks (FSDP2's gather and free) run once, outside the checkpoint; 5.20 wraps ``__call__``, so they run again
inside the backward's replay (FSDP2 allows that: its forward hooks, met during the backward, only make sure the
layer is gathered). 5.24 checkpoints only with gradients on; 5.20 also under ``no_grad`` (harmless: nothing replays
without a backward).
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from caopd.errors import CaopdInputError

CACHE_NAME = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword that hands ``cache`` to a model call: ``model(..., **cache_kwargs(cache))``."""
    return {CACHE_NAME: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model call returned (``use_cache=True``)."""
    return getattr(output, CACHE_NAME)


def transformers_model(model: Any) -> Any:
    """The transformers model itself: a ``peft.PeftModel``'s base model (PEFT puts its LoRA layers into that
    model's own modules), any other model as it is."""
    return model.get_base_model() if hasattr(type(model), "get_base_model") else model


def last_logits_only(model: Any) -> dict[str, Any]:
    """Forward kwargs that make the model project only each row's last position through its head (transformers'
    ``logits_to_keep``), where its forward takes them: a prefill needs only the next-token logits, and a prompt's
    positions × vocabulary would otherwise be its largest tensor."""
    forward = transformers_model(model).forward
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}


def full_attention_cache(config: Any) -> bool:
    """Whether every layer of the model's own KV cache (``DynamicCache(config=...)``) is a plain full-attention
    ``DynamicLayer`` — the layers ``caopd.models.batching``'s prompt-sharing caches stand in for. Sliding-window,
    chunked, shared-KV (dummy) and linear-attention layers keep other states, which those caches do not model."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def check_prompt_sharing(config: Any) -> None:
    """Refuse a model whose cache keeps recurrent or linear-attention state (Qwen3-Next, Mamba, Jamba,
    RecurrentGemma): scoring computes each prompt once and hands its keys and values to the group's completion rows,
    which such a state cannot be split into (transformers' ``LinearAttentionCacheLayerMixin`` has no
    ``batch_select_indices``, and continuing its state across forwards changes the numbers)."""
    layers = [type(layer).__name__ for layer in DynamicCache(config=config).layers
              if isinstance(layer, LinearAttentionCacheLayerMixin)]
    if layers:
        raise CaopdInputError(f"{type(config).__name__} has {len(layers)} linear-attention or recurrent cache layers "
                              f"({layers[0]}): caopd scores each prompt once for its completions through a key/value "
                              "cache, which their state does not support; train a model whose layers all attend "
                              "(Qwen3, Llama, Mistral, Gemma, OLMo, GPT-NeoX, ...)", field="model")


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them, keeping the KV cache.

    Non-reentrant ``torch.utils.checkpoint``: it records the autograd graph as usual and only replaces the tensors
    saved for the backward, so a tensor that leaves a layer by a side way — the prompt's keys and values, stored in
    the cache and read by the completion forward — keeps its gradient path into the prompt's layers (the reentrant
    variant runs the layer without a graph: those gradients would silently be lost). It also needs no input that
    requires grad, so frozen embeddings (LoRA) need nothing more.

    transformers drops the cache in a checkpointed layer (``cache=None``) unless the layer declares it safe, because a
    cache that the layer writes to would be written a second time when the backward replays the layer. Every decoder
    layer here declares it (``_can_checkpoint_with_cache``) — safe only because ``completion_logits`` hands the model
    caches whose update is idempotent (``batching.PrefillCache``, ``batching.PromptCache``): the replay computes what
    the first run did and stores nothing. A plain ``DynamicCache`` must not meet a backward through these layers.

    Refused (``CaopdInputError``) for models whose caches hold more than full-attention keys and values
    (``full_attention_cache``), and for models without transformers' per-layer checkpoint: on them the prompt could
    not stay computed once per group.
    """
    hf_model = transformers_model(model)
    name = type(hf_model).__name__
    if not full_attention_cache(hf_model.config):
        raise CaopdInputError(f"{name} has attention layers other than full attention (sliding-window, chunked, "
                              "shared or linear), whose caches cannot share a prompt's keys and values across a "
                              "replay; set activation_checkpointing to false", field="activation_checkpointing")
    layers = [module for module in hf_model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if not layers:
        raise CaopdInputError(f"{name} has no transformers GradientCheckpointingLayer: its checkpointing would drop "
                              "the KV cache in training; set activation_checkpointing to false",
                              field="activation_checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(type(hf_model), "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in layers:  # an instance attribute: it survives FSDP2's swap of the layer's class
        layer._can_checkpoint_with_cache = True


def activation_checkpointing(model: Any) -> bool:
    """Whether the model recomputes its activations in the backward pass."""
    hf_model = transformers_model(model)
    if hasattr(type(hf_model), "is_activation_checkpointing"):
        return bool(hf_model.is_activation_checkpointing)
    return bool(getattr(hf_model, "is_gradient_checkpointing", False))
