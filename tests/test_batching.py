"""Prefix-shared forwards: computing each prompt once for its completions gives the logits and the gradients of
one forward per prompt + completion."""

import copy
import random

import pytest
import torch

from caopd.models import batching, tree_forward
from caopd.models.batching import (
    completion_logits,
    left_padded,
    pack_rows,
    pack_trees,
    prefix_tree,
)
from caopd.training.objectives import PromptGroup, micro_batches


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


def _alike_groups():
    """Completions as K samples of short answers come: duplicates, common prefixes, one- and zero-token ones."""
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    completions = [[[20, 21, 22, 1], [20, 21, 23, 1], [20, 21, 22, 1], [24, 1], [25]],
                   [[30, 31, 1], [30, 31, 1], [30, 31, 1]],
                   [[40, 41, 42, 43, 44, 1], [40, 1], [], [41, 42, 43, 44, 1]]]
    return prompts, completions


def test_prefix_tree_computes_each_distinct_prefix_once():
    tree = prefix_tree([[5, 6, 7, 1], [5, 6, 8, 1], [5, 6, 7, 1], [9, 1], [4], []])
    assert tree.tokens == [5, 6, 7, 8, 9]  # [5], [5 6], [5 6 7], [5 6 8], [9]
    assert tree.depths == [0, 1, 2, 2, 0]
    assert tree.parents == [-1, 0, 1, 1, -1]
    assert tree.paths == [[0, 1, 2], [0, 1, 3], [0, 1, 2], [4], [], []]


def test_rows_pack_by_decreasing_size_as_long_as_the_longest():
    assert pack_rows([3, 9, 5, 4, 1]) == [[1], [2, 3], [0, 4]]
    assert pack_rows([2, 2, 2]) == [[0], [1], [2]]


def test_a_group_packs_as_its_prompt_then_its_tree_under_tree_attention():
    completions = [[[7, 8, 1], [7, 9, 1]]]
    packed = pack_trees([[5, 6]], completions, [prefix_tree(completions[0])], pad_id=0)
    assert packed.tokens.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 3]]  # 8 and 9 are siblings: both third after the prompt
    assert packed.sees.astype(int).tolist() == [[[1, 0, 0, 0, 0],
                                                 [1, 1, 0, 0, 0],
                                                 [1, 1, 1, 0, 0],
                                                 [1, 1, 1, 1, 0],
                                                 [1, 1, 1, 0, 1]]]
    assert packed.index == [1, 2, 3, 1, 2, 4]  # 7 from the prompt's end, 8 after [7], 1 after [7 8]; then 9's branch


@pytest.mark.parametrize("groups", [_random_groups, _alike_groups], ids=["random", "alike"])
@pytest.mark.parametrize("lockstep", [False, True], ids=["tree", "transformers"])
def test_shared_prefix_logits_and_gradients_match_one_forward_per_sequence(tiny_model, groups, lockstep, monkeypatch):
    model = copy.deepcopy(tiny_model.model).train()
    assert tree_forward.supports(model)  # so lockstep=False takes the tree path, True transformers' forward
    monkeypatch.setattr(batching, "TREE_COST_MARGIN", float("inf"))  # the tree path even where it would not pay
    prompts, completions = groups(model.config.vocab_size) if groups is _random_groups else groups()
    shared = completion_logits(model, prompts, completions, tiny_model.tokenizer.pad_token_id, lockstep=lockstep)
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


def test_micro_batches_hold_whole_prompt_groups_and_split_only_those_over_the_limit():
    groups = [PromptGroup([1], [1], [[2]] * size, [[False]] * size) for size in (4, 4, 4, 8, 2)]
    batches = micro_batches(groups, max_sequences=8)
    assert [[len(g.completion_ids) for g in batch] for batch in batches] == [[4, 4], [4], [8], [2]]
    # a group larger than the limit goes in parts, in order, each with the prompts; its last part packs with the next
    big = PromptGroup([1, 2], [3], [[10 + i] for i in range(8)], [[i % 2 == 0] for i in range(8)])
    small = PromptGroup([4], [5], [[30]], [[True]])
    batches = micro_batches([big, small], max_sequences=3)
    assert [[len(g.completion_ids) for g in b] for b in batches] == [[3], [3], [2, 1]]
    parts = [g for b in batches for g in b][:3]
    assert [ids for g in parts for ids in g.completion_ids] == big.completion_ids
    assert [mask for g in parts for mask in g.confidence_masks] == big.confidence_masks
    assert all(g.prompt_ids == [1, 2] and g.teacher_prompt_ids == [3] for g in parts)


