"""Prompt-once scoring is one forward per prompt + completion, on the architectures transformers ships.

``completion_logits`` runs each group's prompt once (a prefill over left-padded prompts) and the group's completions
after it (right-padded rows reading their prompt's cached keys and values). Each architecture places its own
positions (rotary, partial rotary, learned absolute, ALiBi from the mask), norms and residuals, and either fills
the idempotent prompt caches (``PrefillCache``/``PromptCache``) or, with sliding-window layers, transformers' own
``DynamicCache``; here every parameter's gradient and every logit must be those of one plain forward over
prompt + completion, per completion. The prefix-tree path (Llama family, CPU) is tested in test_batching.py.
"""

import functools

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Olmo3Config,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3NextConfig,
)

from caopd.errors import CaopdInputError
from caopd.models import batching
from caopd.models.batching import completion_logits
from caopd.models.compat import check_prompt_sharing, full_attention_cache

PAD = 0
# Every mapped name (GPT2's n_embd, ...) is accepted by each config under its common name.
SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
             pad_token_id=PAD, bos_token_id=1, eos_token_id=2)

ARCHITECTURES = {
    "qwen3": lambda: Qwen3Config(**SMALL, intermediate_size=64, num_key_value_heads=2, head_dim=8),  # q/k norms
    "qwen2": lambda: Qwen2Config(**SMALL, intermediate_size=64, num_key_value_heads=2),  # q/k/v biases
    "llama": lambda: LlamaConfig(**SMALL, intermediate_size=64, num_key_value_heads=2),
    # rotary on half of each head, attention and MLP side by side off one residual, fused q/k/v with biases
    "gpt_neox": lambda: GPTNeoXConfig(**SMALL, intermediate_size=64, rotary_pct=0.5, use_parallel_residual=True),
    "phi3": lambda: Phi3Config(**SMALL, intermediate_size=64, num_key_value_heads=2),  # fused q/k/v and gate/up
    # embeddings scaled by √hidden, (1 + w) RMSNorm scales, GELU; one key/value head (multi-query)
    "gemma": lambda: GemmaConfig(**SMALL, intermediate_size=64, num_key_value_heads=1, head_dim=8),
    "gpt2": lambda: GPT2Config(**SMALL),  # learned absolute positions, read from position_ids
    "opt": lambda: OPTConfig(**SMALL, ffn_dim=64, word_embed_proj_dim=32),  # learned positions, offset by 2
    "falcon": lambda: FalconConfig(**SMALL),  # rotary, multi-query, parallel attention
    "falcon_alibi": lambda: FalconConfig(**SMALL, alibi=True),  # positions from the attention mask's cumsum
    # a sliding window (3) shorter than the sequences: transformers' DynamicCache path, batch_select_indices
    "olmo3": lambda: Olmo3Config(**SMALL, intermediate_size=64, num_key_value_heads=2, sliding_window=3,
                                 layer_types=["sliding_attention", "full_attention"]),
}
# ALiBi biases each key by its place in the attention mask: these models take no position ids.
MASK_POSITIONED = {"falcon_alibi"}

# Prompt tokens below 50, completion tokens from 50: a forward's input shows which of the two it computed.
CASES = {
    # prompts of 5, 2 and 3 tokens (left padding); K = 3, 2, 4 completions of 1–6 tokens (right padding)
    "padded": ([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]],
               [[[50, 51, 52, 53], [54], [55, 56]],
                [[60, 61, 62, 63, 64, 65], [66, 67]],
                [[70, 71, 72], [73, 74, 75, 76], [77], [78, 79]]]),
    # every prompt 4 tokens, every completion 3: no padding anywhere
    "unpadded": ([[5, 6, 7, 8], [9, 10, 11, 12]],
                 [[[50, 51, 52], [53, 54, 55], [56, 57, 58]],
                  [[60, 61, 62], [63, 64, 65], [66, 67, 68]]]),
    # one-token completions only: the prefill's last logits are all there is
    "one_token": ([[5, 6, 7], [8]], [[[50], [51]], [[60], [61], [62]]]),
}


def _randomize(model: torch.nn.Module) -> None:
    """Weights of about unit gain: under transformers' init (std 0.02) attention is nearly uniform and positions
    barely matter (a completion one position off moves Llama's logits by 4e-4), so an error would hide close to the
    tolerance; here that moves them by 0.6–5 (``test_a_completion_one_position_off_would_show``). Biases and norm
    scales are random too, so that one left out shows."""
    generator = torch.Generator().manual_seed(0)
    scale = 1.5 / model.config.hidden_size ** 0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(noise * scale)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:  # norm scales
                param.copy_(1 + 0.2 * noise)


def _without_dropout(config):
    """Dropout off (every rate the config holds), so that two forwards of the same tokens compute the same thing;
    the model stays in training mode, as the student is scored."""
    for key, value in list(vars(config).items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


@functools.cache
def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_without_dropout(ARCHITECTURES[arch]()))
    _randomize(model)
    return model.train()


