"""The deterministic build of the packaged stand-in model (``caopd build-standin``): corpus, BPE, pre-training, save.

The corpus is chat conversations in the three task formats, their prompts built by the tasks themselves (so that the
stand-in is trained on the strings caopd really sends it) and rendered through the stand-in's own Qwen3-style chat
template exactly as caopd renders prompts (``method.templates.render_prompt``):
- tool use: the ToolAlpaca release converted by ``caopd.tasks.toolalpaca.convert_toolalpaca``, its prompts built by the
  ``tooluse`` task (the official template, the official confidence line before ``Begin!``), answered
  ``Thought: ...\\nAction: X\\nAction Input: {...}`` — the first gold call or another call of the same API;
- science: chemistry-style four-option questions this module writes itself (molar masses, atomic numbers, atom
  counts of SMILES strings, functional groups) under a system prompt in the official rows' format, the confidence
  line appended by the ``mcq`` task, answered with a short reasoning and ``<answer>X</answer>`` — the gold letter or
  another;
- arithmetic: caopd's own problems, answered with the number;
- a share in the teacher's paper format (a demonstration, half of them with the empirical-confidence Note).
Every answer ends with a ``Confidence: 0.xx`` line (values varied, carrying no information) and ``<|im_end|>``; with
thinking on it opens with ``<think>\\n...\\n</think>\\n\\n``, with it off the template has already closed an empty
block. The model need not be good at the tasks, only produce this structure, so that parsing, verification, target
edits and EOS handling all run on the path a real Qwen3 takes.

Determinism: one seeded ``random.Random`` draws the corpus, the BPE trainer is deterministic, the weights are
initialised and trained under a forked, seeded torch RNG with deterministic algorithms and a fixed thread count;
building twice on one machine gives byte-identical files. The metadata records no time.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

from caopd.config.standin import StandinConfig
from caopd.errors import CaopdInputError
from caopd.io import PathLike
from caopd.method.protocol import format_confidence
from caopd.method.templates import PrivilegedContext, render_prompt, teacher_prompt
from caopd.models import standin
from caopd.models.batching import right_padded
from caopd.models.loading import METADATA_FILE
from caopd.tasks import get_task
from caopd.tasks.arithmetic import KINDS, make_problem
from caopd.tasks.toolalpaca import convert_toolalpaca
from caopd.tasks.tooluse import call_lines, parse_gold_calls

REPO_ROOT = Path(__file__).resolve().parents[3]

# The science rows' format (a system prompt that asks for reasoning and answer tags), in this project's own words.
SCIENCE_SYSTEM_PROMPT = (
    "\nChoose the one correct option of the multiple-choice question below. Write your response in this format:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\nInside the answer tags write only the letter of the "
    "option you choose (A, B, C, or D), nothing more, not the option's text. If you choose \"C\", for instance, "
    "write:\n<answer>\nC\n</answer>\n"
)
LETTERS = "ABCD"


# ----------------------------------------------------------------------------------------------------------------
# Tool use: the ToolAlpaca release, converted and prompted by the tasks
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolInstruction:
    """One converted row: its prompts as the ``tooluse`` task builds them, and the call a gold answer makes."""

    prompt: str  # with the official confidence line (the task's default)
    prompt_without_confidence: str  # the task with ask_confidence=False: the converted row's prompt
    gold: tuple[str, dict] | None  # the first gold call (what the task scores); None when its input is not JSON


@dataclass(frozen=True)
class ToolApi:
    """One API of the release: its instructions, and what distractor calls draw on."""

    name: str
    instructions: tuple[ToolInstruction, ...]
    parameters: dict[str, tuple[str, ...]]  # function -> its parameter names
    known_arguments: dict[str, Any]  # parameter -> a value some gold call of the API gives it


def resolve_toolalpaca_path(path: str) -> Path:
    """A relative path is read from the current folder, else from the repository root (a source checkout)."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    return REPO_ROOT / given


