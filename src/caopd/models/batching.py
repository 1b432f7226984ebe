"""Batched forwards that compute each prompt once — and, where the model allows, each distinct completion prefix.

Sampling (the rollout engine) and scoring (the distillation loss, teacher and student) both run a group of
completions after one prompt; computing the prompt once per group rather than once per completion removes
its share of the FLOPs, and autograd flows through the shared computation, so the student's gradient is the same
as with the prompt repeated. The K samples of a short answer also largely coincide after the prompt (the same
answer, the same Confidence line): scoring packs each group's prompt and the tree of its distinct prefixes into
one sequence under tree attention, so each distinct prefix is computed once too.

Under activation checkpointing the backward replays each decoder layer, cache update included; the per-row path's
caches (``PrefillCache``, ``PromptCache``) make that update idempotent, so the replay computes what the first run
did and the prompt stays computed once (``compat.enable_activation_checkpointing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from caopd.models import tree_forward
from caopd.models.compat import (
    activation_checkpointing,
    cache_kwargs,
    check_prompt_sharing,
    full_attention_cache,
    last_logits_only,
)

# The longest prompt + prefix tree scored as one segment: its attention scores and bias grow with the square of its
# length, so longer ones take the per-row path whatever they share.
MAX_TREE_SEGMENT = 2048
# The tree path must cost less than this share of the per-row path: its packing and bias are extra work the cost
# estimate leaves out (measured on the tiny model: at equal estimates the tree path was up to 1.2× slower).
TREE_COST_MARGIN = 0.8


def left_padded(prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu",
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, attention mask and position ids of prompts padded on the left, so every prompt ends at the last column
    (where the logits of its first completion token are)."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


def right_padded(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(input ids, labels) rows right-padded to the longest, for language-model training: ``input_ids`` (padded with
    ``pad_id``), ``labels`` (padded with -100, which the loss ignores) and ``attention_mask``."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class StoreOnceLayer(DynamicLayer):
    """A prompt's keys and values, stored by the first update only. A later update — the backward replaying the
    layer under activation checkpointing — returns what the first returned (the update of an empty layer: the same
    ops, so the replay's saved tensors are the first run's bit for bit) and stores nothing, so the completion rows
    keep reading the states the forward computed."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            return super().update(key_states, value_states, *args, **kwargs)
        return DynamicLayer().update(key_states, value_states, *args, **kwargs)


class PrefillCache(DynamicCache):
    """The prompts' forward cache: a ``StoreOnceLayer`` for each of the model's layers, which must all be plain
    full-attention layers (``compat.full_attention_cache``)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):  # as compat.full_attention_cache
            raise ValueError(f"{type(config).__name__}: a prefill cache holds full-attention layers only")
        self.layers = [StoreOnceLayer() for _ in self.layers]


class PromptViewLayer(DynamicLayer):
    """Read-only: the prompts' keys and values, row ``rows[r]`` before completion row ``r``'s own. An update returns
    them concatenated along the sequence axis, as ``DynamicLayer`` does after ``batch_select_indices(rows)``, and
    stores nothing, so a replay reads the same prompts; the length stays the prompts', from which the model builds
    the attention mask. The rows are selected inside the update, so the cache holds each prompt once: under
    activation checkpointing a layer's replay selects them again rather than the backward keeping K copies."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.rows = keys, values, rows
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.keys[self.rows, ...], key_states], dim=-2),
                torch.cat([self.values[self.rows, ...], value_states], dim=-2))


class PromptCache(DynamicCache):
    """The completion forward's cache: row ``r`` reads prompt ``rows[r]``'s keys and values from a filled
    ``PrefillCache`` (autograd reaches the prompts' forward through them)."""

    def __init__(self, prefilled: PrefillCache, rows: torch.Tensor) -> None:
        super().__init__()
        self.layer_class_to_replicate = None  # every layer is given: none is added on the fly
        self.layers = [PromptViewLayer(layer.keys, layer.values, rows) for layer in prefilled.layers]


