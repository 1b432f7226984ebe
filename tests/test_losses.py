"""Each divergence against a naive reference built from torch's own KL on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from caopd.training.losses import token_cross_entropy, token_divergence
from caopd.training.teachers import Teacher


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)


def kl_ref(p_logits, q_logits):
    """KL(p ‖ q) per row through torch.nn.functional.kl_div (input = log q, target = log p)."""
    return F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True,
                    reduction="none").sum(-1)


def test_temperature_divides_both_models_logits(logits):
    s, t = logits
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        torch.testing.assert_close(token_divergence(s, t, divergence, temperature=2.0),
                                   token_divergence(s / 2, t / 2, divergence))
        assert not torch.equal(token_divergence(s, t, divergence, temperature=2.0), token_divergence(s, t, divergence))


def test_forward_and_reverse_kl(logits):
    s, t = logits
    torch.testing.assert_close(token_divergence(s, t, "forward_kl"), kl_ref(t, s))
    torch.testing.assert_close(token_divergence(s, t, "reverse_kl"), kl_ref(s, t))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd(logits, beta):
    s, t = logits
    p_s, p_t = F.softmax(s, -1), F.softmax(t, -1)
    m = beta * p_t + (1 - beta) * p_s
    ref = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=beta), ref)


def test_jsd_endpoints_are_the_kls(logits):
    s, t = logits
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.0), kl_ref(t, s))
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1.0), kl_ref(s, t))


def test_top_k_restricts_and_renormalises_on_teacher_support(logits):
    s, t = logits
    k = 3
    idx = t.topk(k, -1).indices
    ref = kl_ref(t.gather(-1, idx), s.gather(-1, idx))
    torch.testing.assert_close(token_divergence(s, t, "forward_kl", top_k=k), ref)
    # k at or above the vocabulary is the full distribution
    torch.testing.assert_close(token_divergence(s, t, "forward_kl", top_k=7), kl_ref(t, s))


def test_divergence_zero_when_equal_and_gradient_flows_only_to_student(logits):
    s, _ = logits
    s = s.clone().requires_grad_(True)
    t = s.detach().clone().requires_grad_(True)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert token_divergence(s, t, kind).abs().max() < 1e-6
    token_divergence(s, t + 1.0 * torch.arange(7), "forward_kl").sum().backward()
    assert s.grad is not None and t.grad is None


def test_cross_entropy(logits):
    s, _ = logits
    targets = torch.tensor([0, 1, 2, 3, 4])
    expected = -F.log_softmax(s, -1)[torch.arange(5), targets]
    torch.testing.assert_close(token_cross_entropy(s, targets), expected)


def test_ema_teacher_update():
    student = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[0.0, 0.0]]))
    teacher = Teacher("ema", student, ema_rate=0.01)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, -2.0]]))
    teacher.after_step(student)
    # θ_t = 0.99 · 0 + 0.01 · θ_s
    torch.testing.assert_close(teacher.model.weight, torch.tensor([[0.01, -0.02]]))
    teacher.after_step(student)
    torch.testing.assert_close(teacher.model.weight, torch.tensor([[0.0199, -0.0398]]))
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_frozen_teacher_does_not_move_and_student_teacher_is_live():
    student = torch.nn.Linear(2, 1)
    frozen, live = Teacher("frozen", student), Teacher("student", student)
    with torch.no_grad():
        student.weight.add_(1.0)
    frozen.after_step(student)
    assert not torch.equal(frozen.model.weight, student.weight)
    assert live.model is student
    assert math.isclose(0.01, Teacher("ema", student).ema_rate)
