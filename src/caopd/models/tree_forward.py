"""The forward of a Llama-family decoder under an explicit attention bias, for scoring prefix trees.

transformers' forward builds a causal mask from a padding mask; scoring a group's distinct completion prefixes
once each (``caopd.models.batching``) needs each token to see its prompt and its own ancestors only — tree
attention, as in speculative decoding's token trees. This is the same function as transformers' forward for the
architectures ``supports`` accepts, reading the model's own parameters (so gradients reach them), with the bias
given outright. It also does fewer ops: one q/k/v matmul, one gate/up matmul, one RMSNorm over the q and k heads
together. Tests pin its logits and gradients to transformers'.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from caopd.models.attention import PLAIN_ATTENTION_MODELS, grouped_attention
from caopd.models.lora import is_adapted

# Rotary variants whose frequencies are fixed at load time (dynamic ones change with the sequence length).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


def supports(model: Any) -> bool:
    """Whether ``forward_with_bias`` computes exactly this model's forward, as it stands now (device, mode,
    sharding): other architectures, GPUs, sharded (FSDP) parameters and adapters (LoRA) keep transformers' forward.
    The tree path itself keeps its activations under activation checkpointing: it runs on the CPU only, where it
    scores a small model's coinciding completion prefixes once (memory is the GPU's concern)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_ATTENTION_MODELS:
        return False
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES or getattr(config, "hidden_act", None) != "silu":
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False  # Mistral-style windows: keys beyond the window would be attended here
    if getattr(config, "pretraining_tp", 1) != 1:
        return False
    if is_adapted(model):  # LoRA layers add to the weights this forward reads directly
        return False
    if model.training and getattr(config, "attention_dropout", 0.0):
        return False
    return all(type(p) is torch.nn.Parameter and p.device.type == "cpu" for p in model.parameters())


def visibility_bias(sees: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, T]`` booleans (query sees key) → the additive ``[B, 1, T, T]`` bias: 0 or the dtype's minimum (a
    finite floor, so a row that sees nothing stays finite)."""
    bias = torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill_(~sees, torch.finfo(dtype).min)
    return bias[:, None]


def forward_with_bias(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` of ``input_ids [B, T]`` at ``position_ids``, token ``i`` attending to the keys
    ``bias [B, 1, T, T]`` leaves at 0."""
    config, body = model.config, model.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps, (batch, length) = config.rms_norm_eps, input_ids.shape
    hidden = body.embed_tokens(input_ids)
    cos, sin = _rotary(body.rotary_emb, position_ids, dim, hidden.dtype)
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.input_layernorm.weight, eps)
        qkv_bias = (torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
                    if attn.q_proj.bias is not None else None)
        qkv = F.linear(x, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv_bias)
        qkv = qkv.view(batch, length, heads + 2 * kv_heads, dim)
        qk, value = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads:]
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of q and k, with a weight of its own for each
            norm = torch.cat([attn.q_norm.weight.expand(heads, -1), attn.k_norm.weight.expand(kv_heads, -1)])
            qk = F.rms_norm(qk, (dim,), None, eps) * norm
        halves = qk.view(batch, length, heads + kv_heads, 2, dim // 2).flip(3).view_as(qk)
        qk = qk * cos + halves * sin  # rotate_half(x)·sin, with the sign folded into sin
        query, key = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
        attended, _ = grouped_attention(attn, query, key, value.transpose(1, 2), bias, attn.scaling)
        hidden = hidden + attn.o_proj(attended.reshape(batch, length, heads * dim))
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.post_attention_layernorm.weight, eps)
        gate, up = F.linear(x, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])).chunk(2, dim=-1)
        hidden = hidden + mlp.down_proj(F.silu(gate) * up)
    return model.lm_head(F.rms_norm(hidden, (hidden.shape[-1],), body.norm.weight, eps))


def _rotary(rotary: Any, positions: torch.Tensor, dim: int, dtype: torch.dtype,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin at each position, ``[B, T, 1, D]``, from the model's own frequencies and scaling."""
    freqs = positions[..., None].float() * rotary.inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = float(rotary.attention_scaling)
    cos, sin = emb.cos() * scale, emb.sin() * scale
    sin = torch.cat([-sin[..., : dim // 2], sin[..., dim // 2:]], dim=-1)
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]
