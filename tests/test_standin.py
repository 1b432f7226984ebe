"""The packaged stand-in instruct model: Qwen3's tokenizer conventions and chat template, one loading path, samples
with the real structure (thinking block, answer, Confidence line, EOS), and a deterministic build.

The packaged folder is checked against a fresh build by its tokenizer and config files (byte-equal: BPE training and
the config are exact computations) and by the weights' digest recorded in caopd.json. Determinism of the weights: a
short build (same code path) twice gives byte-identical folders here; the full default build (slow tier) reproduces
the packaged tokenizer and configs byte for byte and its loss. The packaged weights are not compared byte for byte
with a rebuild on whatever machine runs the suite: another CPU type may round float sums differently (on the machine
that built them, a rebuild was byte-identical).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, Qwen3ForCausalLM

from caopd.config.sampling import SamplingConfig
from caopd.config.standin import StandinConfig
from caopd.errors import CaopdInputError
from caopd.method.protocol import MCQ_CONFIDENCE_INSTRUCTION, parse_confidence
from caopd.method.templates import render_prompt
from caopd.models import standin
from caopd.models.loading import load_model, resolve_model_path
from caopd.rollout.transformers_engine import TransformersEngine
from caopd.tasks.arithmetic import ArithmeticTask, make_problem
from caopd.tasks.mcq import MultipleChoiceTask
from caopd.tasks.toolalpaca import convert_toolalpaca, toolalpaca_rows
from caopd.tasks.tooluse import ToolUseTask, UnparsedInput
from caopd.training import standin as builder

PACKAGED = standin.CHECKPOINT_DIR


@pytest.fixture(scope="module")
def loaded():
    return load_model("standin")


@pytest.fixture(scope="module")
def apis():
    return builder.load_tool_apis(builder.resolve_toolalpaca_path(StandinConfig().toolalpaca_path))


# --- the packaged folder and its loading ------------------------------------------------------------------------------

def test_both_aliases_load_the_packaged_qwen3_with_its_metadata(loaded):
    assert resolve_model_path("caopd-standin") == resolve_model_path("standin") == str(PACKAGED)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.template == "paper" and model.config.model_type == "qwen3"
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.padding_side == "left"
    assert model.config.max_position_embeddings == 4096 and model.config.tie_word_embeddings
    # Qwen3's layout: more embedding rows than tokens (151936 for 151669), the added tokens after the BPE.
    assert model.config.vocab_size == 3072 and len(tokenizer) == 3005
    assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in model.parameters())
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 1.0e6


def test_packaged_folder_is_small_safetensors_with_a_matching_digest():
    files = {p.name: p.stat().st_size for p in PACKAGED.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "caopd.json"} == set(files)
    assert sum(files.values()) < 4 * 1024 * 1024
    meta = json.loads((PACKAGED / "caopd.json").read_text())
    assert meta["template"] == "paper" and meta["built_by"].startswith("caopd.training.standin.build_standin")
    assert meta["config"] == StandinConfig().model_dump()  # the packaged folder is the default build
    for name, digest in meta["sha256"].items():
        assert builder.sha256_file(PACKAGED / name) == digest


def test_packaged_tokenizer_and_config_equal_a_fresh_build(tmp_path, apis):
    cfg = StandinConfig()
    tokenizer = builder.train_tokenizer(cfg, apis)
    tokenizer.save_pretrained(tmp_path)
    Qwen3ForCausalLM(standin.build_config(cfg, tokenizer)).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (PACKAGED / name).read_bytes(), name
    for name in ("config.json", "generation_config.json"):  # equal but for the transformers version that wrote them
        fresh, packaged = (json.loads((folder / name).read_text()) for folder in (tmp_path, PACKAGED))
        assert fresh.pop("transformers_version") and packaged.pop("transformers_version")
        assert fresh == packaged, name


def test_eos_is_im_end_everywhere_and_pad_is_endoftext(loaded):
    tokenizer, model = loaded.tokenizer, loaded.model
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == im_end == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id == endoftext == model.generation_config.pad_token_id
    assert tokenizer.bos_token is None  # as Qwen3: prompts start with <|im_start|>, nothing before


# --- tokenizer conventions --------------------------------------------------------------------------------------------

def test_chat_and_thinking_markers_are_single_tokens_in_qwen3_order(loaded):
    tokenizer = loaded.tokenizer
    ids = [tokenizer("x" + t + "y", add_special_tokens=False)["input_ids"] for t in
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")]
    single = [i[1] for i in ids]
    assert all(len(i) == 3 for i in ids)
    assert single == list(range(3000, 3005))  # appended after the BPE vocabulary, Qwen3's order
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    assert added == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True,
                     "<think>": False, "</think>": False}


def test_decode_keeps_the_thinking_tags_and_drops_the_chat_markers(loaded):
    tokenizer = loaded.tokenizer
    text = "<think>\nI add.\n</think>\n\n11\nConfidence: 0.85<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nI add.\n</think>\n\n11\nConfidence: 0.85"
    assert tokenizer.decode(ids) == text  # byte-level: exact round trip


def test_text_round_trips_through_the_byte_level_bpe(loaded):
    tokenizer = loaded.tokenizer
    text = 'Action Input: {"countryCode": "CN", "name": "Zürich ☃"}\n<answer>B</answer>\tCC(=O)Oc1ccccc1'
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


# --- the chat template: Qwen3's strings -------------------------------------------------------------------------------

SYSTEM_USER = [{"role": "system", "content": "You are a chemist."}, {"role": "user", "content": "Pick A or B."}]
HEAD = "<|im_start|>system\nYou are a chemist.<|im_end|>\n<|im_start|>user\nPick A or B.<|im_end|>\n"


@pytest.mark.parametrize("thinking, suffix", [
    ("template", "<|im_start|>assistant\n"),  # Qwen3 thinks by default: the model opens <think> itself
    ("on", "<|im_start|>assistant\n"),
    ("off", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),  # Qwen3's way of turning thinking off
])
def test_system_and_user_render_as_qwen3(loaded, thinking, suffix):
    assert render_prompt(loaded.tokenizer, SYSTEM_USER, thinking) == HEAD + suffix


@pytest.mark.parametrize("thinking, suffix", [("template", ""), ("on", ""), ("off", "<think>\n\n</think>\n\n")])
def test_a_plain_string_is_one_user_message(loaded, thinking, suffix):
    expected = "<|im_start|>user\n7*8=<|im_end|>\n<|im_start|>assistant\n" + suffix
    assert render_prompt(loaded.tokenizer, "7*8=", thinking) == expected


def test_assistant_turns_render_as_qwen3(loaded):
    template = loaded.tokenizer.apply_chat_template
    # Qwen3 writes an empty thinking block into the last answer when it has none.
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert template(history, tokenize=False) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                                 "<think>\n\n</think>\n\nHello<|im_end|>\n")
    # An answer before the last user query loses its thinking; the last one keeps it.
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nb"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>\ns\n</think>\n\nd"}]
    assert template(turns, tokenize=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ns\n</think>\n\nd<|im_end|>\n")


# --- the corpus -------------------------------------------------------------------------------------------------------

CATS = {"Name": "Cats", "Description": "Cat pictures",
        "NLDocumentation": 'getCat: Get a cat\nParameters: {}\nOutput: A cat.\n'
                           'findCat: Find cats by tag\nParameters: {"tag": "Required. string.", "n": "integer."}\n',
        "Instructions": ["Show me a cat.", "Find two cute cats."],
        "Golden_Answers": [[{"Action": "getCat", "Action_Input": "{}"}],
                           [{"Action": "findCat", "Action_Input": '{"tag": "cute", "n": 2}'},
                            {"Action": "getCat", "Action_Input": "{}"}]]}


def test_tooluse_prompts_are_the_tooluse_tasks_prompts_of_the_converted_rows():
    [api] = builder.tool_apis(toolalpaca_rows([CATS], "cats.json"), "cats.json")
    plain = ("Your task is to answer the user's question using available tools. \nYou have access to the following "
             "tools:\nName: Cats\nDescription: Cat pictures\nDocumentation:\ngetCat: Get a cat\nParameters: {}\n"
             "Output: A cat.\nfindCat: Find cats by tag\nParameters: {\"tag\": \"Required. string.\", \"n\": "
             "\"integer.\"}\n\nUse the following format:\nThought: you should always think about what to do\nAction: "
             "the action to take, should be one of the tool names.\nAction Input: the input to the action, must be in "
             "JSON format. All of the action input must be realistic and from the user.\n\nBegin!\nQuestion: ")
    first, second = api.instructions
    assert first.prompt_without_confidence == plain + "Show me a cat."
    # The official confidence line, on its own line before Begin! (docs/paper-setup.md).
    assert first.prompt == plain.replace(
        "from the user.\n\nBegin!", "from the user.\nConfidence: your confidence level (0.0-1.0) regarding the success "
        "of this action, must be in numerical format, no other words or explanation.\n\nBegin!") + "Show me a cat."
    assert (first.gold, second.gold) == (("getCat", {}), ("findCat", {"tag": "cute", "n": 2}))
    assert api.parameters == {"getCat": (), "findCat": ("tag", "n")}
    assert api.known_arguments == {"tag": "cute", "n": 2}


def test_function_parameters_read_the_documentation():
    doc = ('a_get: Get a\nParameters: {"x": "Required.", "y": "string."}\nOutput: ok.\n - Format: text\n'
           "b_get: Get b\nParameters: {}\nc_get: Broken\nParameters: {x}\nd_get: A list\nParameters: [1]")
    assert builder.function_parameters(doc) == {"a_get": ("x", "y"), "b_get": (), "c_get": (), "d_get": ()}


@pytest.mark.parametrize("calls, expected", [
    ([("f", {"a": 1}), ("g", {})], ("f", {"a": 1})),  # the first call: the one the task scores
    ([("f", UnparsedInput('{"s": "s": [1]}')), ("g", {})], None),  # not JSON: answered with another call
    ([("f", [1, 2])], None),
])
def test_a_gold_answer_makes_the_first_gold_call_when_its_input_is_a_json_object(calls, expected):
    assert builder.answer_call(calls) == expected


def test_rendered_tooluse_prompts_are_several_hundred_tokens(loaded, apis):
    lengths = [len(loaded.tokenizer(render_prompt(loaded.tokenizer, api.instructions[0].prompt),
                                    add_special_tokens=False)["input_ids"]) for api in apis]
    assert len(apis) == 11 and min(lengths) >= 200 and max(lengths) <= 1024
    assert sorted(lengths)[len(lengths) // 2] >= 350


def test_release_prompts_equal_the_converted_rows_and_invalid_gold_json_is_answered_otherwise(apis):
    path = builder.resolve_toolalpaca_path(StandinConfig().toolalpaca_path)
    rows = convert_toolalpaca(path)
    instructions = [instruction for api in apis for instruction in api.instructions]
    assert len(instructions) == len(rows) == 114
    assert [i.prompt_without_confidence for i in instructions] == [row["prompt"] for row in rows]
    assert [i.prompt for i in instructions] == [e.prompt for e in ToolUseTask().examples_from_rows(rows)]
    currency = next(api for api in apis if api.name == "CurrencyBeacon")
    # '"symbols": "symbols": [...]' in the release: four first gold calls whose input is not JSON
    assert sum(1 for instruction in currency.instructions if instruction.gold is None) == 4


def test_a_broken_release_file_names_file_record_and_field(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"Name": "A", "Description": "d", "NLDocumentation": "x", "Instructions": ["q"],
                                 "Golden_Answers": [[{"Action": "f", "Action_Input": "{}"}]]},
                                {"Name": "B", "Description": "d", "NLDocumentation": "x", "Instructions": "[1, ",
                                 "Golden_Answers": []}]))
    with pytest.raises(CaopdInputError, match=r"eval\.json: row 1: field 'Instructions'"):
        builder.load_tool_apis(path)
    with pytest.raises(CaopdInputError, match="does not exist"):
        builder.load_tool_apis(tmp_path / "missing.json")


def test_science_prompts_carry_the_mcq_tasks_confidence_line():
    q = builder.ScienceQuestion("Which element has the atomic number 6?", ("boron", "carbon", "neon", "argon"), "B",
                                "The element with 6 protons in its nucleus is carbon.")
    question = "Which element has the atomic number 6?\n\nA: boron\nB: carbon\nC: neon\nD: argon"
    system = {"role": "system", "content": builder.SCIENCE_SYSTEM_PROMPT}
    assert builder.science_messages(q, ask_confidence=False) == [system, {"role": "user", "content": question}]
    assert builder.science_messages(q, ask_confidence=True) == [
        system, {"role": "user", "content": question + "\n\n" + MCQ_CONFIDENCE_INSTRUCTION}]


def test_science_questions_have_four_options_and_a_gold_letter_that_holds():
    rng = random.Random(7)
    for _ in range(50):
        q = builder.science_question(rng)
        gold = q.options["ABCD".index(q.gold)]
        assert len(set(q.options)) == 4
        # The reasoning arrives at the gold option (molar masses: options to 3 decimals, reasoning to 2).
        if q.question.startswith("What is the molar mass"):
            stated = float(q.reasoning.rsplit("= ", 1)[1].removesuffix(" g/mol."))
            assert abs(stated - float(gold)) < 0.006, q
        else:
            assert gold in q.reasoning, q
    assert builder._carbon_count("CC(=O)Oc1ccccc1Cl") == 8  # 2 C + 6 c; the C of Cl is chlorine


def test_every_training_answer_has_the_response_protocol(apis):
    rng, cfg = random.Random(3), StandinConfig()
    tasks = {"tooluse": ToolUseTask(), "mcq": MultipleChoiceTask(), "arithmetic": ArithmeticTask()}
    seen = set()
    for _ in range(200):
        conversation = builder.sample_conversation(rng, cfg, apis)
        answer = conversation.response.split("</think>")[-1]
        assert conversation.response.startswith("<think>\n") == conversation.thinking
        assert parse_confidence(answer) is not None and re.fullmatch(r"Confidence: [01]\.\d\d", answer.splitlines()[-1])
        assert tasks[conversation.task].extract_answer(answer) is not None
        seen.add((conversation.task, conversation.thinking))
    assert len(seen) == 6


def test_microbatches_keep_each_under_the_token_budget():
    rows = [([1] * n, [-100] * (n - 1) + [1]) for n in (5, 30, 10, 31)]
    batches = builder.microbatches(rows, pad_id=0, max_tokens=64)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 10), (2, 31)]
    assert batches[1]["input_ids"][0].tolist() == [1] * 30 + [0]  # right-padded
    assert standin.padded_vocab_size(3005, 128) == 3072 and standin.padded_vocab_size(3072, 128) == 3072


def test_the_config_module_stays_torch_free():
    probe = ("import sys, caopd.config.standin; "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- samples have the structure ---------------------------------------------------------------------------------------

def _sample_rates(loaded, apis, thinking: str) -> dict[str, float]:
    rng = random.Random(11)
    prompts = []
    for i in range(3):
        api = apis[i * 4]
        prompts.append(("tooluse", api.instructions[-1].prompt))
        prompts.append(("mcq", builder.science_messages(builder.science_question(rng), ask_confidence=True)))
        prompts.append(("arithmetic", make_problem(rng, "add_2x1")[0]))
    texts = [render_prompt(loaded.tokenizer, prompt, thinking) for _, prompt in prompts]
    outs = TransformersEngine(loaded.model, loaded.tokenizer).generate(
        texts, SamplingConfig(n=4, temperature=1.0, max_new_tokens=160, seed=0))
    tasks = {"tooluse": ToolUseTask(), "mcq": MultipleChoiceTask(), "arithmetic": ArithmeticTask()}
    completions = [(task, c) for (task, _), group in zip(prompts, outs) for c in group]
    answered = {task: 0 for task in tasks}
    for task, c in completions:
        answered[task] += tasks[task].extract_answer(c.text.split("</think>")[-1]) is not None
    n = len(completions)
    return {
        "confidence": sum(parse_confidence(c.text.split("</think>")[-1]) is not None for _, c in completions) / n,
        "think_close": sum("</think>" in c.text for _, c in completions) / n,
        "finished": sum(c.finished for _, c in completions) / n,
        **{f"answered_{task}": count / (n / 3) for task, count in answered.items()},
    }


def test_samples_with_thinking_have_the_structure(loaded, apis):
    rates = _sample_rates(loaded, apis, "template")  # measured: .97 / .97 / 1.0; answered .83 / 1.0 / 1.0
    assert rates["think_close"] >= 0.75 and rates["confidence"] >= 0.75 and rates["finished"] >= 0.85, rates
    assert min(rates[f"answered_{task}"] for task in ("tooluse", "mcq", "arithmetic")) >= 0.5, rates


def test_samples_without_thinking_have_the_structure(loaded, apis):
    rates = _sample_rates(loaded, apis, "off")  # measured: 1.0 / 1.0, </think> 0; answered .83 / .92 / 1.0
    assert rates["confidence"] >= 0.8 and rates["finished"] >= 0.85 and rates["think_close"] <= 0.2, rates
    assert min(rates[f"answered_{task}"] for task in ("tooluse", "mcq", "arithmetic")) >= 0.5, rates


# --- the build --------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # ~3 s
def test_building_twice_gives_byte_identical_folders(tmp_path):
    """A short build (the same code path as the default, a few seconds) twice: every file byte-identical."""
    cfg = StandinConfig(steps=6, warmup_steps=2, batch_size=4, bpe_sample=500)
    summaries = [builder.build_standin(cfg, tmp_path / name, progress=False) for name in ("a", "b")]
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"] and summaries[0]["steps"] == 6
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    loaded = load_model(str(tmp_path / "a"))
    assert loaded.template == "paper" and len(loaded.tokenizer) == summaries[0]["tokenizer_size"]
    assert AutoTokenizer.from_pretrained(tmp_path / "a").chat_template == standin.CHAT_TEMPLATE


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_default_build_reproduces_the_packaged_folder(tmp_path):
    """The full default build (~3.5 minutes on 2 cores): its tokenizer, configs and metadata equal the packaged files
    byte for byte and its loss the recorded one. The weights are byte-identical when rebuilt on the machine that built
    them (checked then); another CPU type may round float sums differently, so here they must only load and agree in
    loss."""
    summary = builder.build_standin(StandinConfig(), tmp_path / "standin", progress=False)
    meta = json.loads((PACKAGED / "caopd.json").read_text())
    assert summary["parameters"] == meta["parameters"] and summary["steps"] == StandinConfig().steps
    assert abs(summary["final_loss"] - meta["final_loss"]) < 0.02
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                 "generation_config.json"):
        assert (tmp_path / "standin" / name).read_bytes() == (PACKAGED / name).read_bytes(), name
    assert load_model(str(tmp_path / "standin")).template == "paper"
