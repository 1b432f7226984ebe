"""Checkpoints and loading at scale, fast: a safetensors folder saved in shards loads (load_model, resume), a meta
build reads no weights, and the FSDP pieces — the collective timeout, mixed precision, LoRA units, sharded
checkpoints written and read back — in a one-process gloo group (FSDP2 runs on one process as on many; the
two-process runs are in test_distributed.py)."""

import copy
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from caopd.errors import CaopdInputError
from caopd.models.distributed import World, full_tensor, join_process_group, shard_model, shard_models
from caopd.models.loading import load_model, load_weights, safetensors_files
from caopd.training.checkpoints import latest_checkpoint, load_checkpoint, read_sharded_checkpoint, save_checkpoint
from caopd.training.teachers import Teacher

TIMEOUT_MINUTES = 7.5


def _weights(model):
    return {name: full_tensor(t.detach()).clone() for name, t in model.state_dict().items()}


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _nudge(model, seed):
    """Change every weight (as a training step would) so that a restore has something to undo."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            local.add_(torch.randn(local.shape, generator=generator, dtype=local.dtype) * 1e-3)


def _train_step(model, optimizer, seed):
    torch.manual_seed(seed)
    ids = torch.randint(3, 40, (2, 6))
    model(ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


# --- safetensors folders saved in shards --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    """The tiny model saved as a large one is: ``model-0000i-of-0000n.safetensors`` and an index."""
    loaded = load_model("tiny", device="cpu")
    folder = tmp_path_factory.mktemp("sharded")
    loaded.model.save_pretrained(folder, max_shard_size="1MB")
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_a_folder_saved_in_shards_loads_through_load_model_and_load_weights(sharded_folder):
    files = safetensors_files(sharded_folder)
    assert len(files) > 1 and not (sharded_folder / "model.safetensors").exists()
    reference = _weights(load_model("tiny", device="cpu").model)
    _assert_same(_weights(load_model(str(sharded_folder), device="cpu").model), reference)
    fresh = load_model("tiny", device="cpu").model
    _nudge(fresh, 0)
    load_weights(fresh, sharded_folder)  # the tied head is stored once, under the embeddings' name
    _assert_same(_weights(fresh), reference)


def test_a_missing_shard_or_a_foreign_tensor_is_named(sharded_folder, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = load_model("tiny", device="cpu").model
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in sharded_folder.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    last = safetensors_files(broken)[-1]
    last.unlink()
    with pytest.raises(CaopdInputError, match=f"field {last.name!r}: weight file missing"):
        load_weights(model, broken)
    short = tmp_path / "short"  # one tensor left out of a single-file checkpoint
    short.mkdir()
    save_file({k: v for k, v in model.state_dict().items() if k not in ("model.norm.weight", "lm_head.weight")},
              str(short / "model.safetensors"))
    with pytest.raises(CaopdInputError, match="field 'model.norm.weight': 1 of the model's tensors are not in"):
        load_weights(model, short)  # (the tied head is there, as the embeddings)
    other = load_model("standin", device="cpu").model  # the same names, other sizes
    with pytest.raises(CaopdInputError, match=r"field 'model.embed_tokens.weight': shape \[54, 128\] where the "
                                              r"model has \[3072, 96\]"):
        load_weights(other, sharded_folder)
    with pytest.raises(CaopdInputError, match="field 'model.embed_tokens.weight': tensors the model does not "
                                              "have"):  # its names are base_model.model.…
        load_weights(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])), sharded_folder)


def test_a_meta_build_reads_no_weights_and_keeps_the_generation_config(sharded_folder, tmp_path):
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for file in sharded_folder.iterdir():
        (unreadable / file.name).write_bytes(b"not a safetensors file" if file.suffix == ".safetensors"
                                             else file.read_bytes())
    with pytest.raises(SafetensorError):  # the weights really are unreadable
        load_model(str(unreadable), device="cpu")
    (unreadable / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    meta = load_model(str(unreadable), device="cpu", weights="meta")
    assert all(p.is_meta for p in meta.model.parameters()) and all(b.is_meta for b in meta.model.buffers())
    assert meta.model.generation_config.eos_token_id == [1, 7]  # where sampling stops, as on rank 0
    reference = load_model("tiny", device="cpu")
    assert meta.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    assert sorted(meta.model.state_dict()) == sorted(reference.model.state_dict())


# --- replicated checkpoints: an HF folder rank 0 writes ------------------------------------------------------------

def test_a_replicated_checkpoint_resumes_from_a_student_saved_in_shards(tmp_path):
    loaded = load_model("tiny", device="cpu")
    student = loaded.model
    teacher = Teacher("ema", student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    _train_step(student, optimizer, 0)
    teacher.after_step(student)
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 1, student, loaded.tokenizer, optimizer, teacher, [{"step": 1}], keep=2)
    saved, saved_teacher = _weights(student), _weights(teacher.model)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    draws = torch.rand(3)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "optimizer.pt", "rng-0.pt", "state.json",
        "teacher.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # the student as a large model's save leaves it: in shards with an index
    (path / "model.safetensors").unlink()
    student.save_pretrained(path, max_shard_size="1MB")
    assert len(safetensors_files(path)) > 1
    _train_step(student, optimizer, 1)
    teacher.after_step(student)
    assert load_checkpoint(path, student, optimizer, teacher) == (1, [{"step": 1}])
    _assert_same(_weights(student), saved)
    _assert_same(_weights(teacher.model), saved_teacher)
    assert torch.equal(torch.rand(3), draws)  # the RNG as it was at the save
    restored = optimizer.state_dict()["state"]
    assert all(torch.equal(restored[i]["exp_avg"], saved_optimizer["state"][i]["exp_avg"]) for i in restored)
    with pytest.raises(CaopdInputError, match="field 'sharding': written by a run with sharding='replicate'; "
                                              "resume it with the same sharding"):
        load_checkpoint(path, student, optimizer, teacher, World(0, 2, fsdp=True))


# --- FSDP in a one-process group -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group joined as torchrun's processes join theirs (``env://``)."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    join_process_group(TIMEOUT_MINUTES)
    try:
        yield World(0, 1, fsdp=True)
    finally:
        dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_the_collective_timeout_reaches_the_process_group(process_group):
    import torch.distributed as dist

    group = dist.distributed_c10d._get_default_group()
    assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(minutes=TIMEOUT_MINUTES)


def test_bf16_mixed_precision_computes_in_bf16_over_fp32_shards(process_group):
    model = load_model("tiny", device="cpu").model
    reference = _weights(model)
    shard_models([model, model], torch.bfloat16)  # the same model twice is sharded once
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())
    _assert_same(_weights(model), reference)
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.dtype == torch.bfloat16  # the forward ran on the bf16 all-gathered weights
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_a_lora_model_shards_with_its_adapters_in_the_decoder_layers_units(process_group):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FSDPModule

    peft_model = get_peft_model(load_model("tiny", device="cpu").model, LoraConfig(r=4, target_modules="all-linear"))
    shard_model(peft_model, torch.bfloat16)
    layers = [m for m in peft_model.modules() if type(m).__name__ == "FSDPQwen3DecoderLayer"]
    assert len(layers) == 4 and all(isinstance(m, FSDPModule) for m in layers)
    names = {n for n, _ in layers[0].named_parameters()}
    assert any("lora_A" in n for n in names) and any("base_layer" in n for n in names)  # one unit, both kinds
    peft_model(torch.tensor([[5, 6, 7, 8]])).logits.float().sum().backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert trained == {n for n, p in peft_model.named_parameters() if p.requires_grad}


def test_a_sharded_checkpoint_is_written_by_every_process_and_read_back(process_group, tmp_path):
    world = process_group
    loaded = load_model("tiny", device="cpu")
    student = loaded.model
    teacher = Teacher("ema", student)
    shard_models([student, teacher.model])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for step in range(3):
        _train_step(student, optimizer, step)
        teacher.after_step(student)
        save_checkpoint(tmp_path, step + 1, student, loaded.tokenizer, optimizer, teacher, [{"step": step + 1}],
                        keep=2, world=world)
    path = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    # DCP's shards (one file per process), its index, each process's RNG and the state: no gathered weights
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "rng-0.pt", "state.json"]
    assert json.loads((path / "state.json").read_text()) == {"step": 3, "log": [{"step": 3}], "sharding": "fsdp",
                                                             "processes": 1}
    saved, saved_teacher = _weights(student), _weights(teacher.model)
    saved_moments = {n: full_tensor(s["exp_avg"]).clone() for n, s in zip(
        (n for n, _ in student.named_parameters()), (optimizer.state[p] for p in student.parameters()))}
    stored = read_sharded_checkpoint(path)  # whole tensors, read without a process group
    assert torch.equal(stored["student.model.norm.weight"], saved["model.norm.weight"])
    assert torch.equal(stored["teacher.model.norm.weight"], saved_teacher["model.norm.weight"])
    assert torch.equal(stored["optimizer.state.model.norm.weight.exp_avg"], saved_moments["model.norm.weight"])

    _train_step(student, optimizer, 9)
    teacher.after_step(student)
    assert load_checkpoint(path, student, optimizer, teacher, world) == (3, [{"step": 3}])
    _assert_same(_weights(student), saved)
    _assert_same(_weights(teacher.model), saved_teacher)
    for name, param in student.named_parameters():
        assert torch.equal(full_tensor(optimizer.state[param]["exp_avg"]), saved_moments[name]), name
    with pytest.raises(CaopdInputError, match="field 'sharding': written by a run with sharding='fsdp'"):
        load_checkpoint(path, student, optimizer, teacher, World())