def test_lockstep_scoring_runs_two_forwards_even_for_one_token_completions_and_changes_nothing(tiny_model):
    model, pad = tiny_model.model, tiny_model.tokenizer.pad_token_id
    calls = []  # every forward, transformers' or the fused one, embeds its input tokens once
    handle = model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
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
    # (sharded models take transformers' forward, unsharded ones the fused one: the same function, other float sums)
    torch.testing.assert_close(results[False][1], results[True][1], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[False][2], results[True][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_segments_longer_than_the_limit_take_the_per_row_path(tiny_model, monkeypatch):
    model, pad = tiny_model.model.eval(), tiny_model.tokenizer.pad_token_id
    prompts, completions = _alike_groups()
    forwards = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *_, forwards=forwards: forwards.append(1))
    try:
        with torch.no_grad():
            tree = completion_logits(model, prompts, completions, pad)
            tree_forwards = len(forwards)
            monkeypatch.setattr(batching, "MAX_TREE_SEGMENT", 8)  # the third group's prompt + tree is 12 long
            rows = completion_logits(model, prompts, completions, pad)
    finally:
        handle.remove()
    assert tree_forwards == 1 and len(forwards) - tree_forwards == 2  # one packed forward; prefill + completions
    torch.testing.assert_close(tree, rows, atol=1e-5, rtol=1e-5)


def test_the_tree_path_is_taken_where_completions_share_and_not_where_they_do_not(tiny_model):
    model, pad, hidden = tiny_model.model, tiny_model.tokenizer.pad_token_id, tiny_model.model.config.hidden_size
    rng = random.Random(1)
    prompts = [[5, 6, 7], [8, 9, 10]]
    distinct = [[[rng.randrange(3, 50) for _ in range(40)] for _ in range(16)] for _ in prompts]
    alike = [[list(group[0]) for _ in group] for group in distinct]  # the same 16 samples in each group
    # forward positions: rows 2·3 + 32·39, per-row path; tree: 2 segments of 3 + 16·39 (no sharing) or 3 + 39
    for completions, expected in ((distinct, False), (alike, True)):
        trees = [prefix_tree(group) for group in completions]
        assert batching.tree_pays(prompts, completions, trees, hidden) is expected
        forwards = []
        handle = model.get_input_embeddings().register_forward_hook(lambda *_, calls=forwards: calls.append(1))
        try:
            with torch.no_grad():
                completion_logits(model, prompts, completions, pad)
        finally:
            handle.remove()
        assert len(forwards) == (1 if expected else 2)


def test_the_decoding_cache_writes_in_place_and_decodes_what_the_dynamic_cache_does(tiny_model):
    """Decoding steps, with a selection of rows between them (nodes that split and finish), give the same logits as
    transformers' own cache; the keys stay in one buffer between selections instead of a concatenation per step."""
    from caopd.models.batching import DecodingCache, GrowingLayer
    from caopd.models.compat import cache_kwargs

    model = tiny_model.model.eval()
    prompts, pad = [[5, 6, 7], [8, 9]], 0
    runs = []
    for cache in (None, DecodingCache(model.config, reserve=4)):
        cache, logits, mask, next_pos = batching.prefill(model, prompts, pad, cache=cache)
        seen, buffers = [logits], []
        for step, select in enumerate(([0, 0, 1], None, [2, 0], None, None)):
            if select is not None:
                rows = torch.tensor(select)
                cache.batch_select_indices(rows)
                mask, next_pos = mask[rows], next_pos[rows]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            tokens = torch.full((mask.shape[0], 1), 10 + step)
            with torch.no_grad():
                out = model(input_ids=tokens, attention_mask=mask, position_ids=next_pos, **cache_kwargs(cache),
                            use_cache=True)
            seen.append(out.logits[:, -1])
            next_pos = next_pos + 1
            if isinstance(cache.layers[0], GrowingLayer):
                buffers.append(cache.layers[0].buffers[0].data_ptr())
        runs.append(seen)
    for plain, growing in zip(*runs):
        torch.testing.assert_close(growing, plain, rtol=0, atol=0)
    # a new buffer after each selection only: steps 1 (selected), 2 (in place), 3 (selected), 4 and 5 (in place)
    assert buffers[1] == buffers[0] and buffers[3] == buffers[4] == buffers[2] and buffers[2] != buffers[1]
