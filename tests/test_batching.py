"""Prefix-shared forwards: computing each prompt once for its completions gives the logits and the gradients of
one forward per prompt + completion."""

import copy
import random

import torch

from caopd.distill.trainer import PromptGroup, micro_batches
from caopd.models.batching import completion_logits, left_padded


def _random_groups(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in range(3)]
    completions = [[[rng.randrange(3, vocab) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(1, 4))]
                   for _ in prompts]
    return prompts, completions


def test_left_padding_ends_every_prompt_at_the_last_column():
    ids, mask, positions = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_shared_prefix_logits_and_gradients_match_one_forward_per_sequence(tiny_model):
    model = copy.deepcopy(tiny_model.model).train()
    prompts, completions = _random_groups(model.config.vocab_size)
    shared = completion_logits(model, prompts, completions, tiny_model.tokenizer.pad_token_id)
    shared.square().sum().backward()
    shared_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    reference = []
    for prompt, group in zip(prompts, completions):
        for completion in group:
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
            reference.append(logits[len(prompt) - 1: len(prompt) + len(completion) - 1])
    reference = torch.cat(reference)
    reference.square().sum().backward()

    assert shared.shape == (sum(len(c) for g in completions for c in g), model.config.vocab_size)
    torch.testing.assert_close(shared, reference, atol=1e-4, rtol=1e-4)
    for name, p in model.named_parameters():  # float sums in another order: close relative to the largest entry
        torch.testing.assert_close(shared_grads[name], p.grad, rtol=1e-3, atol=1e-4 * float(p.grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_one_token_completions_need_only_the_prefill(tiny_model):
    model = tiny_model.model.eval()
    with torch.no_grad():
        logits = completion_logits(model, [[5, 6], [7]], [[[9], [10]], [[11]]], tiny_model.tokenizer.pad_token_id)
        alone = model(input_ids=torch.tensor([[5, 6]])).logits[0, -1]
    assert logits.shape[0] == 3
    torch.testing.assert_close(logits[0], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], alone, atol=1e-5, rtol=1e-5)


def test_micro_batches_hold_whole_prompt_groups():
    groups = [PromptGroup([1], [1], [[2]] * size, [[False]] * size) for size in (4, 4, 4, 8, 2)]
    batches = micro_batches(groups, max_sequences=8)
    assert [[len(g.completion_ids) for g in batch] for batch in batches] == [[4, 4], [4], [8], [2]]
    # a group larger than the limit still goes whole, alone
    assert [[len(g.completion_ids) for g in b] for b in micro_batches(groups[3:4], 3)] == [[8]]


def test_lockstep_scoring_runs_two_forwards_even_for_one_token_completions_and_changes_nothing(tiny_model):
    model, pad = tiny_model.model, tiny_model.tokenizer.pad_token_id
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        results = {}
        for lockstep in (False, True):
            calls.clear()
            model.zero_grad(set_to_none=True)
            logits = completion_logits(model, [[5, 6, 7], [8]], [[[3], [4]], [[9]]], pad, lockstep=lockstep)
            logits.logsumexp(-1).sum().backward()
            results[lockstep] = (len(calls), logits.detach(), [p.grad.clone() for p in model.parameters()])
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    assert results[False][0] == 1 and results[True][0] == 2  # every sharded process runs the same forwards
    assert torch.equal(results[False][1], results[True][1])
    assert all(torch.equal(a, b) for a, b in zip(results[False][2], results[True][2]))
