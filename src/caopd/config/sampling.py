"""How completions are sampled (torch-free: stage configs and the pipeline import it)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SamplingConfig(BaseModel, frozen=True):
    """How completions are sampled. ``temperature=0`` decodes greedily."""

    n: int = Field(1, ge=1, description="completions per prompt (K)")
    temperature: float = Field(1.0, ge=0.0, description="softmax temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(32, ge=1, description="cut a completion after this many new tokens")
    seed: int = Field(0, description="sampling seed: same seed, prompts and batch → same completions")

