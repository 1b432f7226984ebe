"""Activation checkpointing that keeps each prompt computed once: per decoder layer, non-reentrant, the KV cache kept
(its updates idempotent), so the backward replays each layer and nothing else changes.

Logits and gradients are compared bit for bit (tolerance 0): the replay runs the same ops on the same inputs on the
CPU, whose kernels are deterministic, and the backward walks the same autograd graph with and without checkpointing
(only the tensors it saved come from the replay), so any difference would be a difference in what was computed."""

import copy
import socket
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from caopd.errors import CaopdInputError
from caopd.models import batching, tree_forward
from caopd.models.batching import PrefillCache, PromptCache, PromptViewLayer, StoreOnceLayer, completion_logits
from caopd.models.compat import activation_checkpointing, enable_activation_checkpointing, transformers_model
from caopd.models.loading import load_model

# Alike samples as K rollouts come (duplicates, shared prefixes), one-token and empty ones, prompts of unequal length.
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
COMPLETIONS = [[[20, 21, 22, 1], [20, 21, 23, 1], [24, 1], [25]],
               [[30, 31, 1], [30, 32, 33, 34, 1]],
               [[40, 41, 42, 43, 44, 1], [40, 1], [], [41, 42, 43, 44, 1]]]
PAD = 0


@pytest.fixture(scope="module")
def standin():
    return load_model("standin").model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # random A and B (PEFT's default B = 0 would leave A's gradient at zero)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT reads transformers' deprecated checkpointing flag
        return get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear",
                                                               init_lora_weights=False))


def _checkpointed(model):
    model = copy.deepcopy(model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # each transformers version's own names: no deprecated one
        enable_activation_checkpointing(model)
        assert activation_checkpointing(model)
    return model


def _logits_and_grads(model, lockstep=False):
    model.zero_grad(set_to_none=True)
    logits = completion_logits(model, PROMPTS, COMPLETIONS, PAD, lockstep=lockstep)
    logits.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _decoder_layers(model):
    return transformers_model(model).model.layers


# --- the idempotent caches ---------------------------------------------------------------------------------------

def test_a_prefill_layer_stores_its_first_update_and_a_replay_computes_the_same_without_storing():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    layer = StoreOnceLayer()
    first = layer.update(keys, values)
    stored = layer.keys
    replayed = layer.update(keys.clone(), values.clone())
    torch.testing.assert_close(first, (keys, values), rtol=0, atol=0)
    torch.testing.assert_close(replayed, first, rtol=0, atol=0)
    assert layer.keys is stored and layer.get_seq_length() == 3  # the replay stored nothing


def test_a_prompt_view_puts_each_rows_prompt_first_and_stores_nothing():
    keys = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1)  # prompt 0: 0 1 2, prompt 1: 3 4 5
    layer = PromptViewLayer(keys, -keys, torch.tensor([0, 0, 1]))
    new = torch.full((3, 1, 2, 1), 9.0)
    got_keys, got_values = layer.update(new, -new)
    assert got_keys[..., 0].squeeze(1).tolist() == [[0, 1, 2, 9, 9], [0, 1, 2, 9, 9], [3, 4, 5, 9, 9]]
    torch.testing.assert_close(got_values, -got_keys, rtol=0, atol=0)
    again = layer.update(new, -new)
    torch.testing.assert_close(again[0], got_keys, rtol=0, atol=0)  # nothing stored: a replay reads the same
    assert layer.get_seq_length() == 3 and layer.get_mask_sizes(2) == (5, 0)  # masks as after a 3-token prefill


def test_the_completion_cache_selects_each_rows_prompt_from_the_prefill(tiny_model):
    model = tiny_model.model
    cache = PrefillCache(model.config)
    with torch.no_grad():
        batching.prefill(model, [[5, 6, 7], [8]], PAD, cache=cache)
    rows = torch.tensor([1, 0, 1])
    view = PromptCache(cache, rows)
    assert len(view.layers) == model.config.num_hidden_layers and view.get_seq_length() == 3
    new = torch.zeros(3, *cache.layers[0].keys.shape[1:2], 1, cache.layers[0].keys.shape[-1])
    got, _ = view.update(new, new, layer_idx=1)
    torch.testing.assert_close(got[:, :, :3], cache.layers[1].keys[rows], rtol=0, atol=0)


