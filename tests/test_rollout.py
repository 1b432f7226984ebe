"""The transformers rollout engine: same greedy output as generate(), seeded, K per prompt, stops at EOS."""

import pytest
import torch

from caopd.config import sampling
from caopd.config.sampling import INVERSE_CDF_MIN_VOCAB, SamplingConfig
from caopd.rollout.transformers_engine import (
    TransformersEngine,
    chunk_generator,
    draw_tokens,
    inverse_cdf,
    sample_next,
    stop_token_ids,
)

PROMPTS = ["12*34=", "3+4=", "56*7=", "88+19="]


def test_greedy_matches_transformers_generate(tiny_model):
    tok, model = tiny_model.tokenizer, tiny_model.model
    engine = TransformersEngine(model, tok)
    ours = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=24))
    for prompt, (completion,) in zip(PROMPTS, ours):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert completion.token_ids == ref and ref[-1] == tok.eos_token_id  # generate's ids: the EOS included
        assert completion.finished and "Confidence:" in completion.text


@pytest.mark.parametrize("draw", ["multinomial", "inverse_cdf"])
def test_k_samples_per_prompt_seeded_and_stopping_at_eos(tiny_model, monkeypatch, draw):
    if draw == "inverse_cdf":  # the draw of real vocabularies, on the tiny model
        monkeypatch.setattr(sampling, "INVERSE_CDF_MIN_VOCAB", 0)
    engine = TransformersEngine(tiny_model.model, tiny_model.tokenizer, max_batch_prompts=3)
    cfg = SamplingConfig(n=5, temperature=1.0, max_new_tokens=24, seed=7)
    first, second = engine.generate(PROMPTS, cfg), engine.generate(PROMPTS, cfg)
    assert [len(g) for g in first] == [5] * len(PROMPTS)
    assert [[c.text for c in g] for g in first] == [[c.text for c in g] for g in second]
    other = engine.generate(PROMPTS, cfg.model_copy(update={"seed": 8}))
    assert [[c.text for c in g] for g in first] != [[c.text for c in g] for g in other]
    eos = tiny_model.tokenizer.eos_token_id
    for group in first:
        for c in group:
            # the stop token ends a finished sample's ids, once; an unfinished one ran to max_new_tokens
            assert c.token_ids.count(eos) == c.finished and (c.token_ids[-1] == eos if c.finished
                                                             else len(c.token_ids) == 24)


def test_each_decoding_step_computes_each_distinct_prefix_once(tiny_model):
    model, tok = tiny_model.model, tiny_model.tokenizer
    batch_rows = []  # the rows of every forward: the prefill, then one per decoding step
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: batch_rows.append(len(args[0])))
    try:
        cfg = SamplingConfig(n=6, temperature=1.0, max_new_tokens=24, seed=3)
        out = TransformersEngine(model, tok).generate(PROMPTS, cfg)
    finally:
        handle.remove()
    # the tokens each sample fed back: all it drew but its stop token
    samples = [(p, c.token_ids[:-1] if c.finished else c.token_ids) for p, group in enumerate(out) for c in group]
    # the forward of step j feeds the j-th token of each sample still running: one row per distinct prefix
    expected = [len({(p, tuple(ids[:j])) for p, ids in samples if len(ids) >= j}) for j in range(1, 24)]
    expected = [rows for rows in expected if rows]
    assert batch_rows == [len(PROMPTS)] + expected
    assert sum(expected) < sum(min(len(ids), 23) for _, ids in samples)  # the K samples did share prefixes


def test_length_limit_marks_unfinished(tiny_model):
    engine = TransformersEngine(tiny_model.model, tiny_model.tokenizer)
    (out,) = engine.generate(["12*34="], SamplingConfig(temperature=0.0, max_new_tokens=2))
    assert len(out[0].token_ids) == 2 and not out[0].finished


def test_sample_next_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.5, g)) for _ in range(50)}
    assert draws == {0}
    assert int(sample_next(logits, 0.0, 1.0, None)) == 0


def test_small_vocabularies_draw_exactly_as_torch_multinomial():
    # the packaged models' vocabularies: their seeded rollouts (and the committed results) are torch's draws
    probs = torch.softmax(torch.randn(6, INVERSE_CDF_MIN_VOCAB - 1, generator=torch.Generator().manual_seed(1)), -1)
    ours, torchs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(5):
        assert torch.equal(draw_tokens(probs, ours), torch.multinomial(probs, 1, generator=torchs).squeeze(-1))


def test_large_vocabularies_draw_in_proportion_and_never_a_zero_entry():
    vocab = INVERSE_CDF_MIN_VOCAB * 2
    probs = torch.zeros(3, vocab)
    probs[0, [0, 5, 9000, vocab - 1]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs[1, vocab - 1] = 2.0  # unnormalised, one entry: always it
    probs[2, 0] = 1.0
    generator = torch.Generator().manual_seed(7)
    draws = torch.stack([draw_tokens(probs, generator) for _ in range(4000)])
    assert set(draws[:, 1].tolist()) == {vocab - 1} and set(draws[:, 2].tolist()) == {0}
    counts = torch.bincount(draws[:, 0], minlength=vocab)
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 5, 9000, vocab - 1}
    # within 4 standard deviations of 4000 draws at 0.1 / 0.2 / 0.3 / 0.4
    for index, p in [(0, 0.1), (5, 0.2), (9000, 0.3), (vocab - 1, 0.4)]:
        assert abs(int(counts[index]) / len(draws) - p) < 4 * (p * (1 - p) / len(draws)) ** 0.5
    # the same generator state draws the same tokens
    a, b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(draw_tokens(probs, a), draw_tokens(probs, b))