# A function of an NLDocumentation: "name: what it does" on one line, "Parameters: {json}" on the next.
_FUNCTION_RE = re.compile(r"^([^\s:]+):[^\n]*\nParameters: ([^\n]*)$", re.MULTILINE)


def function_parameters(nl_documentation: str) -> dict[str, tuple[str, ...]]:
    """Function -> its parameter names, read from an NLDocumentation (the release's Function_Description holds the
    same lines); a function whose ``Parameters:`` is not a JSON object has none."""
    functions = {}
    for match in _FUNCTION_RE.finditer(nl_documentation):
        try:
            parameters = json.loads(match.group(2))
        except json.JSONDecodeError:
            parameters = {}
        functions[match.group(1)] = tuple(parameters) if isinstance(parameters, dict) else ()
    return functions


def answer_call(calls: Sequence[tuple[str, Any]]) -> tuple[str, dict] | None:
    """The call a gold training answer makes: the first gold call, the one the task scores. None when its input is
    not a JSON object (four CurrencyBeacon calls of the release, ``"symbols": "symbols": [...]``): the prompt asks
    for JSON, so the stand-in never learns to write anything else, and such an instruction is answered with
    another call."""
    action, arguments = calls[0]
    return (action, arguments) if isinstance(arguments, dict) else None


def tool_apis(rows: Sequence[Mapping[str, Any]], source: str) -> list[ToolApi]:
    """The APIs of converted ToolAlpaca rows (``toolalpaca_rows``), in order, each row's prompts built by the
    ``tooluse`` task with and without the confidence line; errors name ``source``, the row and the field."""
    asking = get_task("tooluse").examples_from_rows(rows, source)
    plain = get_task("tooluse", ask_confidence=False).examples_from_rows(rows, source)
    grouped: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        grouped.setdefault(str(row["name"]), []).append(index)
    apis = []
    for name, indices in grouped.items():
        gold = {i: parse_gold_calls(rows[i]["golden_answer"]) for i in indices}
        json_calls = [(action, arguments) for calls in gold.values() for action, arguments in calls
                      if isinstance(arguments, dict)]
        parameters = function_parameters(str(rows[indices[0]]["nl_documentation"]))
        for action, arguments in json_calls:  # a gold action the documentation lacks still counts as a function
            parameters.setdefault(action, tuple(arguments))
        instructions = tuple(ToolInstruction(asking[i].prompt, plain[i].prompt, answer_call(gold[i])) for i in indices)
        known = {key: value for _, arguments in json_calls for key, value in arguments.items()}
        apis.append(ToolApi(name, instructions, parameters, known))
    return apis


def load_tool_apis(path: PathLike) -> list[ToolApi]:
    """The APIs of a ToolAlpaca release file (a JSON list of API records), converted by ``convert_toolalpaca``."""
    if not Path(path).is_file():  # the release is not in the wheel: say where it comes from
        raise CaopdInputError("does not exist (the ToolAlpaca release file; see data/toolalpaca/NOTICE.md)",
                              file=str(path))
    return tool_apis(convert_toolalpaca(path), str(path))


# ----------------------------------------------------------------------------------------------------------------
# Science: chemistry-style multiple choice, written here
# ----------------------------------------------------------------------------------------------------------------

ATOMIC_MASS = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "F": 18.998, "Na": 22.990, "P": 30.974,
               "S": 32.06, "Cl": 35.45, "Br": 79.904}
ELEMENTS = ["hydrogen", "helium", "lithium", "beryllium", "boron", "carbon", "nitrogen", "oxygen", "fluorine",
            "neon", "sodium", "magnesium", "aluminium", "silicon", "phosphorus", "sulfur", "chlorine", "argon",
            "potassium", "calcium"]
SMILES_FRAGMENTS = ["C", "CC", "C(C)", "O", "N", "C(=O)", "c1ccccc1", "Cl", "F", "OC", "N(C)", "C#N", "S",
                    "C(=O)O", "c1ccncc1", "CC(C)", "NC(=O)", "Br", "C=C", "OCC"]
