"""The forward under an explicit attention bias is transformers' forward, for every architecture it accepts."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

from caopd.config.training import LoRAConfig
from caopd.models.compat import enable_activation_checkpointing
from caopd.models.lora import add_adapters
from caopd.models.tree_forward import forward_with_bias, supports, visibility_bias

SMALL = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def small_model(config_class, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**SMALL, **extra))
    # qwen2 ties the q/k/v biases to zero at init: random ones, so a bias left out would show
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias)
    return model.train()


@pytest.mark.parametrize("config_class, extra", [
    (Qwen3Config, {"head_dim": 8}),  # per-head q/k norms
    (Qwen2Config, {}),  # q/k/v biases
    (LlamaConfig, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}}),
    (LlamaConfig, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 16}}),  # scaled cos/sin
], ids=["qwen3", "qwen2", "llama3-rope", "yarn-rope"])
def test_causal_bias_gives_transformers_logits_and_gradients(config_class, extra):
    model = small_model(config_class, **extra)
    assert supports(model)
    ids = torch.randint(0, 40, (3, 9))
    positions = torch.arange(9).expand(3, -1) + torch.tensor([[0], [3], [11]])  # any positions, not just 0..T-1
    causal = torch.ones(3, 9, 9, dtype=torch.bool).tril()
    ours = forward_with_bias(model, ids, positions, visibility_bias(causal, torch.float32))
    reference = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=2e-5)

    upstream = torch.randn_like(ours)
    params = [p for p in model.parameters()]
    ours_grads = torch.autograd.grad(ours, params, upstream)
    reference_grads = torch.autograd.grad(reference, params, upstream)
    for (name, _), got, want in zip(model.named_parameters(), ours_grads, reference_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_a_token_sees_only_what_the_bias_lets_it_see():
    model = small_model(Qwen3Config, head_dim=8).eval()
    # token 2 continues token 0 directly (token 1 is a sibling branch): it must score as the sequence [t0, t2]
    ids, positions = torch.tensor([[7, 8, 9]]), torch.tensor([[0, 1, 1]])
    sees = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    with torch.no_grad():
        ours = forward_with_bias(model, ids, positions, visibility_bias(sees, torch.float32))
        branch = model(input_ids=torch.tensor([[7, 9]])).logits
    torch.testing.assert_close(ours[0, 2], branch[0, 1], atol=1e-5, rtol=1e-5)


def test_other_architectures_and_adapters_keep_transformers_forward():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=40))
    assert not supports(gpt2)
    model = small_model(Qwen3Config, head_dim=8)
    enable_activation_checkpointing(model)
    assert supports(model)  # the CPU's tree path keeps its activations whatever the switch says
    add_adapters(model, LoRAConfig(r=2))
    assert not supports(model)  # LoRA layers add to the weights the tree forward reads
    windowed = small_model(Qwen2Config, use_sliding_window=True, sliding_window=4)
    assert not supports(windowed)