# --- checkpointing on the models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "standin", "standin-lora"])
def test_checkpointing_changes_neither_the_logits_nor_the_gradients(which, tiny_model, standin, monkeypatch):
    base = tiny_model.model if which == "tiny" else standin
    plain = _lora(base) if which == "standin-lora" else copy.deepcopy(base)
    plain.train()
    checkpointed = _checkpointed(plain)
    # the per-row path, the one checkpointing applies to (the CPU's tree path keeps its activations), for both
    monkeypatch.setattr(tree_forward, "supports", lambda model: False)
    logits, grads = _logits_and_grads(plain)
    checkpointed_logits, checkpointed_grads = _logits_and_grads(checkpointed)
    torch.testing.assert_close(checkpointed_logits, logits, rtol=0, atol=0)
    assert checkpointed_grads.keys() == grads.keys() and grads
    if which == "standin-lora":  # only the adapters train, and every adapter gets a gradient (A's too)
        assert all("lora_" in name for name in grads)
        assert len(grads) == sum(p.requires_grad for p in plain.parameters())
        assert all(bool(g.abs().sum() > 0) for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_the_backward_replays_every_decoder_layer_of_both_forwards(tiny_model):
    counts = {}
    for checkpointing in (False, True):
        model = _checkpointed(tiny_model.model) if checkpointing else copy.deepcopy(tiny_model.model).train()
        calls = []  # attention runs inside the layer's checkpoint: the replay calls it again
        handles = [layer.self_attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
                   for layer in _decoder_layers(model)]
        logits = completion_logits(model, PROMPTS, COMPLETIONS, PAD, lockstep=True)
        forward = len(calls)
        logits.sum().backward()
        for handle in handles:
            handle.remove()
        counts[checkpointing] = (forward, len(calls))
    layers = tiny_model.model.config.num_hidden_layers
    assert counts[False] == (2 * layers, 2 * layers)  # prefill + completions, nothing replayed
    assert counts[True] == (2 * layers, 4 * layers)  # each of those layer calls once more in the backward


def _kept_for_backward(model) -> int:
    """Bytes of the distinct storages (parameters aside) the backward keeps from the forward: the tensors autograd
    saves outside any checkpoint, and everything a checkpointed layer's replay reads again — its arguments and the
    KV caches it is handed (a checkpoint keeps those instead of the layer's saved tensors)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def note(value):
        if isinstance(value, torch.Tensor):
            if value.untyped_storage().data_ptr() not in parameters:
                kept[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                note(item)
        elif isinstance(value, dict):
            for item in value.values():
                note(item)
        elif hasattr(value, "layers"):  # a KV cache
            for layer in value.layers:
                note([layer.keys, layer.values])
        return value

    def note_inputs(_, args, kwargs):
        note([args, kwargs])

    handles = [layer.register_forward_pre_hook(note_inputs, with_kwargs=True) for layer in _decoder_layers(model)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
            logits = completion_logits(model, [list(range(3, 40))] * 2, [[list(range(10, 40))] * 8] * 2, PAD,
                                       lockstep=True)
    finally:
        for handle in handles:
            handle.remove()
    logits.sum().backward()
    return sum(kept.values())


def test_checkpointing_keeps_a_fraction_of_the_bytes_for_the_backward(tiny_model):
    plain = _kept_for_backward(copy.deepcopy(tiny_model.model).train())
    checkpointed = _kept_for_backward(_checkpointed(tiny_model.model))
    # 2 prompts of 37 tokens, 8 completions of 30 each, 4 layers: without checkpoints every layer keeps its
    # attention, MLP and norm intermediates; with them, each layer's input and each prompt's keys and values once
    assert checkpointed < plain / 4, (checkpointed, plain)


def test_sharded_fsdp2_layers_checkpoint_with_the_cache(standin):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    logits, grads = _logits_and_grads(copy.deepcopy(standin).train(), lockstep=True)  # the path sharded models take
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model = _checkpointed(standin)  # checkpointing first, sharding after, as the training stage does
        mesh = init_device_mesh("cpu", (1,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(_decoder_layers(model)[0]).__name__.startswith("FSDP")
        calls = []
        handles = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
                   for layer in _decoder_layers(model)]
        sharded_logits = completion_logits(model, PROMPTS, COMPLETIONS, PAD, lockstep=True)
        sharded_logits.square().sum().backward()
        for handle in handles:
            handle.remove()
        sharded = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    assert len(calls) == 4 * standin.config.num_hidden_layers  # replayed under FSDP2 too
    # one process: each shard is the whole tensor and the reduce-scatter a copy, so bit for bit again
    torch.testing.assert_close(sharded_logits.detach(), logits, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(sharded[name], grad, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_models_with_sliding_window_layers_are_refused_and_keep_the_plain_cache():
    config = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    with pytest.raises(CaopdInputError, match="activation_checkpointing.*sliding-window"):
        enable_activation_checkpointing(model)
    assert not activation_checkpointing(model)
    with pytest.raises(ValueError, match="full-attention layers only"):
        PrefillCache(model.config)
    logits = completion_logits(model, [[5, 6]], [[[7, 8, 9]]], PAD, lockstep=True)  # transformers' own cache
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits[0, 1:4]
    torch.testing.assert_close(logits.detach(), alone, atol=1e-5, rtol=1e-5)