# (name, SMILES, functional group): the group is what the question asks for.
FUNCTIONAL_GROUPS = [
    ("ethanol", "CCO", "hydroxyl"), ("acetic acid", "CC(=O)O", "carboxylic acid"), ("acetone", "CC(C)=O", "ketone"),
    ("acetaldehyde", "CC=O", "aldehyde"), ("methylamine", "CN", "amine"), ("ethyl acetate", "CCOC(C)=O", "ester"),
    ("benzonitrile", "N#Cc1ccccc1", "nitrile"), ("diethyl ether", "CCOCC", "ether"),
    ("benzamide", "NC(=O)c1ccccc1", "amide"), ("chloroethane", "CCCl", "halide"),
]
GROUP_NAMES = sorted({group for _, _, group in FUNCTIONAL_GROUPS})


@dataclass(frozen=True)
class ScienceQuestion:
    question: str
    options: tuple[str, str, str, str]
    gold: str  # letter
    reasoning: str  # why the gold option is right


def _options(rng: random.Random, correct: str, distractors: list[str]) -> tuple[tuple[str, ...], str]:
    """Four options with the correct one at a random letter."""
    options = [correct, *distractors[:3]]
    rng.shuffle(options)
    return tuple(options), LETTERS[options.index(correct)]


def _distinct(rng: random.Random, correct: str, pool_draw, k: int = 3) -> list[str]:
    found: list[str] = []
    while len(found) < k:
        value = pool_draw()
        if value != correct and value not in found:
            found.append(value)
    return found


def _random_smiles(rng: random.Random) -> str:
    return "".join(rng.choice(SMILES_FRAGMENTS) for _ in range(rng.randint(3, 9)))


def _carbon_count(smiles: str) -> int:
    return len(re.findall(r"C(?!l)|c", smiles))


def science_question(rng: random.Random) -> ScienceQuestion:
    """One four-option chemistry question of a random kind, with its gold letter and a one-line reasoning."""
    kind = rng.randrange(4)
    if kind == 0:  # molar mass of a molecular formula
        counts = {"C": rng.randint(1, 12), "H": rng.randint(0, 20)}
        for element in rng.sample(["N", "O", "S", "Cl", "F", "Na", "P", "Br"], rng.randint(0, 3)):
            counts[element] = rng.randint(1, 4)
        formula = "".join(e + (str(n) if n > 1 else "") for e, n in counts.items() if n)
        mass = sum(ATOMIC_MASS[e] * n for e, n in counts.items())
        correct = f"{mass:.3f}"
        distractors = _distinct(rng, correct, lambda: f"{mass * rng.uniform(0.5, 1.6):.3f}")
        question = f"What is the molar mass (g/mol) of a compound with the molecular formula {formula}?"
        terms = " + ".join(f"{n} x {ATOMIC_MASS[e]}" for e, n in counts.items() if n)
        reasoning = f"Adding the atomic masses, {terms} = {mass:.2f} g/mol."
    elif kind == 1:  # element by atomic number
        z = rng.randint(1, len(ELEMENTS))
        correct = ELEMENTS[z - 1]
        distractors = _distinct(rng, correct, lambda: rng.choice(ELEMENTS))
        question = f"Which element has the atomic number {z}?"
        reasoning = f"The element with {z} protons in its nucleus is {correct}."
    elif kind == 2:  # carbon atoms of a SMILES string
        smiles = _random_smiles(rng)
        n = _carbon_count(smiles)
        correct = str(n)
        distractors = _distinct(rng, correct, lambda: str(max(0, n + rng.randint(-4, 4))))
        question = f'How many carbon atoms does the molecule with the SMILES representation "{smiles}" contain?'
        reasoning = f"Counting the aliphatic C and aromatic c atoms of {smiles} gives {n}."
    else:  # functional group of a named molecule
        name, smiles, group = rng.choice(FUNCTIONAL_GROUPS)
        correct = group
        distractors = _distinct(rng, correct, lambda: rng.choice(GROUP_NAMES))
        question = f"Which functional group is present in {name} (SMILES: {smiles})?"
        reasoning = f"The structure {smiles} of {name} contains the {group} group."
    options, gold = _options(rng, correct, distractors)
    return ScienceQuestion(question, options, gold, reasoning)  # type: ignore[arg-type]


