"""Settings of the deterministic build of the packaged stand-in model (``caopd build-standin``).

The stand-in is a tiny Qwen3 with Qwen3's tokenizer conventions and chat template; these settings fix its corpus,
its byte-level BPE, its size and its short pre-training. Torch-free: the CLI parser imports it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StandinConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- corpus ---
    seed: int = Field(0, description="seed of the corpus, the BPE sample, the initialisation and the data order")
    toolalpaca_path: str = Field(
        "data/toolalpaca/eval_real.json", description="the ToolAlpaca release file (a list of API records), "
        "converted as `caopd convert toolalpaca` converts it; the tooluse task builds the corpus's tool-use prompts "
        "from its rows. A relative path is read from the current folder, else from the repository root")
    task_weights: dict[str, float] = Field(
        default_factory=lambda: {"tooluse": 0.4, "mcq": 0.35, "arithmetic": 0.25},
        description="task -> share of training conversations (tooluse, mcq, arithmetic)")
    thinking_share: float = Field(0.6, ge=0.0, le=1.0, description="share of conversations rendered with thinking "
                                  "on (the answer opens with a <think> block); the rest use enable_thinking=False")
    teacher_share: float = Field(0.2, ge=0.0, le=1.0, description="share of conversations in the teacher's paper "
                                 "format (a demonstration in the prompt, half of them with the empirical-confidence "
                                 "Note), so that the teacher's context changes what the model says")
    gold_share: float = Field(0.5, ge=0.0, le=1.0, description="share of tool-use and science answers that pick "
                              "the gold call or letter; the rest pick another, so verification sees both outcomes")
    ask_confidence_share: float = Field(0.85, ge=0.0, le=1.0, description="share of prompts that carry the "
                                        "confidence instruction (the answer states a confidence either way)")
    # --- tokenizer ---
    bpe_vocab_size: int = Field(3000, ge=300, le=16000, description="byte-level BPE vocabulary before the five "
                                "added tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>)")
    bpe_sample: int = Field(3000, ge=10, description="conversations rendered for BPE training (besides every "
                            "tool-use prompt of the release)")
    # --- model (Qwen3ForCausalLM) ---
    hidden_size: int = Field(96, ge=8, description="hidden size")
    intermediate_size: int = Field(256, ge=8, description="MLP inner size")
    num_hidden_layers: int = Field(3, ge=1, description="decoder layers")
    num_attention_heads: int = Field(4, ge=1, description="query heads")
    num_key_value_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention, as Qwen3)")
    head_dim: int = Field(32, ge=4, description="per-head size; heads x head_dim need not equal hidden_size "
                          "(Qwen3-0.6B: 16 x 128 over hidden 1024)")
    max_position_embeddings: int = Field(4096, ge=256, description="context length (tool-use prompts are long)")
    pad_vocab_to: int = Field(128, ge=1, description="the embedding rows are the tokenizer's size rounded up to "
                              "this multiple, as Qwen3's (151936 rows for 151669 tokens)")
    # --- pre-training ---
    steps: int = Field(450, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="conversations per optimizer step")
    max_tokens_per_microbatch: int = Field(8192, ge=256, description="padded tokens per forward pass; a step's "
                                           "conversations, sorted by length, are split into micro-batches")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="peak AdamW learning rate (cosine decay to 10%)")
    warmup_steps: int = Field(40, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    threads: int = Field(2, ge=1, description="torch CPU threads during the build: fixed, because float sums may "
                         "depend on how work is split")

    @model_validator(mode="after")
    def _consistent(self) -> StandinConfig:
        unknown = sorted(set(self.task_weights) - {"tooluse", "mcq", "arithmetic"})
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; choose from tooluse, mcq, arithmetic")
        if not any(w > 0 for w in self.task_weights.values()) or any(w < 0 for w in self.task_weights.values()):
            raise ValueError("task_weights must be non-negative with at least one positive weight")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self