def _a_forward_per_completion(model, prompts, completions) -> torch.Tensor:
    """The reference: prompt + completion unpadded, the logits at the positions that predict the completion."""
    rows = []
    for prompt, group in zip(prompts, completions):
        for completion in group:
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
            rows.append(logits[len(prompt) - 1: len(prompt) + len(completion) - 1])
    return torch.cat(rows)


def _loss(logits: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    return (logits.log_softmax(-1) * weights).sum()


def _expected_inputs(prompts, completions, lockstep: bool) -> list[list[list[int]]]:
    """The token rows each forward embeds: the prompts once each, left-padded; then every completion but its last
    token, right-padded (with one-token completions only: nothing, or one idle pad token in lockstep)."""
    width = max(len(prompt) for prompt in prompts)
    feeds = [[[PAD] * (width - len(prompt)) + prompt for prompt in prompts]]
    flat = [ids[:-1] for group in completions for ids in group]
    longest = max(len(ids) for ids in flat)
    if longest:
        feeds.append([ids + [PAD] * (longest - len(ids)) for ids in flat])
    elif lockstep:
        feeds.append([[PAD]])
    return feeds


@pytest.mark.parametrize("lockstep", [False, True], ids=["per-row", "lockstep"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompt_once_logits_and_gradients_equal_a_forward_per_completion(arch, case, lockstep, monkeypatch):
    monkeypatch.setattr(batching, "TREE_COST_MARGIN", 0.0)  # never the prefix tree: the prompt-once caches
    model = _model(arch)
    prompts, completions = CASES[case]
    params = list(model.parameters())
    fed: list = []
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: fed.append(args[0].tolist()))
    try:
        shared = completion_logits(model, prompts, completions, PAD, lockstep=lockstep)
    finally:
        handle.remove()
    shared_grads = torch.autograd.grad(_loss(shared), params)
    reference = _a_forward_per_completion(model, prompts, completions)
    reference_grads = torch.autograd.grad(_loss(reference), params)

    # each prompt embedded once, in the prefill (groups × longest prompt, never groups × K); no prompt token after
    assert fed == _expected_inputs(prompts, completions, lockstep)
    assert shared.shape == reference.shape == (sum(len(c) for g in completions for c in g), model.config.vocab_size)
    torch.testing.assert_close(shared, reference, atol=1e-5, rtol=1e-5)
    # Each parameter's gradient relative to its own largest entry. One that is zero in exact arithmetic (OPT's key
    # bias: softmax ignores a shift common to all keys) is float noise on both sides (1e-7 of the model's largest
    # gradient): those below 1% of the largest are compared relative to 1% of it.
    scale = max(float(grad.abs().max()) for grad in reference_grads)
    for (name, _), got, want in zip(model.named_parameters(), shared_grads, reference_grads):
        tolerance = 1e-4 * max(float(want.abs().max()), 1e-2 * scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=tolerance, msg=lambda m, name=name: f"{name}: {m}")


def test_the_architectures_take_both_cache_paths():
    """Full-attention models fill the idempotent prompt caches; a sliding-window model keeps DynamicCache's."""
    assert {arch for arch in ARCHITECTURES if not full_attention_cache(_model(arch).config)} == {"olmo3"}


@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if arch not in MASK_POSITIONED])
def test_a_completion_one_position_off_would_show(arch):
    """The equality above could see a completion placed one position after where it is (a gap after the prompt):
    the model honours position_ids, and its weights make positions matter far beyond the tolerance."""
    model = _model(arch)
    ids = torch.tensor([[5, 6, 7, 8, 50, 51, 52]])
    positions = torch.arange(7)[None]
    gap = positions + (positions >= 4).long()
    with torch.no_grad():
        right = model(input_ids=ids, position_ids=positions).logits[0, 4:]
        off = model(input_ids=ids, position_ids=gap).logits[0, 4:]
    assert (right - off).abs().max() > 0.1  # 10⁴ × the tolerance


def test_linear_attention_hybrids_are_refused_with_the_setting_to_change():
    """Qwen3-Next's linear-attention (gated delta net) layers keep a recurrent state, not keys and values, which a
    prompt computed once cannot hand to its completion rows: the scoring and the trainer refuse the model by name
    rather than fail inside transformers' cache (``LinearAttentionLayer`` has no ``batch_select_indices``)."""
    config = Qwen3NextConfig(**SMALL, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                             layer_types=["linear_attention", "full_attention"], num_experts=2,
                             num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                             linear_value_head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    prompts, completions = CASES["padded"]
    with pytest.raises(CaopdInputError, match="Qwen3NextConfig has 1 linear-attention or recurrent cache layers"):
        completion_logits(model, prompts, completions, PAD, lockstep=True)
    with pytest.raises(CaopdInputError, match="train a model whose layers all attend"):
        check_prompt_sharing(config)
