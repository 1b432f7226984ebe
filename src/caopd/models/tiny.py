"""The tiny default model: a character-level tokenizer and a ~1M-parameter Qwen3 model.

No causal-LM weights can be downloaded here, so the project ships its own base model, pre-trained on
the arithmetic task in the student format (with an uninformative stated confidence) and in the
teacher's privileged formats (gold or correct reference in context, with and without the
empirical-confidence Note, so that the teacher learns to state the P it is given).
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Digits, lowercase letters, the punctuation of the response protocol and the compact templates, and "C"
# of "Confidence": 54 symbols with the three specials.
CHARACTERS = string.digits + string.ascii_lowercase + " \n.:+-*=%|[]{}" + "C"

CHECKPOINT_DIR = Path(__file__).parent / "tiny_checkpoint"
TEMPLATE = "compact"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *CHARACTERS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", model_max_length=256)


def build_config(vocab_size: int, pad_id: int, eos_id: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=True, rope_theta=10000.0, pad_token_id=pad_id, eos_token_id=eos_id,
        bos_token_id=None, use_cache=True,
    )
