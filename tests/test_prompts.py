"""Prompts as an instruct model sees them: a converted ToolAlpaca prompt and a chemistry prompt, through the stand-in's
Qwen3 chat template, with the confidence instruction where the official code puts it, thinking on, off and at the
template's default; the tiny model (no template) keeps its raw text; the instruction a run added is in its params."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from caopd.cli import main
from caopd.io import write_jsonl
from caopd.method.protocol import MCQ_CONFIDENCE_INSTRUCTION, TOOLUSE_CONFIDENCE_INSTRUCTION
from caopd.method.templates import render_prompt
from caopd.models import standin, tiny
from caopd.tasks import get_task
from caopd.tasks.toolalpaca import convert_toolalpaca

ROOT = Path(__file__).resolve().parents[1]
CHEMISTRY = Path(__file__).parent / "fixtures" / "sciknoweval_chemistry_rows.jsonl"
GENERATION = {"template": "<|im_start|>assistant\n", "on": "<|im_start|>assistant\n",
              "off": "<|im_start|>assistant\n<think>\n\n</think>\n\n"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(standin.CHECKPOINT_DIR)


@pytest.fixture(scope="module")
def tool_row():
    return convert_toolalpaca(ROOT / "data" / "toolalpaca" / "eval_real.json")[0]


@pytest.mark.parametrize("thinking", ["template", "on", "off"])
def test_a_converted_toolalpaca_prompt_is_one_user_message_with_the_official_line_before_begin(tokenizer, tool_row,
                                                                                              thinking):
    [example] = get_task("tooluse").examples_from_rows([tool_row])
    released = tool_row["prompt"]
    head, tail = released.split("\n\nBegin!\n")
    assert example.prompt == f"{head}\n{TOOLUSE_CONFIDENCE_INSTRUCTION}\n\nBegin!\n{tail}"  # as the official code
    assert head.endswith("must be realistic and from the user.") and tail.startswith("Question: ")
    rendered = render_prompt(tokenizer, example.prompt, thinking)
    assert rendered == f"<|im_start|>user\n{example.prompt}<|im_end|>\n{GENERATION[thinking]}"


@pytest.mark.parametrize("thinking", ["template", "on", "off"])
def test_a_chemistry_prompt_keeps_its_system_message_and_asks_for_a_confidence_after_the_question(tokenizer,
                                                                                                  thinking):
    row = json.loads(CHEMISTRY.read_text().splitlines()[0])
    [example] = get_task("mcq").examples_from_rows([row])
    system, user = row["prompt"]
    rendered = render_prompt(tokenizer, example.prompt, thinking)
    assert rendered == (f"<|im_start|>system\n{system['content']}<|im_end|>\n"
                        f"<|im_start|>user\n{user['content']}\n\n{MCQ_CONFIDENCE_INSTRUCTION}<|im_end|>\n"
                        f"{GENERATION[thinking]}")


def test_the_instruction_is_added_once_and_can_be_replaced_or_left_out(tool_row):
    [asked] = get_task("tooluse").examples_from_rows([tool_row])
    [again] = get_task("tooluse").examples_from_rows([{**tool_row, "prompt": asked.prompt}])
    assert again.prompt == asked.prompt  # a prompt that already asks is left alone
    [own] = get_task("tooluse", confidence_instruction="Confidence: a number.").examples_from_rows([tool_row])
    assert "\nConfidence: a number.\n\nBegin!\n" in own.prompt
    [plain] = get_task("tooluse", ask_confidence=False).examples_from_rows([tool_row])
    assert plain.prompt == tool_row["prompt"]


def test_a_model_without_a_chat_template_takes_the_prompt_as_raw_text():
    tokenizer = tiny.build_tokenizer()
    [example] = get_task("arithmetic").examples_from_rows([{"prompt": "12*34=", "answer": "408"}])
    assert render_prompt(tokenizer, example.prompt, "off") == "12*34="


def test_a_stage_records_the_instruction_it_added_in_its_mlflow_params(tmp_path, tool_row):
    from mlflow import MlflowClient

    data = tmp_path / "rows.jsonl"
    write_jsonl(data, [tool_row])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["rollout", "--quiet", "--task", "tooluse", "--model", "standin", "--data", str(data), "--k", "1",
                 "--sampling.max-new-tokens", "4", "--out", str(tmp_path / "out"), "--tracking-uri", uri,
                 "--mlflow-dir", str(tmp_path / "mlflow")]) == 0
    client = MlflowClient(uri)
    [run] = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
             if r.data.tags.get("mlflow.runName") == "rollout-estimation"]
    assert run.data.params["prompt.instruction_added"] == TOOLUSE_CONFIDENCE_INSTRUCTION
    assert run.data.params["prompt.confidence_instruction"] == ""  # the setting: the task's own line
