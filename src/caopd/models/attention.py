"""Attention for small models on the CPU, plugged into transformers' AttentionInterface.

torch's CPU kernel behind ``scaled_dot_product_attention`` is built for long sequences: at the shapes of
sampling and scoring short completions (a query of 1–25 tokens against 10–60 keys, hundreds of rows) it costs
1.4–1.6× what two batched matmuls and a softmax do, forward and backward, and 2–6× once the process has called
``torch.set_num_threads`` (measured in benchmarks/README.md; end to end a few per cent by default). This
is that plain attention, with each key/value head read by its group of query heads in place (no ``repeat_kv``
copy), and transformers' additive float mask, so a fully masked row (a left-padding position) gets finite
values rather than NaN; long queries against many keys (a tool-use completion scored after its prompt) go to the
SDPA kernel, which wins there. GPUs keep transformers' default.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "caopd_cpu"


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``softmax(q kᵀ · scaling + mask) v`` for ``query [B, H, Q, D]``, ``key``/``value [B, H_kv, L, D]``, where
    query head ``h`` reads key/value head ``h // (H / H_kv)`` (transformers' grouped-query convention).
    Returns ``[B, Q, H, D]``, as every attention function of the interface does."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    # The query heads of one key/value head, stacked along the query axis: one matmul per key/value head.
    grouped = query.reshape(batch, kv_heads, group * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:  # None only where nothing is masked (transformers' eager convention)
        mask = attention_mask[..., :kv_len]  # [B or 1, 1, Q, L], added alike for every head of the group
        scores = (scores.view(batch, kv_heads, group, q_len, kv_len) + mask.unsqueeze(1)).view_as(scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, value)  # [B, H_kv, group * Q, D]
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


# Query × key pairs per row from which torch's SDPA kernel is the faster one, forward and backward: 1.9× at 64 × 128,
# 4.2× at 250 × 1,250 (a tool-use completion after its prompt), 3.8× at 1,000 × 1,500 (4 heads of 32, 2 key/value
# heads; measured on 2 cores). Below it — decoding's single query, the tiny model's short completions — the plain
# attention above, as measured there.
SDPA_MIN_PAIRS = 8192


def cpu_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``grouped_attention`` for short queries or few keys, torch's SDPA kernel (grouped-query, the same additive
    mask) for long ones."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len * kv_len < SDPA_MIN_PAIRS:
        return grouped_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    mask = None if attention_mask is None else attention_mask[..., :kv_len]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, cpu_attention)
AttentionMaskInterface.register(NAME, eager_mask)  # additive float masks, as eager attention takes


# Architectures whose attention is exactly the above (no logit soft-capping, attention sinks or position biases,
# which other models pass to their attention function and this one would ignore).
PLAIN_ATTENTION_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def use_cpu_attention(model: Any) -> bool:
    """Switch a model on the CPU from transformers' SDPA to ``grouped_attention``; True if switched. Other
    architectures, and models whose config chose another implementation on purpose, keep theirs."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_ATTENTION_MODELS or config._attn_implementation != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu" or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