def science_messages(q: ScienceQuestion, ask_confidence: bool) -> list[dict[str, str]]:
    """System + user messages in the official science rows' format, with the ``mcq`` task's confidence line appended
    as the task appends it (to the user message, after a blank line) when ``ask_confidence``."""
    user = q.question + "\n\n" + "\n".join(f"{letter}: {text}" for letter, text in zip(LETTERS, q.options))
    row = {"prompt": [{"role": "system", "content": SCIENCE_SYSTEM_PROMPT}, {"role": "user", "content": user}],
           "answer": q.gold}
    return get_task("mcq", ask_confidence=ask_confidence).example_from_row(row, 0).prompt


# ----------------------------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conversation:
    """A prompt (text or chat messages), the thinking switch it is rendered with, and the response after the
    generation prompt (without <|im_end|>)."""

    task: str
    prompt: Any
    thinking: bool
    response: str


def _stated_confidence(rng: random.Random) -> float:
    """A confidence that carries no information: often a round, high value, as instruct models state them."""
    if rng.random() < 0.5:
        return rng.choice([0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0])
    return rng.randint(20, 100) / 100


def _note_confidence(rng: random.Random) -> float:
    return rng.randint(0, 8) / 8 if rng.random() < 0.5 else rng.randint(0, 100) / 100


def _tool_arguments(rng: random.Random, api: ToolApi, action: str) -> dict:
    """Plausible arguments for a call that is not the gold one: a gold call's value for a known key, else a guess."""
    known = api.known_arguments
    chosen = [n for n in api.parameters.get(action, ()) if n in known or rng.random() < 0.5]
    return {n: known[n] if n in known else rng.choice(["example", "latest", 10, 2023, "en", "US"]) for n in chosen}


def _tooluse_answer(rng: random.Random, api: ToolApi, gold: tuple[str, dict] | None,
                    use_gold: bool) -> tuple[str, str]:
    """(answer, thinking): a Thought, then the call written as the task's demonstrations write it; another call of
    the API when the gold one is not wanted (or has no JSON input)."""
    action, arguments = gold or ("", {})
    others = sorted(set(api.parameters) - {action})
    if (not use_gold or gold is None) and others:
        action = rng.choice(others)
        arguments = _tool_arguments(rng, api, action)
    thought = rng.choice([
        f"Thought: The user asks about {api.name}. I should call {action}.",
        f"Thought: I need to use {action} to answer this question.",
        f"Thought: {action} gives what the user wants, so I will call it with the details from the question.",
    ])
    answer = "\n".join([thought, *call_lines([(action, arguments)])])
    thinking = rng.choice([f"The question is for the {api.name} API. {action} fits this request best.",
                           f"I should pick the right tool of {api.name}. {action} looks right.",
                           f"The user wants something {api.name} can do. I will call {action}."])
    return answer, thinking


def _science_answer(rng: random.Random, q: ScienceQuestion, use_gold: bool) -> tuple[str, str]:
    letter = q.gold if use_gold else rng.choice([c for c in LETTERS if c != q.gold])
    reasoning = q.reasoning if letter == q.gold else f"{q.reasoning} Option {letter} looks closest to me."
    if rng.random() < 0.5:
        answer = f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{letter}\n</answer>"
    else:
        answer = f"{reasoning}\n<answer>{letter}</answer>"
    return answer, f"Let me read the options. {q.reasoning} So the answer is option {letter}."


def _arithmetic_answer(rng: random.Random, question: str, answer: str) -> tuple[str, str]:
    op = "+" if "+" in question else "*"
    a, b = question.rstrip("=").split(op)
    word = "add" if op == "+" else "multiply"
    return answer, f"I need to {word} {a} and {b}. {a} {op} {b} = {answer}."