class GrowingLayer(DynamicLayer):
    """A decoding cache layer whose keys and values sit in a buffer with room for ``reserve`` more tokens, written in
    place: ``DynamicLayer`` concatenates the whole cache at every decoding step, which at a 1,000-token prompt was a
    third of the sampling time. The keys and values it returns are views of the buffer; a selection of rows
    (``batch_select_indices``) leaves them as a plain tensor, and the next update moves them to a new buffer."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve, self.buffers = reserve, None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._has_room(new):
            self.buffers = tuple(states.new_empty((*states.shape[:2], length + new + self.reserve, states.shape[3]))
                                 for states in (key_states, value_states))
            if length:
                self.buffers[0][:, :, :length] = self.keys
                self.buffers[1][:, :, :length] = self.values
        keys, values = self.buffers
        keys[:, :, length:length + new] = key_states
        values[:, :, length:length + new] = value_states
        self.keys, self.values = keys[:, :, :length + new], values[:, :, :length + new]
        return self.keys, self.values

    def _has_room(self, new: int) -> bool:
        """Whether the keys are the front of the buffer (not a selection of rows since) with ``new`` tokens free."""
        if self.buffers is None or self.get_seq_length() == 0:
            return False
        keys = self.buffers[0]
        return (self.keys.data_ptr() == keys.data_ptr() and self.keys.shape[0] == keys.shape[0]
                and self.keys.shape[-2] + new <= keys.shape[-2])


class DecodingCache(DynamicCache):
    """The sampling engine's cache: a ``GrowingLayer`` for each of the model's layers, which must all be plain
    full-attention layers (``compat.full_attention_cache``), with room for ``reserve`` new tokens per row."""

    def __init__(self, config: Any, reserve: int) -> None:
        super().__init__(config=config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):
            raise ValueError(f"{type(config).__name__}: a decoding cache holds full-attention layers only")
        self.layers = [GrowingLayer(reserve) for _ in self.layers]


def prefill(model: Any, prompt_ids: Sequence[Sequence[int]], pad_id: int, cache: Any = None,
            ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the left-padded prompts: (KV cache, last-position logits, mask, next position per row).

    ``cache``: the cache to fill (default: a ``DynamicCache`` for the model's layers, as the model itself would
    make). It is handed to the model and returned as such: a model that checkpoints its layers in training runs with
    ``use_cache=False`` and returns no cache, but its layers still fill the one they are given."""
    device = next(model.parameters()).device
    input_ids, mask, positions = left_padded(prompt_ids, pad_id, device)
    cache = DynamicCache(config=model.config) if cache is None else cache
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache),
                use_cache=_use_cache(model), **last_logits_only(model))
    return cache, out.logits[:, -1], mask, positions[:, -1:] + 1


def _use_cache(model: Any) -> bool:
    """``use_cache`` for a forward handed a cache: the layers fill the cache they are given either way, and under
    activation checkpointing True only makes transformers warn that it turns caching off (it keeps ours)."""
    return not activation_checkpointing(model)


