"""The tiny default model: tokenizer, packaged checkpoint, one loading path, deterministic pre-training."""

import shutil

import pytest
import torch

from caopd.config.pretrain import PretrainConfig
from caopd.config.sampling import SamplingConfig
from caopd.errors import CaopdInputError
from caopd.models import tiny
from caopd.models.loading import load_model
from caopd.rollout.transformers_engine import TransformersEngine
from caopd.tasks.arithmetic import ArithmeticTask, generate_rows
from caopd.training.pretrain import pretrain_tiny


def test_tokenizer_is_character_level_and_round_trips():
    tok = tiny.build_tokenizer()
    text = "[408\nConfidence: 0.38|0.38]12*34="
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert len(tok) == 54


def test_packaged_checkpoint_is_small_safetensors_and_qwen3():
    files = {p.name: p.stat().st_size for p in tiny.CHECKPOINT_DIR.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt")) for n in files)
    assert sum(files.values()) <= 8 * 1024 * 1024
    loaded = load_model("tiny")
    assert loaded.model.config.model_type == "qwen3" and loaded.template == "compact"
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert 0.5e6 < n_params < 1.5e6


def test_packaged_model_answers_arithmetic(tiny_model):
    """The shipped base solves easy kinds greedily and fails most of the hardest ones (a useful spread)."""
    task = ArithmeticTask()
    engine = TransformersEngine(tiny_model.model, tiny_model.tokenizer)
    accuracy = {}
    for kind in ("add_1x1", "mul_2x2"):
        examples = task.examples_from_rows(generate_rows(60, 3, [kind]))
        outs = engine.generate([e.prompt for e in examples], SamplingConfig(temperature=0.0, max_new_tokens=24))
        accuracy[kind] = sum(task.verify(e, o[0].text) for e, o in zip(examples, outs)) / len(examples)
    assert accuracy["add_1x1"] >= 0.9 and accuracy["mul_2x2"] <= 0.5


def test_local_folder_loads_through_the_same_path(tmp_path, tiny_model):
    folder = tmp_path / "copy"
    shutil.copytree(tiny.CHECKPOINT_DIR, folder)
    loaded = load_model(str(folder))
    assert loaded.template == "compact"
    for a, b in zip(loaded.model.parameters(), tiny_model.model.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_folder_missing_files_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CaopdInputError, match="safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(CaopdInputError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    shutil.copy(tiny.CHECKPOINT_DIR / "config.json", tmp_path / "config.json")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CaopdInputError, match="pickle"):
        load_model(str(tmp_path))


def test_pretraining_is_deterministic(tmp_path):
    cfg = PretrainConfig(steps=3, batch_size=8, warmup_steps=1)
    first = pretrain_tiny(tmp_path / "a", cfg, progress=False, eval_per_kind=2)
    second = pretrain_tiny(tmp_path / "b", cfg, progress=False, eval_per_kind=2)
    assert first["final_loss"] == second["final_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert load_model(str(tmp_path / "a")).template == "compact"
