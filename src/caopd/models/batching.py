"""Batched forwards that compute each prompt once: a left-padded prefill whose KV cache its samples share.

Sampling (the rollout engine) and scoring (the distillation loss, teacher and student) both run a group of
completions after one prompt; computing the prompt once per group rather than once per completion removes
its share of the FLOPs, and autograd flows through the shared cache, so the student's gradient is the same
as with the prompt repeated.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


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


def prefill(model: Any, prompt_ids: Sequence[Sequence[int]], pad_id: int,
            ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the left-padded prompts: (KV cache, last-position logits, mask, next position per row)."""
    device = next(model.parameters()).device
    input_ids, mask, positions = left_padded(prompt_ids, pad_id, device)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.cache, out.logits[:, -1], mask, positions[:, -1:] + 1


def completion_logits(model: Any, prompt_ids: Sequence[Sequence[int]],
                      completions: Sequence[Sequence[Sequence[int]]], pad_id: int,
                      lockstep: bool = False) -> torch.Tensor:
    """Next-token logits at every completion token, ``[total completion tokens, vocab]``, group after group.

    ``completions[g]`` are the completions that follow ``prompt_ids[g]``; the logits predicting completion token
    ``j`` are the model's output after the prompt and tokens ``< j``, exactly as in one forward over prompt +
    completion, but the prompt is computed once per group. ``lockstep``: always two forwards, whatever the data
    (sharded models gather their layers in every forward, on every process at once).
    """
    cache, first, mask, next_pos = prefill(model, prompt_ids, pad_id)
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
    cache.batch_select_indices(group_of_row)  # each completion row reads its prompt's cached keys and values
    inputs = torch.full((len(flat), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(flat):  # a completion's last token predicts nothing that is trained
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
    columns = torch.arange(width, device=device)
    inputs_mask = (columns[None, :] < (lengths[:, None] - 1)).long()
    logits = model(input_ids=inputs.to(device), attention_mask=torch.cat([mask[group_of_row], inputs_mask], dim=1),
                   position_ids=next_pos[group_of_row] + columns[None, :], cache=cache, use_cache=True).logits
    every = torch.cat([first[:, None], logits], dim=1)  # [rows, width + 1, vocab]: position j predicts token j
    predicts = torch.arange(width + 1, device=device)[None, :] < lengths[:, None]
    return every[predicts]