def completion_logits(model: Any, prompt_ids: Sequence[Sequence[int]],
                      completions: Sequence[Sequence[Sequence[int]]], pad_id: int,
                      lockstep: bool = False) -> torch.Tensor:
    """Next-token logits at every completion token, ``[total completion tokens, vocab]``, group after group.

    ``completions[g]`` are the completions that follow ``prompt_ids[g]``; the logits predicting completion token
    ``j`` are the model's output after the prompt and tokens ``< j``, exactly as in one forward over prompt +
    completion, but the prompt is computed once per group — and, for the models ``tree_forward`` supports, each
    distinct completion prefix once (``tree_completion_logits``). ``lockstep``: always two forwards, whatever the
    data (sharded models gather their layers in every forward, on every process at once).
    """
    if not lockstep and all(prompt_ids) and tree_forward.supports(model):
        trees = [prefix_tree(group) for group in completions]
        if tree_pays(prompt_ids, completions, trees, model.config.hidden_size):
            return tree_completion_logits(model, prompt_ids, completions, trees, pad_id)
    # Idempotent caches where the model's are plain full attention (bit for bit the same logits as DynamicCache's);
    # other layer kinds keep DynamicCache, which checkpointing refuses (compat.enable_activation_checkpointing).
    shareable = full_attention_cache(model.config)
    if not shareable:
        check_prompt_sharing(model.config)
    cache, first, mask, next_pos = prefill(model, prompt_ids, pad_id,
                                           cache=PrefillCache(model.config) if shareable else None)
    device = first.device
    sizes = torch.tensor([len(group) for group in completions], device=device)
    group_of_row = torch.repeat_interleave(torch.arange(len(completions), device=device), sizes)
    flat = [ids for group in completions for ids in group]
    lengths = torch.tensor([len(ids) for ids in flat], device=device)
    first = first[group_of_row]
    width = int(lengths.max()) - 1 if flat else 0
    if width <= 0:  # one-token completions: the prompt's last logits are all there is
        if lockstep:  # sharded (FSDP) processes must all run two forwards: a second one that predicts nothing
            idle = model(input_ids=torch.full((1, 1), pad_id, device=device), use_cache=False).logits
            return first[lengths > 0] + 0.0 * idle.sum()  # in the graph, so its backward runs everywhere too
        return first[lengths > 0]
    # each completion row reads its prompt's cached keys and values
    if shareable:
        cache = PromptCache(cache, group_of_row)
    else:
        cache.batch_select_indices(group_of_row)
    inputs = torch.full((len(flat), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(flat):  # a completion's last token predicts nothing that is trained
        if len(ids) > 1:  # (an empty completion has no tokens to predict at all)
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
    columns = torch.arange(width, device=device)
    inputs_mask = (columns[None, :] < (lengths[:, None] - 1)).long()
    logits = model(input_ids=inputs.to(device), attention_mask=torch.cat([mask[group_of_row], inputs_mask], dim=1),
                   position_ids=next_pos[group_of_row] + columns[None, :], **cache_kwargs(cache),
                   use_cache=_use_cache(model)).logits
    every = torch.cat([first[:, None], logits], dim=1)  # [rows, width + 1, vocab]: position j predicts token j
    predicts = torch.arange(width + 1, device=device)[None, :] < lengths[:, None]
    return every[predicts]


@dataclass
class PrefixTree:
    """The distinct proper prefixes of one group's completions, as nodes: node ``i`` is a prefix whose last token is
    ``tokens[i]``, ``depths[i]`` tokens after the prompt, extending node ``parents[i]`` (−1: the prompt itself).
    ``paths[c]`` are the nodes of completion ``c``'s prefixes of length 1, 2, … (all but the whole completion, whose
    last token predicts nothing)."""

    tokens: list[int]
    depths: list[int]
    parents: list[int]
    paths: list[list[int]]


def prefix_tree(completions: Sequence[Sequence[int]]) -> PrefixTree:
    """Completions that start alike share the nodes of their common prefix; parents come before their children."""
    index: dict[tuple[int, int], int] = {}
    tree = PrefixTree([], [], [], [])
    for ids in completions:
        node, path = -1, []
        for depth, token in enumerate(ids[:-1]):
            child = index.get((node, token))
            if child is None:
                child = index[(node, token)] = len(tree.tokens)
                tree.tokens.append(token)
                tree.depths.append(depth)
                tree.parents.append(node)
            node = child
            path.append(node)
        tree.paths.append(path)
    return tree


def pack_rows(sizes: Sequence[int]) -> list[list[int]]:
    """Items into rows as long as the longest item, first-fit by decreasing size: few rows, little padding."""
    capacity, rows, room = max(sizes), [], []
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        row = next((r for r in range(len(rows)) if room[r] >= sizes[item]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(item)
        room[row] -= sizes[item]
    return rows


@dataclass
class PackedTrees:
    """Groups laid out for one forward: ``tokens``/``positions [rows, width]``, ``sees [rows, width, width]`` (query
    sees key) and ``index``, the flat ``row × width + column`` whose logits predict each completion token."""

    tokens: np.ndarray
    positions: np.ndarray
    sees: np.ndarray
    index: list[int]


def pack_trees(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]],
               trees: Sequence[PrefixTree], pad_id: int) -> PackedTrees:
    """Each group one segment — its prompt, then the nodes of its prefix tree — packed into rows. A prompt token
    sees the prompt before it; a node sees its prompt and its own ancestors (tree attention), at the position it
    has in its completions; padding sees only itself (finite, and read by nobody)."""
    sizes = [len(prompt) + len(tree.tokens) for prompt, tree in zip(prompt_ids, trees)]
    rows, width = pack_rows(sizes), max(sizes)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    sees = np.zeros((len(rows), width, width), dtype=bool)
    sees[:, np.arange(width), np.arange(width)] = True
    last_prompt = [0] * len(trees)  # flat index of each group's last prompt token
    for r, row in enumerate(rows):
        offset = 0
        for g in row:
            prompt, tree = prompt_ids[g], trees[g]
            begin, nodes, end = offset, offset + len(prompt), offset + len(prompt) + len(tree.tokens)
            tokens[r, begin:nodes], tokens[r, nodes:end] = prompt, tree.tokens
            positions[r, begin:nodes] = np.arange(len(prompt))
            positions[r, nodes:end] = len(prompt) + np.asarray(tree.depths, dtype=np.int64)
            sees[r, begin:nodes, begin:nodes] = np.tril(np.ones((len(prompt), len(prompt)), dtype=bool))
            sees[r, nodes:end, begin:nodes] = True
            for node, parent in enumerate(tree.parents):  # a node sees what its parent sees, and itself
                if parent >= 0:
                    sees[r, nodes + node, nodes:end] = sees[r, nodes + parent, nodes:end]
                sees[r, nodes + node, nodes + node] = True
            last_prompt[g] = r * width + nodes - 1
            offset = end
    index: list[int] = []
    for g, (tree, group) in enumerate(zip(trees, completions)):
        for ids, path in zip(group, tree.paths):
            if ids:  # token 0 from the prompt's last position, token j from the node of its first j tokens
                index.append(last_prompt[g])
                index.extend(last_prompt[g] + 1 + node for node in path)
    return PackedTrees(tokens, positions, sees, index)


def tree_pays(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]],
              trees: Sequence[PrefixTree], hidden_size: int) -> bool:
    """Whether scoring the packed prefix trees costs less than a row per completion.

    Cost = forward positions + attention pairs (query × key) / (4 · hidden size): a position's matmuls grow with
    the square of the hidden size and a pair's work with it, and on the CPU the pairs' softmax and bias are
    memory-bound (fitted on the tiny model: ~580 pairs cost a position, at hidden size 128). The tree path wins where
    completions share prefixes; without sharing its dense attention over whole segments loses (2.4× slower at
    K = 16 × 60 distinct tokens)."""
    sizes = [len(prompt) + len(tree.tokens) for prompt, tree in zip(prompt_ids, trees)]
    if max(sizes) > MAX_TREE_SEGMENT:
        return False
    per_pair = 1 / (4 * hidden_size)
    rows, width = len(pack_rows(sizes)), max(sizes)
    tree_cost = rows * width * (1 + width * per_pair)
    prompt_width = max(len(prompt) for prompt in prompt_ids)
    n_rows = sum(len(group) for group in completions)
    row_width = max((max(len(ids) - 1, 0) for group in completions for ids in group), default=0)
    rows_cost = (len(prompt_ids) * prompt_width * (1 + prompt_width * per_pair)
                 + n_rows * row_width * (1 + (prompt_width + row_width) * per_pair))
    return tree_cost < TREE_COST_MARGIN * rows_cost


def tree_completion_logits(model: Any, prompt_ids: Sequence[Sequence[int]],
                           completions: Sequence[Sequence[Sequence[int]]], trees: Sequence[PrefixTree],
                           pad_id: int) -> torch.Tensor:
    """``completion_logits`` in one forward that computes each prompt and each distinct completion prefix once
    (``pack_trees``). The gradient of a shared node is the sum over the completions through it, exactly as with a
    row each."""
    device = next(model.parameters()).device
    packed = pack_trees(prompt_ids, completions, trees, pad_id)
    logits = tree_forward.forward_with_bias(
        model, torch.from_numpy(packed.tokens).to(device), torch.from_numpy(packed.positions).to(device),
        tree_forward.visibility_bias(torch.from_numpy(packed.sees).to(device), model.dtype))
    return logits.flatten(0, 1)[torch.tensor(packed.index, dtype=torch.long, device=device)]
