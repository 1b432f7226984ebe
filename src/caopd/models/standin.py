"""The stand-in instruct model: a tiny Qwen3 with Qwen3's tokenizer conventions and chat template.

The packaged tiny model (``models/tiny.py``) has no chat template, so the path a real instruct model takes is never
exercised by it. This model takes that path on 2 CPU cores: a byte-level BPE (transformers' own ``Qwen2Tokenizer``
pipeline: NFC, Qwen's split regex, byte-level), Qwen3's added tokens and a simplified copy of Qwen3's chat template.

What Qwen3 does (its published ``tokenizer_config.json``, ``config.json`` and chat template, e.g. Qwen/Qwen3-4B and
Qwen/Qwen3-8B):
- ``tokenizer_config.json``: ``<|endoftext|>`` (151643), ``<|im_start|>`` (151644) and ``<|im_end|>`` (151645) are
  ``"special": true``; ``<think>`` (151667) and ``</think>`` (151668) are added tokens with ``"special": false``, so
  ``decode(..., skip_special_tokens=True)`` keeps them; ``eos_token`` is ``<|im_end|>``, ``pad_token``
  ``<|endoftext|>``, ``bos_token`` null; the added tokens come after the BPE vocabulary; config.json has 151936
  embedding rows (the tokenizer's 151669 rounded up), ``bos_token_id`` 151643, ``eos_token_id`` 151645,
  ``tie_word_embeddings`` true (the small sizes).
- The hybrid-thinking chat template (Qwen3-8B's): turns are
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``
  and, only when ``enable_thinking`` is defined and false, ``<think>\\n\\n</think>\\n\\n``; an assistant turn after
  the last user query is written with its thinking block (``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, an
  empty block when it has none), earlier ones without it.

The copy below keeps those rules and drops tools and tool calls, which no caopd task sends.
"""

from __future__ import annotations

import math
from pathlib import Path

from tokenizers import AddedToken
from transformers import Qwen2Tokenizer, Qwen3Config

from caopd.config.standin import StandinConfig
from caopd.method.protocol import THINK_CLOSE, THINK_OPEN

CHECKPOINT_DIR = Path(__file__).parent / "standin_checkpoint"
TEMPLATE = "paper"  # teacher-context family: the paper's English instructions, as for any instruct model

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # dropped by decode(skip_special_tokens=True)
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)  # added but not special: decode keeps them, the parser needs </think>
# What enable_thinking=False appends to the generation prompt: an empty, closed thinking block.
EMPTY_THINKING = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"

# Qwen3's hybrid-thinking template, less tools: system first, user turns, assistant turns with their thinking split
# off (kept only after the last user query), and the enable_thinking switch on the generation prompt.
CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(looking=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if ns.looking and message.role == "user" %}
        {%- set ns.looking = false %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'
                + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]] | list[str],
                    model_max_length: int) -> Qwen2Tokenizer:
    """A Qwen3-style tokenizer over a trained byte-level BPE: transformers' ``Qwen2Tokenizer`` (the class Qwen3
    checkpoints name), the three special tokens and the two thinking tokens appended after the vocabulary, in
    Qwen3's order, the chat template set, prompts padded on the left."""
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges], unk_token=None, bos_token=None,
                               eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, model_max_length=model_max_length,
                               padding_side="left", clean_up_tokenization_spaces=False, errors="replace",
                               split_special_tokens=False)
    # Registered in Qwen3's id order (<|endoftext|>, <|im_start|>, <|im_end|>) before <|im_end|> becomes the EOS.
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.eos_token = IM_END
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def padded_vocab_size(tokenizer_size: int, multiple: int) -> int:
    """Embedding rows: the tokenizer's size rounded up to ``multiple`` (the rows past it are never a target)."""
    return math.ceil(tokenizer_size / multiple) * multiple


def build_config(cfg: StandinConfig, tokenizer: Qwen2Tokenizer) -> Qwen3Config:
    """Qwen3's architecture at a size 2 CPU cores train in minutes; the special ids as Qwen3's config.json has them
    (bos = <|endoftext|>, eos = <|im_end|>), plus the pad id."""
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    return Qwen3Config(
        vocab_size=padded_vocab_size(len(tokenizer), cfg.pad_vocab_to), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=endoftext, eos_token_id=im_end,
        pad_token_id=endoftext, use_cache=True,
    )