def sample_conversation(rng: random.Random, cfg: StandinConfig, apis: list[ToolApi]) -> Conversation:
    """One conversation of the mix: task, prompt, thinking switch, student or teacher format."""
    tasks, weights = zip(*sorted(cfg.task_weights.items()))
    task = rng.choices(tasks, weights=weights)[0]
    as_teacher = rng.random() < cfg.teacher_share
    use_gold = as_teacher or rng.random() < cfg.gold_share  # a demonstration is the gold answer
    ask_confidence = rng.random() < cfg.ask_confidence_share
    if task == "tooluse":
        api = rng.choice(apis)
        instruction = api.instructions[rng.randrange(len(api.instructions))]
        prompt: Any = instruction.prompt if ask_confidence else instruction.prompt_without_confidence
        answer, thinking = _tooluse_answer(rng, api, instruction.gold, use_gold)
    elif task == "mcq":
        q = science_question(rng)
        prompt = science_messages(q, ask_confidence)
        answer, thinking = _science_answer(rng, q, use_gold)
    else:
        question, gold = make_problem(rng, rng.choice(sorted(KINDS)))
        prompt = question
        answer, thinking = _arithmetic_answer(rng, question, gold)
    confidence = _stated_confidence(rng)
    if as_teacher:
        note = _note_confidence(rng) if rng.random() < 0.5 else None
        reference_confidence = note if note is not None else (1.0 if rng.random() < 0.7 else confidence)
        context = PrivilegedContext(rng.choice(["demo", "correct_solution"]),
                                    f"{answer}\n{format_confidence(reference_confidence)}", note_confidence=note)
        prompt = teacher_prompt(prompt, context, standin.TEMPLATE)
        confidence = reference_confidence
    think = rng.random() < cfg.thinking_share
    body = f"{answer}\n{format_confidence(confidence)}"
    response = f"{standin.THINK_OPEN}\n{thinking}\n{standin.THINK_CLOSE}\n\n{body}" if think else body
    return Conversation(task, prompt, think, response)


def render(tokenizer: Any, conversation: Conversation) -> tuple[str, str]:
    """(prompt text, response text): the prompt through the chat template as caopd renders it, the response as the
    model should continue it (ending with <|im_end|>)."""
    prompt = render_prompt(tokenizer, conversation.prompt, "on" if conversation.thinking else "off")
    return prompt, conversation.response + standin.IM_END


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------

def _plain_texts(conversation: Conversation) -> list[str]:
    """A conversation's text without the added tokens (the BPE never sees them: they are matched before it)."""
    prompt = conversation.prompt
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    response = conversation.response
    for token in standin.THINK_TOKENS:
        response = response.replace(token, "")
    return [*texts, response, "system", "user", "assistant"]


def train_tokenizer(cfg: StandinConfig, apis: list[ToolApi]) -> Qwen2Tokenizer:
    """A byte-level BPE on the task corpora (every tool-use prompt, a sample of conversations), wrapped with Qwen3's
    added tokens and chat template."""
    rng = random.Random(f"bpe-{cfg.seed}")
    texts = [instruction.prompt for api in apis for instruction in api.instructions]
    for _ in range(cfg.bpe_sample):
        texts.extend(_plain_texts(sample_conversation(rng, cfg, apis)))
    # The normalizer and pre-tokenizer of transformers' Qwen2Tokenizer (NFC, Qwen's split regex, byte level).
    qwen = Qwen2Tokenizer().backend_tokenizer
    core = Tokenizer(models.BPE())
    core.normalizer, core.pre_tokenizer = qwen.normalizer, qwen.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=cfg.bpe_vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    model = json.loads(core.to_str())["model"]
    return standin.build_tokenizer(model["vocab"], model["merges"], cfg.max_position_embeddings)


# ----------------------------------------------------------------------------------------------------------------
# Pre-training
# ----------------------------------------------------------------------------------------------------------------

