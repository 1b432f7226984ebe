"""The loss taken a chunk of tokens at a time from hidden states and the LM head: the same values and gradients as
from the whole batch's logits, for every divergence, top-k, a teacher's sparse top-k, the decoupled cross-entropy and
RLCR's policy terms; no tensor as large as tokens × vocabulary; and the scoring forward that stops before the head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, GraniteConfig, Qwen3Config, Qwen3ForCausalLM

from caopd.models import batching
from caopd.models.heads import completion_states, head_bypassed, plain_output_head, project
from caopd.training.losses import (
    chunked_head_loss,
    sparse_token_divergence,
    token_cross_entropy,
    token_divergence,
)
from caopd.training.rlcr import policy_gradient_terms

TOKENS, HIDDEN, VOCAB = 11, 6, 40


def _batch(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(TOKENS, HIDDEN, generator=g, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g))
    t_states, t_head = torch.randn(TOKENS, HIDDEN, generator=g), copy.deepcopy(head).requires_grad_(False)
    weights = torch.rand(TOKENS, generator=g)
    return states, head, t_states, t_head, weights


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [t for t in tensors if t is not None]))


LOSSES = [("forward_kl", 0.5, None), ("reverse_kl", 0.5, None), ("jsd", 0.5, None), ("jsd", 0.2, None),
          ("jsd", 0.0, None), ("jsd", 1.0, None), ("forward_kl", 0.5, 5), ("reverse_kl", 0.5, 5),
          ("jsd", 0.5, 5)]


@pytest.mark.parametrize("divergence,beta,top_k", LOSSES)
@pytest.mark.parametrize("chunk", [1, 4, TOKENS, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_each_divergence_in_chunks_matches_the_whole_logits_values_and_gradients(divergence, beta, top_k, chunk,
                                                                                  bias):
    states, head, t_states, t_head, weights = _batch(bias)
    whole = (token_divergence(head(states), t_head(t_states), divergence, beta, top_k) * weights).sum() / 3

    def term(logits, rows):
        div = token_divergence(logits, project(t_states[rows], t_head), divergence, beta, top_k)
        return ((div * weights[rows]).sum() / 3)[None]

    chunked, parts = chunked_head_loss(states, head, term, chunk)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(parts, whole.detach()[None])
    for a, b in zip(_grads(chunked, states, head.weight, head.bias), _grads(whole, states, head.weight, head.bias)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_a_teachers_sparse_top_k_in_chunks_matches_the_whole_logits(divergence):
    states, head, t_states, t_head, weights = _batch(bias=False, seed=1)
    t_top = F.log_softmax(t_head(t_states), -1).topk(4, dim=-1)
    whole = (sparse_token_divergence(head(states), t_top.indices, t_top.values, divergence) * weights).sum()

    def term(logits, rows):
        return (sparse_token_divergence(logits, t_top.indices[rows], t_top.values[rows], divergence)
                * weights[rows]).sum()[None]

    chunked, _ = chunked_head_loss(states, head, term, 3)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(_grads(chunked, states, head.weight), _grads(whole, states, head.weight)):
        torch.testing.assert_close(a, b)


def test_the_decoupled_parts_and_rlcr_policy_terms_in_chunks_match_the_whole_logits():
    states, head, t_states, t_head, weights = _batch(bias=True, seed=2)
    targets = torch.arange(TOKENS) * 3 % VOCAB
    conf = torch.arange(TOKENS) % 3 == 0
    logits, t_logits = head(states), t_head(t_states)
    div_whole = (token_divergence(logits, t_logits) * weights * ~conf).sum()
    ce_whole = (token_cross_entropy(logits, targets) * weights * conf).sum() * 2.0

    def decoupled(s_logits, rows):
        div = token_divergence(s_logits, project(t_states[rows], t_head)) * weights[rows] * ~conf[rows]
        ce = token_cross_entropy(s_logits, targets[rows]) * weights[rows] * conf[rows]
        return torch.stack([div.sum(), ce.sum() * 2.0])

    chunked, parts = chunked_head_loss(states, head, decoupled, 2, n_parts=2)
    torch.testing.assert_close(parts, torch.stack([div_whole, ce_whole]).detach())
    for a, b in zip(_grads(chunked, states, head.weight, head.bias),
                    _grads(div_whole + ce_whole, states, head.weight, head.bias)):
        torch.testing.assert_close(a, b)

    advantages = torch.linspace(-1, 1, TOKENS)
    pg_whole = (policy_gradient_terms(head(states), targets, advantages) * weights).sum()
    pg, _ = chunked_head_loss(states, head, lambda s_logits, rows: (policy_gradient_terms(
        s_logits, targets[rows], advantages[rows]) * weights[rows]).sum()[None], 5)
    torch.testing.assert_close(pg, pg_whole)
    for a, b in zip(_grads(pg, states, head.weight), _grads(pg_whole, states, head.weight)):
        torch.testing.assert_close(a, b)


def test_without_a_head_the_states_are_the_logits_and_a_tied_head_gets_both_gradients():
    states, head, t_states, t_head, weights = _batch(bias=False, seed=3)
    term = lambda s_logits, rows: (token_divergence(s_logits, t_head(t_states[rows])) * weights[rows]).sum()[None]  # noqa: E731
    whole = (token_divergence(head(states), t_head(t_states)) * weights).sum()
    chunked, _ = chunked_head_loss(head(states), None, term, 2)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(_grads(chunked, states)[0], _grads(whole, states)[0])

    # a tied head: the embedding reads the same weight the head's chunks project with; its gradient is the sum of both
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    embedding.weight = head.weight
    ids = torch.arange(TOKENS) % VOCAB
    grads = []
    for loss in (lambda: chunked_head_loss(embedding(ids) * states, head, term, 3)[0],
                 lambda: (token_divergence(head(embedding(ids) * states), t_head(t_states)) * weights).sum()):
        head.weight.grad = None
        loss().backward()
        grads.append(head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_under_bf16_autocast_the_chunks_compute_what_the_head_would():
    states, head, t_states, t_head, weights = _batch(bias=False, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = (token_divergence(head(states), t_head(t_states)) * weights).sum()
        chunked, _ = chunked_head_loss(states, head, lambda s_logits, rows: (token_divergence(
            s_logits, t_head(t_states[rows])) * weights[rows]).sum()[None], 4)
        assert head(states).dtype == torch.bfloat16
    torch.testing.assert_close(chunked, whole, rtol=1e-2, atol=1e-3)
    for a, b in zip(_grads(chunked, states, head.weight), _grads(whole, states, head.weight)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op makes while active (element count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("chunk", [2, 8])
def test_no_tensor_of_the_chunked_loss_is_larger_than_a_chunk_of_logits(chunk):
    tokens, vocab = 64, 500
    g = torch.Generator().manual_seed(5)
    states = torch.randn(tokens, HIDDEN, generator=g, requires_grad=True)
    head, t_head = torch.nn.Linear(HIDDEN, vocab), torch.nn.Linear(HIDDEN, vocab).requires_grad_(False)
    t_states = torch.randn(tokens, HIDDEN, generator=g)

    def term(logits, rows):
        return token_divergence(logits, t_head(t_states[rows]), "jsd", 0.5).sum()[None]

    with LargestTensor() as seen:
        loss, _ = chunked_head_loss(states, head, term, chunk)
        loss.backward()
    # jsd stacks the two log-distributions of a chunk: at most 2 x chunk x vocab, never tokens x vocab
    assert seen.largest <= max(2 * chunk * vocab, vocab * HIDDEN)
    with LargestTensor() as whole:
        (token_divergence(head(states), t_head(t_states), "jsd", 0.5).sum()).backward()
    assert whole.largest >= tokens * vocab


def _tiny_qwen3(**overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, **overrides)
    return Qwen3ForCausalLM(config).eval()


def test_the_plain_head_is_found_only_where_the_logits_are_exactly_its_output():
    model = _tiny_qwen3()
    assert plain_output_head(model) is model.lm_head
    assert plain_output_head(_tiny_qwen3(tie_word_embeddings=True)) is not None
    # soft-capped (Gemma 2) and scaled (Granite) logits are not the head's output
    for config in (Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8),
                   GraniteConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, logits_scaling=4.0)):
        from transformers import AutoModelForCausalLM

        assert plain_output_head(AutoModelForCausalLM.from_config(config)) is None
    with head_bypassed(model.lm_head):
        assert torch.equal(model.lm_head(torch.ones(2, 32)), torch.ones(2, 32))
    assert model.lm_head(torch.ones(2, 32)).shape == (2, 50)  # restored


@pytest.mark.parametrize("tree", [True, False])
@pytest.mark.parametrize("lockstep", [False, True])
def test_scoring_states_through_the_head_are_the_scoring_logits(tiny_model, tree, lockstep, monkeypatch):
    monkeypatch.setattr(batching, "TREE_COST_MARGIN", float("inf") if tree else 0.0)
    model = tiny_model.model.eval()
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[[10, 11, 12], [10, 11, 13]], [[14], [15, 16, 17, 18]]]
    logits = batching.completion_logits(model, prompts, completions, 0, lockstep)
    states, head = completion_states(model, prompts, completions, 0, lockstep)
    if lockstep:  # a sharded model's scoring keeps its head: its logits, as they were
        assert head is None and torch.equal(states, logits)
        return
    assert head is model.get_output_embeddings() and states.shape == (logits.shape[0], model.config.hidden_size)
    torch.testing.assert_close(project(states, head), logits, rtol=1e-5, atol=1e-5)


def test_under_autocast_no_chunk_outlives_its_backward():
    """autocast caches its bf16 cast of a float32 leaf until the context ends; a chunk's hidden states must not be
    such a leaf, or every chunk — and the micro-batch's states — would stay alive for the whole step."""
    from torch.multiprocessing.reductions import StorageWeakRef

    states, head, t_states, t_head, weights = _batch(bias=False, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        body = states * 2  # the states as a forward returns them: not a leaf
        storage = StorageWeakRef(body.untyped_storage())
        loss, _ = chunked_head_loss(body, head, lambda s_logits, rows: (token_divergence(
            s_logits, t_head(t_states[rows])) * weights[rows]).sum()[None], 3)
        loss.backward()
        del body, loss
        assert storage.expired()


def test_a_term_of_the_wrong_length_is_refused_not_broadcast():
    states, head, *_ = _batch(bias=False)
    with pytest.raises(ValueError, match=r"shape \(1,\), not \(2,\)"):
        chunked_head_loss(states, head, lambda s_logits, rows: s_logits.sum()[None], 4, n_parts=2)
