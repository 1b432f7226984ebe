"""How completions are decoded (torch-free: stage configs and the pipeline import it)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

# Both engines decode greedily below this temperature: vLLM's threshold (vllm/sampling_params.py, _SAMPLING_EPS), so
# that a temperature means the same thing whichever engine samples.
GREEDY_BELOW = 1e-5


# torch.multinomial draws one exponential per vocabulary entry and row (serially on the CPU, ~30 ns each: 8 ms a
# decoding step at 8 rows × 32k entries, 36 ms at Qwen3's 152k, where the whole forward of a small model takes less).
# From this many entries on, a row's draw is one uniform number inverted through its cumulative distribution
# (0.25 / 1 ms there), on every device. Below it — the packaged models' 54 and 3,072 entries — torch.multinomial's
# draws stay, and with them every seeded rollout the committed results were measured with.
INVERSE_CDF_MIN_VOCAB = 8192


def draws_by_inverse_cdf(vocab_size: int) -> bool:
    """Whether the transformers engine draws a token through the inverse CDF (else ``torch.multinomial``)."""
    return vocab_size >= INVERSE_CDF_MIN_VOCAB


def draw_bytes_per_entry(vocab_size: int) -> int:
    """The transformers engine's draw's temporaries per vocabulary entry and sample, beside the logits: float32
    probabilities, then the inverse CDF's float64 copy and cumulative sums (torch.multinomial's float32 exponentials
    where it draws). With top_p < 1 the nucleus's sort peaks ~5 bytes higher (not counted: the presets sample the
    whole distribution)."""
    return 4 + (16 if draws_by_inverse_cdf(vocab_size) else 4)


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def check_draws(temperature: float, n: int, setting: str) -> None:
    """Several samples per prompt need a temperature: greedy decoding would give ``n`` copies of one answer (and vLLM
    refuses it: "n must be 1 when using greedy sampling"). ``setting`` names what to change."""
    if n > 1 and is_greedy(temperature):
        raise ValueError(f"{setting}: {n} samples per prompt at temperature {temperature} would be {n} copies of one "
                         f"greedy answer (vLLM refuses it); sample at a temperature of at least {GREEDY_BELOW}, or "
                         "ask for 1 sample")


class DecodingConfig(BaseModel, frozen=True):
    """One stage's decoding: temperature, nucleus mass and length. ``temperature=0`` decodes greedily."""

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="softmax temperature; 0 = greedy (vLLM accepts up "
                               "to 2)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_new_tokens: int = Field(32, ge=1, description="cut a completion after this many new tokens")


class SamplingConfig(DecodingConfig, frozen=True):
    """How completions are sampled: the decoding, how many per prompt and the seed."""

    n: int = Field(1, ge=1, description="completions per prompt (K)")
    seed: int = Field(0, description="sampling seed: same seed, prompts and batch → same completions")

    @model_validator(mode="after")
    def _samples_need_a_temperature(self) -> SamplingConfig:
        check_draws(self.temperature, self.n, "sampling.temperature")
        return self