def encode(tokenizer: Any, conversation: Conversation) -> tuple[list[int], list[int]]:
    """(input ids, labels): the loss is on the response and its <|im_end|> only."""
    prompt, response = render(tokenizer, conversation)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def microbatches(rows: list[tuple[list[int], list[int]]], pad_id: int,
                 max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of rows sorted by length, each at most ``max_tokens`` padded tokens (one row at least)."""
    rows = sorted(rows, key=lambda r: len(r[0]))
    groups: list[list[tuple[list[int], list[int]]]] = [[]]
    for row in rows:  # ascending: the row joining a group sets its width
        if groups[-1] and len(row[0]) * (len(groups[-1]) + 1) > max_tokens:
            groups.append([])
        groups[-1].append(row)
    return [right_padded(group, pad_id) for group in groups]


@contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """A seeded torch RNG, deterministic algorithms and a fixed thread count for the block; the caller's restored."""
    threads_before, deterministic_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic_before)
            torch.set_num_threads(threads_before)


def response_loss(model: Qwen3ForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy on the labelled (response) positions.

    Rows are right-padded, so causal attention alone keeps the pads out of every real position (no padding mask:
    the fast causal path), and the vocabulary projection runs only where there is a label, not on the long prompts.
    """
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    where = labels != -100
    logits = model.lm_head(hidden[where])
    return torch.nn.functional.cross_entropy(logits, labels[where], reduction="sum")


def _lr_at(cfg: StandinConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(model: Qwen3ForCausalLM, tokenizer: Any, cfg: StandinConfig, apis: list[ToolApi],
             progress: bool) -> dict[str, Any]:
    """Supervised steps on freshly drawn conversations; returns loss and token counts."""
    rng = random.Random(f"train-{cfg.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="build-standin", disable=not progress, unit="step")
    for step in bar:
        rows = [encode(tokenizer, sample_conversation(rng, cfg, apis)) for _ in range(cfg.batch_size)]
        targets = sum(sum(1 for t in labels if t != -100) for _, labels in rows)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for batch in microbatches(rows, tokenizer.pad_token_id, cfg.max_tokens_per_microbatch):
            loss = response_loss(model, batch) / targets  # every response token of the step weighs the same
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(step_loss)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    model.eval()
    tail = losses[-20:]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "train_tokens": tokens}


# ----------------------------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_standin(cfg: StandinConfig | None, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build the stand-in from scratch and write a loadable checkpoint folder to ``out_dir`` (replaced whole).

    ``build_standin(StandinConfig(), caopd.models.standin.CHECKPOINT_DIR)`` regenerates the packaged folder; ``None``
    is the default config.

    Returns a summary: sizes, vocabulary, steps, losses, tokens, seconds, files and their bytes.
    """
    cfg = cfg or StandinConfig()
    start = time.perf_counter()
    apis = load_tool_apis(resolve_toolalpaca_path(cfg.toolalpaca_path))
    tokenizer = train_tokenizer(cfg, apis)
    config = standin.build_config(cfg, tokenizer)
    with deterministic_torch(cfg.seed, cfg.threads):
        model = Qwen3ForCausalLM(config)
        trained = pretrain(model, tokenizer, cfg, apis, progress)
    parameters = sum(p.numel() for p in model.parameters())
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {
        "template": standin.TEMPLATE,
        "built_by": "caopd.training.standin.build_standin (caopd build-standin)",
        "config": cfg.model_dump(),
        "parameters": parameters,
        "tokenizer_size": len(tokenizer),
        "final_loss": round(trained["final_loss"], 4),
        "sha256": {name: sha256_file(tmp / name) for name in ("model.safetensors", "tokenizer.json")},
    }
    (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
    for path in tmp.iterdir():
        path.chmod(0o644)  # the weights come out owner-only; the folder ships in the wheel for everyone
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return {
        "out_dir": str(out_dir), "parameters": parameters, "tokenizer_size": len(tokenizer),
        "vocab_size": config.vocab_size, "steps": cfg.steps, **trained,
        "seconds": round(time.perf_counter() - start, 1),
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
    }
