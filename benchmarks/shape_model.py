"""A random-weight "shape model": the packaged stand-in's Qwen3 layout at a size whose costs fall where a real Qwen3
model's do, with a 32k-word tokenizer, for benchmarking the training step at the paper's lengths.

Why this size. What makes a distillation step at the paper's shapes (prompts of ~1,000 tokens, completions of up to
1,000) expensive is (1) the decoder's forwards over the prompt and the completions, which computing a prompt once per
group of K saves, and (2) the LM head over the vocabulary at every completion token — a [tokens × vocabulary] matmul
and element-wise work per token, which the loss's chunking bounds in memory but cannot skip. The packaged models get
the proportion wrong: the tiny one has a 54-symbol vocabulary (no head cost at all), the stand-in a 3k one and a
0.6M-parameter decoder (its head is the step). In a real Qwen3 model the decoder outweighs the head: Qwen3-0.6B has
~0.44B parameters in its layers against 0.156B in its (tied) 151,936 × 1024 embedding, ~2.8×.

So the shape model keeps a real vocabulary's order of size, 32,768 tokens, and a decoder of at least twice the head.
With the vocabulary fixed, that ratio fixes the decoder's FLOPs per token at ~4 × vocabulary × hidden size, so the
hidden size is what makes a step cheap or dear: hidden 128 (a tied 32,768 × 128 head, 4.19M parameters), and 8 layers
of the stand-in's attention (4 query heads × 32, 2 key/value heads: GQA as in Qwen3, q/k RMSNorm, its rotary
settings) with a gated MLP of 2,688 — 8.65M parameters in the layers, 2.06× the head. The MLP is 21× the hidden size
(a real model's is 3–4×): few, wide layers, because decoding pays a fixed overhead per layer and token (~40 small ops
and a cache concatenation) that more, narrower layers would multiply. Attention keeps a real model's share: at a
1,125-token context 4 × 8 × 128 × 1,125 = 4.6M FLOPs per token, 0.27 of the decoder's 17.3M (Qwen3-0.6B: 0.29). One
step at the tool shape (1 prompt of 1,000 tokens × K = 8 completions of 250) takes ~9 s for ours and 23–28 s for
TRL on 2 cores in fp32; ``SIZES["wide"]`` (hidden 256, an MLP of 1,024 — 4× as in real models — and 18 layers:
2.1×) took ~42 s for TRL.

The tokenizer is a word-level vocabulary ``<pad>``, ``<eos>``, ``<unk>``, ``w0`` … ``w32764`` split on whitespace,
with no chat template and no special tokens added, so that both trainers see exactly the same ids for the same
plain-text prompt (``render_prompt`` passes plain text through; TRL tokenizes ``tokenizer(text=...)``) and a prompt
of ``n`` random words is ``n`` tokens. With random weights every token is about equally likely (logits of std
~0.2), so the end-of-sequence token is drawn with probability ~1/32768 per token: a completion all but always runs
its full length (in a step of 8 × 1,000 tokens one stops early about one step in five).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VOCAB_SIZE = 32768
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
# The stand-in's settings the shape model keeps (its layout); sizes come from ShapeSize.
STANDIN_KEYS = ("attention_bias", "attention_dropout", "hidden_act", "initializer_range", "max_position_embeddings",
                "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "use_sliding_window", "sliding_window")


@dataclass(frozen=True)
class ShapeSize:
    """The sizes of a shape model (the rest of its config is the stand-in's)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = VOCAB_SIZE


SIZES = {
    # the benchmark's: decoder 8.65M parameters, 2.06× the 4.19M of the tied 32768 × 128 head (module docstring)
    "paper": ShapeSize(hidden_size=128, intermediate_size=2688, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32),
    # the same ratio at Qwen3-like widths (an MLP 4× the hidden size): 2–3× slower steps (module docstring)
    "wide": ShapeSize(hidden_size=256, intermediate_size=1024, num_hidden_layers=18, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64),
    # --quick and the tests: the same layout and vocabulary, 2 small layers
    "quick": ShapeSize(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32),
}


def standin_config() -> dict[str, Any]:
    from caopd.models.packaged import PACKAGED_MODELS

    return json.loads((PACKAGED_MODELS["standin"] / "config.json").read_text())


def vocabulary(size: int) -> list[str]:
    """The tokens in id order: the three specials, then ``w0`` … up to ``size`` tokens in all."""
    if size <= len(SPECIALS):
        raise ValueError(f"a vocabulary of {size} has no room for words beside {len(SPECIALS)} special tokens")
    return [*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))]


def build_tokenizer(size: int = VOCAB_SIZE) -> Any:
    """A whitespace-split word-level tokenizer over ``vocabulary(size)``; adds no special tokens to a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={token: i for i, token in enumerate(vocabulary(size))}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", model_max_length=1 << 20)


def build_config(size: ShapeSize, tokenizer: Any) -> Any:
    from transformers import Qwen3Config

    layout = {key: value for key, value in standin_config().items() if key in STANDIN_KEYS}
    return Qwen3Config(**layout, **asdict(size), layer_types=["full_attention"] * size.num_hidden_layers,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                       use_cache=True)


def build_shape_model(folder: Path, size: str = "paper", seed: int = 0) -> Path:
    """Write a random-weight shape model of ``SIZES[size]`` and its tokenizer as a checkpoint folder that
    ``caopd.models.loading.load_model`` (and TRL, through ``from_pretrained``) loads; the same seed, the same
    weights. Returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from caopd.models.loading import METADATA_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(SIZES[size].vocab_size)
    config = build_config(SIZES[size], tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # the paper's teacher template (an instruct model's): the teacher's prompt is the student's and ~25 tokens more
    (folder / METADATA_FILE).write_text(json.dumps({"template": "paper", "built_by": "benchmarks.shape_model",
                                                    "size": size, "seed": seed}))
    return folder


def shape_prompts(n: int, words: int, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> list[str]:
    """``n`` prompts of ``words`` random words each (one token each), seeded."""
    rng = random.Random(seed)
    n_words = vocab_size - len(SPECIALS)
    return [" ".join(f"w{rng.randrange(n_words)}" for _ in range(words)) for _ in range(n)]


def decoder_and_head_parameters(model: Any) -> tuple[int, int]:
    """(parameters in the decoder layers, parameters of the LM head) of a loaded model."""
    layers = sum(p.numel() for p in model.model.layers.parameters())
    return layers, model.get_output_embeddings().weight.numel()
