"""LoRA through PEFT and bf16 compute: the teacher that is the base with the adapters off, the EMA of the adapters,
the merged weights, and bf16 losses beside fp32 ones."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from caopd.config.sampling import SamplingConfig
from caopd.config.stages import TrainStageConfig
from caopd.config.training import LoRAConfig, TrainConfig
from caopd.models import lora
from caopd.models.distributed import World
from caopd.models.loading import METADATA_FILE, load_model
from caopd.models.precision import compute_precision
from caopd.rollout.base import Completion
from caopd.stages.train import run_training
from caopd.tasks.base import Example
from caopd.training.objectives import StepContext, TrainItem, VerifiedRollouts, objective_for
from caopd.training.teachers import Teacher

IDS = torch.tensor([[3, 17, 5, 9, 11, 4]])


def _adapted(name="tiny", r=4):
    """A model with adapters whose B is not zero (a fresh adapter is the identity: B starts at 0)."""
    loaded = load_model(name)
    adapters = lora.add_adapters(loaded.model, LoRAConfig(r=r))
    torch.manual_seed(0)
    with torch.no_grad():
        for param_name, param in loaded.model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.05)
    return loaded, adapters


def test_only_the_adapters_train_and_the_frozen_teacher_is_the_base_exactly():
    loaded, adapters = _adapted()
    trained = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_A.default" in n or "lora_B.default" in n for n in trained)
    teacher = Teacher("frozen", loaded.model, adapters=adapters)
    assert teacher.model is loaded.model and not teacher.copies_student  # no second copy of the model
    base = load_model("tiny").model
    with torch.no_grad():
        with teacher.scoring() as scorer:
            scored = scorer(input_ids=IDS).logits
        student = loaded.model(input_ids=IDS).logits
    assert torch.equal(scored, base(input_ids=IDS).logits)  # identical, not close: the adapters are bypassed
    assert not torch.allclose(student, scored)  # and back on after scoring


def test_the_ema_teacher_averages_the_adapters_and_leaves_the_student_trainable():
    loaded, adapters = _adapted()
    teacher = Teacher("ema", loaded.model, ema_rate=0.25, adapters=adapters)
    pairs = list(lora.adapter_pairs(loaded.model))
    assert pairs and all(torch.equal(s, t) for s, t in pairs)  # starts as the student's
    before = [t.clone() for _, t in pairs]
    with torch.no_grad():
        for s, _ in pairs:
            s.add_(1.0)
    teacher.after_step(loaded.model)
    for (s, t), old in zip(pairs, before):
        torch.testing.assert_close(t, old + 0.25 * (s - old))  # θ_t ← θ_t + rate·(θ_s − θ_t)
    with torch.no_grad(), teacher.scoring() as scorer:
        ema_logits = scorer(input_ids=IDS).logits
    with torch.no_grad():
        student_logits = loaded.model(input_ids=IDS).logits
    assert not torch.allclose(ema_logits, student_logits)
    assert all(s.requires_grad and not t.requires_grad for s, t in pairs)  # scoring switched back


def test_merging_adds_the_scaled_low_rank_update_and_drops_the_adapters():
    state = {"layer.q_proj.base_layer.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
             "layer.q_proj.lora_A.default.weight": torch.tensor([[1.0, 1.0]]),  # r = 1, in = 2
             "layer.q_proj.lora_B.default.weight": torch.tensor([[1.0], [2.0]]),  # out = 2
             "layer.q_proj.lora_A.ema.weight": torch.tensor([[9.0, 9.0]]),
             "layer.q_proj.lora_B.ema.weight": torch.tensor([[9.0], [9.0]]),
             "layer.q_proj.base_layer.bias": torch.tensor([0.5, 0.5]),
             "norm.weight": torch.tensor([1.0, 1.0])}
    merged = lora.merge_state_dict(state, scaling=2.0)
    # W + 2·B·A = [[1, 2], [3, 4]] + 2·[[1, 1], [2, 2]]
    assert merged.keys() == {"layer.q_proj.weight", "layer.q_proj.bias", "norm.weight"}
    assert torch.equal(merged["layer.q_proj.weight"], torch.tensor([[3.0, 4.0], [7.0, 8.0]]))
    assert torch.equal(merged["layer.q_proj.bias"], state["layer.q_proj.base_layer.bias"])
    assert lora.lora_scaling(LoRAConfig(r=8, alpha=16)) == 2.0


@pytest.mark.parametrize("name", ["tiny", "standin"])
def test_the_merged_weights_compute_what_the_adapted_student_computes(name):
    loaded, _ = _adapted(name)
    streamed = dict(lora.streamed_weights(loaded.model))
    assert not any("lora_" in n or "base_layer" in n for n in streamed)
    plain = load_model(name).model
    plain.load_state_dict(streamed, strict=False)  # a tied head follows its embeddings
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, loaded.model(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)  # W + s·B·A summed in another order than x·W + s·(x·A)·B
    merged = lora.merge_state_dict(loaded.model.state_dict(), lora.lora_scaling(LoRAConfig(r=4)))
    assert all(torch.equal(merged[n], t) for n, t in streamed.items())  # one merge, two ways to get it


def _groups(loaded, cfg):
    tokenizer, objective = loaded.tokenizer, objective_for(cfg)
    context = StepContext(loaded.model, Teacher("frozen", loaded.model), tokenizer, loaded.template, World())
    texts = ["15\nConfidence: 0.90", "16\nConfidence: 0.40", "15\nConfidence: 0.70", "14"]
    groups = []
    for prompt, answer in [("12+3=", "15"), ("7*8=", "56")]:
        example = Example(prompt, prompt, answer, f"{answer}\nConfidence: 1.00", {})
        completions = [Completion(t, tokenizer(t, add_special_tokens=False)["input_ids"], finished=False)
                       for t in texts]
        correct = [t.split("\n")[0] == answer for t in texts]
        rollouts = VerifiedRollouts(TrainItem(example, 0.5, None), tokenizer(prompt, add_special_tokens=False)[
            "input_ids"], completions, correct, [None] * len(texts), sum(correct) / len(texts))
        groups.append(objective.group(rollouts, context))
    return objective, context, groups


@pytest.mark.parametrize("name", ["tiny", "standin"])
def test_bf16_compute_gives_the_fp32_loss_within_bf16_resolution(name):
    loaded = load_model(name)
    cfg = TrainConfig(divergence="jsd")
    results = {}
    for precision in ("fp32", "bf16"):
        student = copy.deepcopy(loaded.model).train()
        teacher_copy = Teacher("frozen", student, frozen_dtype=torch.bfloat16 if precision == "bf16" else None)
        objective, context, groups = _groups(loaded, cfg)
        context = StepContext(student, teacher_copy, context.tokenizer, context.template, World())
        with compute_precision(precision, "cpu"):
            losses = objective.loss_and_backward(groups, context)
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results[precision] = (losses["loss"], grads, {p.dtype for p in student.parameters()})
    (loss32, grads32, dtypes32), (loss16, grads16, dtypes16) = results["fp32"], results["bf16"]
    assert dtypes32 == dtypes16 == {torch.float32}  # the masters and their gradients stay fp32
    assert loss32 > 0 and loss16 != loss32  # bf16 really computed
    # bf16 keeps 8 significant bits (relative step 2^-8 ≈ 0.4 %); through a few layers and a log-softmax the loss
    # drifts by a few of those steps
    assert loss16 == pytest.approx(loss32, rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(grads16, grads32, dim=0)
    assert cosine > 0.98


def test_lora_bf16_training_saves_the_merged_model_with_its_lineage(tmp_path, records):
    cfg = TrainConfig(steps=2, prompts_per_step=3, k=2, micro_batch_size=4, save_every=1, finetune="lora",
                      precision="bf16", teacher="ema", lora=LoRAConfig(r=4),
                      sampling=SamplingConfig(max_new_tokens=24))
    summary = run_training(TrainStageConfig(records=records, train=cfg), tmp_path / "t", progress=False)
    assert summary["steps"] == 2
    folder = tmp_path / "t" / "model"
    assert not list(folder.glob("adapter_*"))  # a plain model: what evaluation, vLLM and the registry load
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["base_model"] == "tiny" and meta["finetune"] == "lora" and meta["train"]["lora"]["r"] == 4
    trained, base = load_file(folder / "model.safetensors"), load_model("tiny").model.state_dict()
    assert trained.keys() == base.keys() - {"lm_head.weight"}  # the head is tied to the embeddings
    # float32: an update below bf16's resolution for its weight would round back to the base
    assert {t.dtype for t in trained.values()} == {torch.float32}
    # untouched by the adapters: exactly the base as it trained (bf16); adapted layers moved, by less than bf16's step
    def as_trained(name):
        return base[name].to(torch.bfloat16).float()

    assert torch.equal(trained["model.norm.weight"], as_trained("model.norm.weight"))
    moved = [n for n in base if n.endswith("q_proj.weight") and not torch.equal(trained[n], as_trained(n))]
    assert moved


def test_a_frozen_bf16_teacher_copy_keeps_its_rotary_frequencies_in_float32():
    student = load_model("standin").model
    teacher = Teacher("frozen", student, frozen_dtype=torch.bfloat16)
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    # as a bf16 load keeps them: rounding them to bf16 would shift the rotary angles of late positions by radians
    assert {b.dtype for b in teacher.model.buffers()} == {torch.float32}
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_the_ema_teacher_scores_deterministically_whatever_the_adapters_dropout():
    loaded = load_model("tiny")
    adapters = lora.add_adapters(loaded.model, LoRAConfig(r=4, dropout=0.5))
    teacher = Teacher("ema", loaded.model, adapters=adapters)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    loaded.model.train()  # as the trainer leaves it while the loss runs
    with torch.no_grad():
        with teacher.scoring() as scorer:
            first = scorer(input_ids=IDS).logits
        with teacher.scoring() as scorer:
            second = scorer(input_ids=IDS).logits
    assert torch.equal(first, second)
    assert all(m.training for m in loaded.model.modules() if type(m).__name__ == "Dropout")  # restored
