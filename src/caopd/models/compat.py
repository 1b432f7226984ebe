"""What differs between the transformers versions the project allows, in one place: the KV cache's name in a model
call and its output, and the name of activation (gradient) checkpointing.

transformers 5.24 renamed the cache ``past_key_values`` → ``cache``, both the model's keyword and the output's field
(the old keyword still works until 5.40, with a deprecation warning); 5.20–5.23 know only ``past_key_values``, and the
GPU image has 5.20 (vLLM 0.33 requires transformers below 5.21). 5.24 also renamed ``gradient_checkpointing_enable`` /
``is_gradient_checkpointing`` to ``activation_checkpointing_*`` (the old names warn until 6). Each name is read from
the installed classes, so each version gets its own names and no warning.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAME = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword that hands ``cache`` to a model call: ``model(..., **cache_kwargs(cache))``."""
    return {CACHE_NAME: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model call returned (``use_cache=True``)."""
    return getattr(output, CACHE_NAME)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (transformers' own switch)."""
    if hasattr(type(model), "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()


def activation_checkpointing(model: Any) -> bool:
    """Whether the model recomputes its activations in the backward pass."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
