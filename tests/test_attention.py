"""The CPU attention computes what transformers' SDPA computes, padding and grouped heads included."""

import copy

import pytest
import torch
import torch.nn.functional as F

from caopd.models.attention import NAME, grouped_attention, use_cpu_attention


class Grouped(torch.nn.Module):  # what the attention function reads off its module
    training = False


def sdpa_reference(query, key, value, keep):
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    probs = (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).masked_fill(~keep, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2)


def additive(keep):
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("q_len", [1, 5])
def test_matches_attention_with_repeated_heads_forward_and_backward(q_len):
    torch.manual_seed(0)
    batch, heads, kv_heads, kv_len, dim = 3, 4, 2, 7, 8
    query = torch.randn(batch, heads, q_len, dim, requires_grad=True)
    key = torch.randn(batch, kv_heads, kv_len, dim, requires_grad=True)
    value = torch.randn(batch, kv_heads, kv_len, dim, requires_grad=True)
    # causal over the last q_len positions, and row 1 left-padded by two keys
    keep = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    keep[1, :, :, :2] = False

    ours, weights = grouped_attention(Grouped(), query, key, value, additive(keep), scaling=dim ** -0.5)
    expected = sdpa_reference(query, key, value, keep)
    assert weights is None and ours.shape == (batch, q_len, heads, dim)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(
        query, key, value, attn_mask=keep, enable_gqa=True).transpose(1, 2))

    upstream = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (query, key, value), upstream)
    expected_grads = torch.autograd.grad(expected, (query, key, value), upstream)
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_a_fully_masked_row_stays_finite_and_leaves_the_others_alone():
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 2, 3, 4), torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    keep = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()
    keep[0, :, 0, :] = False  # a left-padding position attends to nothing
    out, _ = grouped_attention(Grouped(), query, key, value, additive(keep))
    assert torch.isfinite(out).all()
    reference = sdpa_reference(query, key, value, keep)
    torch.testing.assert_close(out[0, 1:], reference[0, 1:])
    torch.testing.assert_close(out[1], reference[1])


def test_the_tiny_model_loads_with_it_and_scores_padded_batches_as_sdpa_does(tiny_model, tmp_path):
    model = tiny_model.model
    assert model.config._attn_implementation == NAME
    # a saved checkpoint does not name it: it loads with transformers alone, vLLM or anywhere else
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    ids = torch.tensor([[0, 0, 10, 11, 12], [13, 14, 15, 16, 17]])  # row 0 left-padded (pad id 0)
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        theirs = stock(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


def test_other_architectures_and_explicit_choices_keep_their_attention(tiny_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    eager = copy.deepcopy(tiny_model.model)
    eager.set_attn_implementation("eager")
    assert not use_cpu_attention(eager) and eager.config._attn_implementation == "eager"
    # an architecture not checked against this attention (GPT-2 scales and masks its own way)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, attn_implementation="sdpa"))
    assert not use_cpu_attention(gpt2) and gpt2.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("min_pairs", [1, 10**9])  # every shape through torch's SDPA kernel, then none
def test_long_queries_go_to_sdpa_with_the_same_mask_values_and_gradients(min_pairs, monkeypatch):
    from caopd.models import attention

    monkeypatch.setattr(attention, "SDPA_MIN_PAIRS", min_pairs)
    torch.manual_seed(2)
    batch, heads, kv_heads, q_len, kv_len, dim = 2, 4, 2, 5, 9, 8
    query = torch.randn(batch, heads, q_len, dim, requires_grad=True)
    key = torch.randn(batch, kv_heads, kv_len, dim, requires_grad=True)
    value = torch.randn(batch, kv_heads, kv_len, dim, requires_grad=True)
    keep = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    keep[1, :, :, :3] = False
    keep[0, :, 0, :] = False  # a position that attends to nothing stays finite
    out, _ = attention.cpu_attention(Grouped(), query, key, value, additive(keep), scaling=dim ** -0.5)
    plain, _ = grouped_attention(Grouped(), query, key, value, additive(keep), scaling=dim ** -0.5)
    assert torch.isfinite(out).all() and out.shape == (batch, q_len, heads, dim)
    torch.testing.assert_close(out, plain)
    upstream = torch.randn_like(out)
    upstream[0, 0] = 0  # nothing reads a padding position (the kernels' gradients through its flat softmax differ)
    for got, want in zip(torch.autograd.grad(out, (query, key, value), upstream),
                         torch.autograd.grad(plain, (query, key, value), upstream)):
        torch.testing.assert_close(got, want)
