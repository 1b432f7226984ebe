"""How completions are decoded (torch-free: stage configs and the pipeline import it)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DecodingConfig(BaseModel, frozen=True):
    """One stage's decoding: temperature, nucleus mass and length. ``temperature=0`` decodes greedily."""

    temperature: float = Field(1.0, ge=0.0, description="softmax temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(32, ge=1, description="cut a completion after this many new tokens")


class SamplingConfig(DecodingConfig, frozen=True):
    """How completions are sampled: the decoding, how many per prompt and the seed."""

    n: int = Field(1, ge=1, description="completions per prompt (K)")
    seed: int = Field(0, description="sampling seed: same seed, prompts and batch → same completions")