@pytest.mark.parametrize("bad", [float("nan"), 0.0])
def test_a_row_that_is_not_a_distribution_is_refused_as_torch_refuses_it(bad):
    probs = torch.full((2, INVERSE_CDF_MIN_VOCAB), 1.0)
    probs[1] = bad
    with pytest.raises(ValueError, match="not finite or sums to 0"):
        draw_tokens(probs, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        torch.multinomial(probs, 1)


def test_inverse_cdf_by_hand():
    probs = torch.tensor([[0.25, 0.0, 0.5, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    # cumulative [0.25, 0.25, 0.75, 1.0, 1.0]: u < 0.25 → 0; [0.25, 0.75) → 2 (never the zero at 1); ≥ 0.75 → 3
    for u, expected in [(0.0, 0), (0.2499, 0), (0.25, 2), (0.7499, 2), (0.75, 3), (1 - 2**-53, 3)]:
        assert inverse_cdf(probs, torch.tensor([u, u], dtype=torch.float64)).tolist() == [expected, 2]


def test_bucket_rngs_depend_on_seed_and_bucket_only():
    def draw(seed, chunk):
        return torch.rand(4, generator=chunk_generator(seed, chunk, torch.device("cpu"))).tolist()

    assert draw(0, 1) == draw(0, 1)
    assert len({tuple(draw(s, c)) for s in (0, 1) for c in (0, 1)}) == 4


class RecordingEngine(TransformersEngine):
    """The transformers engine, noting the weights it is handed: what a colocated vLLM engine would load."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.synced: list[dict] = []

    def sync_weights(self, model) -> None:
        self.synced.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_an_engine_with_its_own_weights_is_handed_each_steps_weights_and_the_resumed_ones(tmp_path, records):
    from safetensors.torch import load_file

    from caopd.config.training import TrainConfig
    from caopd.models.loading import load_model
    from caopd.stages.train import items_from_records
    from caopd.tasks import get_task
    from caopd.training.teachers import Teacher
    from caopd.training.trainer import Trainer

    cfg = TrainConfig(steps=3, prompts_per_step=2, k=2, save_every=1, micro_batch_size=4)

    def trainer(steps):
        loaded = load_model("tiny")
        engine = RecordingEngine(loaded.model, loaded.tokenizer)
        return Trainer(cfg.model_copy(update={"steps": steps}), loaded.model, loaded.tokenizer, loaded.template,
                       get_task("arithmetic"), items_from_records(records), engine, Teacher("frozen", loaded.model),
                       tmp_path / "t", progress=False), engine

    first, engine = trainer(2)
    first.run()
    checkpoint = tmp_path / "t" / "checkpoints"
    for step, synced in zip((1, 2), engine.synced, strict=True):  # after each optimizer step, its new weights
        saved = load_file(checkpoint / f"step-{step:07d}" / "model.safetensors")
        assert all(torch.equal(saved[k], synced[k]) for k in saved)
    second, engine = trainer(3)  # resumes from step 2: the engine must not sample from the base weights
    second.run()
    assert len(engine.synced) == 2
    resumed, after = engine.synced
    step2, step3 = (load_file(checkpoint / f"step-{s:07d}" / "model.safetensors") for s in (2, 3))
    assert all(torch.equal(step2[k], resumed[k]) for k in step2)
    assert all(torch.equal(step3[k], after[k]) for k in step3)


def test_stops_on_every_eos_id_of_the_generation_config(tiny_model):
    """As vLLM does (it adds the generation config's EOS ids to every request's stop ids): a model whose generation
    config lists a second EOS id stops on it, and keeps it as the last token."""
    import copy

    model, tok = copy.deepcopy(tiny_model.model), tiny_model.tokenizer
    (plain,) = TransformersEngine(model, tok).generate(["12*34="], SamplingConfig(temperature=0.0, max_new_tokens=24))
    second_stop = plain[0].token_ids[3]  # the greedy answer's 4th token: the newline before "Confidence:"
    assert stop_token_ids(tok, model.generation_config) == {tok.eos_token_id}
    model.generation_config.eos_token_id = [tok.eos_token_id, second_stop]
    assert stop_token_ids(tok, model.generation_config) == {tok.eos_token_id, second_stop}
    (cut,) = TransformersEngine(model, tok).generate(["12*34="], SamplingConfig(temperature=0.0, max_new_tokens=24))
    assert cut[0].finished and cut[0].token_ids == plain[0].token_ids[:4]


def test_several_greedy_samples_are_refused_up_front_and_by_the_engine(tiny_model):
    """vLLM raises for greedy decoding with n > 1; the configs refuse it when built, and the transformers engine
    refuses a copy made without validation, so both engines accept the same settings."""
    import pytest
    from pydantic import ValidationError

    from caopd.config.run import RunConfig
    from caopd.config.training import TrainConfig

    with pytest.raises(ValidationError, match="sampling.temperature: 4 samples per prompt at temperature 0.0"):
        SamplingConfig(n=4, temperature=0.0)
    with pytest.raises(ValidationError, match=r"train.sampling.temperature \(with train.k rollouts per prompt\)"):
        TrainConfig(sampling=SamplingConfig(temperature=0.0))
    with pytest.raises(ValidationError, match=r"rollout.temperature \(with k rollouts per prompt\)"):
        RunConfig(rollout={"temperature": 0.0})
    SamplingConfig(n=1, temperature=0.0)  # one greedy answer is fine, and so is a small positive temperature
    SamplingConfig(n=4, temperature=1e-5)
    unchecked = SamplingConfig(n=1, temperature=0.0).model_copy(update={"n": 4})
    with pytest.raises(ValueError, match="copies of one greedy answer"):
        TransformersEngine(tiny_model.model, tiny_model.tokenizer).generate(["3+4="], unchecked)
