"""A teacher behind a vLLM server: its top-k log-probabilities, fetched over HTTP, give the same loss as the same
teacher scored in-process with top_k; a server that cannot give k, or cannot be reached, fails with what to do."""

import json

import pytest
import torch
from safetensors.torch import load_file
from vllm_fake_server import FakeVLLM

from caopd.config.sampling import SamplingConfig
from caopd.config.stages import TrainStageConfig
from caopd.config.training import TrainConfig
from caopd.errors import CaopdServiceError
from caopd.stages.train import run_training
from caopd.training.losses import sparse_token_divergence, token_divergence
from caopd.training.teacher_server import TeacherServer

TOP_K = 5


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_the_sparse_divergence_from_the_teachers_top_k_equals_the_top_k_divergence_on_its_logits(divergence):
    torch.manual_seed(0)
    student, teacher = torch.randn(7, 50), torch.randn(7, 50) * 3
    top = torch.log_softmax(teacher, -1).topk(TOP_K, dim=-1)
    sparse = sparse_token_divergence(student, top.indices, top.values, divergence, beta=0.3)
    assert torch.allclose(sparse, token_divergence(student, teacher, divergence, beta=0.3, top_k=TOP_K), atol=1e-6)


def test_the_servers_top_k_are_the_models_in_the_order_completion_logits_uses(tiny_model):
    prompts, completions = [[1, 5, 9], [4]], [[[7, 8], [3]], [[2, 2, 6]]]
    with FakeVLLM(tiny_model.model) as server:
        ids, logprobs = TeacherServer(server.url, TOP_K).top_logprobs(prompts, completions)
        assert server.requests[0]["prompt"] == [[1, 5, 9, 7, 8], [1, 5, 9, 3], [4, 2, 2, 6]]
        assert server.requests[0]["max_tokens"] == 1 and server.requests[0]["prompt_logprobs"] == TOP_K
    assert ids.shape == logprobs.shape == (6, TOP_K)  # 2 + 1 + 3 completion tokens
    with torch.no_grad():  # the third completion's first token: predicted after the prompt [4]
        row = torch.log_softmax(tiny_model.model(input_ids=torch.tensor([[4, 2, 2, 6]])).logits[0, 0].float(), -1)
    top = row.topk(TOP_K)
    assert ids[3].tolist() == top.indices.tolist()
    assert torch.allclose(logprobs[3], top.values, atol=1e-5)


def test_training_against_the_server_teacher_matches_the_same_teacher_in_process(tmp_path, records, tiny_model):
    def config(teacher, **extra):
        return TrainStageConfig(records=records, train=TrainConfig(
            steps=2, prompts_per_step=4, k=1, micro_batch_size=4, top_k=TOP_K, teacher=teacher,
            sampling=SamplingConfig(temperature=0.0, max_new_tokens=24), **extra))

    local = run_training(config("frozen"), tmp_path / "local", progress=False)
    with FakeVLLM(tiny_model.model) as server:  # the frozen base, on "other GPUs"
        remote = run_training(config("server", teacher_server=server.url), tmp_path / "remote", progress=False)
        assert len(server.requests) == 2  # one request per micro-batch: 2 steps x 4 sequences in fours
    assert [r["loss"] for r in _log(tmp_path / "remote")] == pytest.approx(
        [r["loss"] for r in _log(tmp_path / "local")], rel=1e-4)
    a, b = load_file(tmp_path / "local" / "model" / "model.safetensors"), load_file(
        tmp_path / "remote" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert local["steps"] == remote["steps"] == 2


def _log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_a_server_teacher_is_configured_with_its_url_and_top_k():
    with pytest.raises(ValueError, match="needs teacher_server"):
        TrainConfig(teacher="server", top_k=TOP_K)
    with pytest.raises(ValueError, match="and top_k"):
        TrainConfig(teacher="server", teacher_server="http://teacher:8000")
    with pytest.raises(ValueError, match="only used with teacher='server'"):
        TrainConfig(teacher_server="http://teacher:8000")


@pytest.mark.slow  # waits out the client's retries
def test_a_server_that_cannot_give_k_or_cannot_be_reached_fails_saying_what_to_do(tiny_model, monkeypatch):
    from urllib3.util.retry import Retry

    # The client's retries still happen, without their backoff (2, 4, ... 32 s: a minute of waiting here).
    monkeypatch.setattr(Retry, "_sleep_backoff", lambda self: None)
    with FakeVLLM(tiny_model.model, max_logprobs=3) as server:
        client = TeacherServer(server.url, TOP_K)
        with pytest.raises(CaopdServiceError, match="HTTP 400.*greater than max allowed: 3"):
            client.top_logprobs([[1, 2]], [[[3]]])
        url = server.url
    with pytest.raises(CaopdServiceError, match=f"teacher server {url}: ConnectionError; is `vllm serve` running"):
        TeacherServer(url, TOP_K, timeout_s=2)
