"""Batched sampling with transformers models: KV cache, each distinct prefix computed once (a prompt's prefill and
the tokens its K samples drew alike), finished samples dropped from the batch, prompts bucketed by length."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from caopd.config.sampling import SamplingConfig, check_draws, draws_by_inverse_cdf, is_greedy
from caopd.models.batching import DecodingCache, prefill
from caopd.models.compat import cache_kwargs, full_attention_cache, output_cache
from caopd.models.loading import encode_text
from caopd.rollout.base import Completion, Prompt, RolloutEngine


def draw_tokens(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs [rows, V]`` (non-negative, each row summing to > 0), drawn with probability
    proportional to its entry: ``inverse_cdf`` of one float64 uniform per row at vocabularies that
    ``draws_by_inverse_cdf`` (``caopd.config.sampling``: 8,192 entries and more), else ``torch.multinomial``."""
    if not draws_by_inverse_cdf(probs.shape[-1]):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    uniform = torch.rand(probs.shape[0], dtype=torch.float64, generator=generator, device=probs.device)
    return inverse_cdf(probs, uniform)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative sum (float64) exceeds ``uniform[row]`` (in [0, 1)) times the row's
    total. An entry of zero is never chosen where the sum runs in order (the CPU: its cumulative sum equals its
    predecessor's; a GPU's parallel scan may round it a few ulps apart, a chance of ~1e-15). Rows that are not
    finite or sum to zero are refused, as ``torch.multinomial`` refuses them."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("cannot draw a token: a row of next-token probabilities is not finite or sums to 0 "
                         "(NaN or infinite logits: a diverged model, or a precision too low for it)")
    # a guard: u < 1 keeps u × total below the total, but a subnormal total could round up to it
    target = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax at a greedy temperature (``caopd.config.sampling.is_greedy``), else a draw from
    the (nucleus-truncated) softmax."""
    if is_greedy(temperature):
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    return draw_tokens(probs, generator)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with every entry outside the smallest set of most likely ones reaching mass ``top_p`` set to 0 (the
    sort's temporaries freed before the draw)."""
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))


def stop_token_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """The ids a sample stops on: the tokenizer's EOS and every EOS id of the model's generation config (Qwen3
    instruct: ``<|im_end|>`` and ``<|endoftext|>``) — the ids vLLM stops on too (it adds the generation config's
    EOS ids to every request's stop ids)."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return {i for i in [tokenizer.eos_token_id, *configured] if i is not None}


def chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    """The sampling RNG of one length bucket: a function of the seed and the bucket alone, so a bucket's completions
    do not depend on the buckets decoded before it (or on their order)."""
    state = int(np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)


class TransformersEngine(RolloutEngine):
    def __init__(self, model: Any, tokenizer: Any, max_batch_prompts: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_prompts = max_batch_prompts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        check_draws(sampling.temperature, sampling.n, "sampling.temperature")  # as the vLLM engine checks
        encoded = [encode_text(self.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # length buckets: less padding
        chunks = [order[lo: lo + self.max_batch_prompts] for lo in range(0, len(order), self.max_batch_prompts)]
        results: list[list[Completion]] = [[] for _ in prompts]
        start, new_tokens = time.perf_counter(), 0
        with tqdm(total=len(prompts) * sampling.n, desc="rollouts", unit="completion", disable=not progress) as bar:
            for index, chunk in enumerate(chunks):
                completions = self._generate_chunk([encoded[i] for i in chunk], sampling,
                                                   chunk_generator(sampling.seed, index, self.device))
                for j, i in enumerate(chunk):
                    results[i] = completions[j * sampling.n: (j + 1) * sampling.n]
                new_tokens += sum(len(c.token_ids) for c in completions)
                bar.update(len(completions))
                bar.set_postfix(new_tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
        return results

    @torch.inference_mode()  # lighter than no_grad: no version counters on the many small decode tensors
    def _generate_chunk(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                        generator: torch.Generator) -> list[Completion]:
        """Decode the K samples of each prompt together, computing each distinct prefix once.

        The batch holds *nodes* (distinct prompt + tokens-so-far), not samples: a prompt's K samples start on its
        prefill, and samples that draw the same next token stay on one node, whose forward they share until their
        draws differ. Each sample still draws from its own node's distribution with its own draw (exactly as if it
        had a row of its own); short answers, whose K samples largely coincide, need a fraction of the forwards.
        """
        model, device, k = self.model, self.device, sampling.n
        stops = stop_token_ids(self.tokenizer, getattr(model, "generation_config", None))
        stop_ids = torch.tensor(sorted(stops), device=device)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        decoding = DecodingCache(model.config, sampling.max_new_tokens) if full_attention_cache(model.config) else None
        cache, logits, mask, next_pos = prefill(model, prompt_ids, pad, cache=decoding)
        n_rows = len(prompt_ids) * k
        rows = torch.arange(n_rows, device=device)  # the output row of each live sample
        node_of_row = rows // k  # the batch row (node) each live sample reads its next-token logits from
        tokens: list[list[int]] = [[] for _ in range(n_rows)]
        finished = [False] * n_rows
        for step in range(sampling.max_new_tokens):
            nxt = sample_next(logits[node_of_row], sampling.temperature, sampling.top_p, generator)
            for r, t in zip(rows.tolist(), nxt.tolist()):
                tokens[r].append(t)
                finished[r] = t in stops
            alive = ~torch.isin(nxt, stop_ids)
            if not bool(alive.any()) or step == sampling.max_new_tokens - 1:
                break
            rows, nxt, parent = rows[alive], nxt[alive], node_of_row[alive]
            # The next nodes: one per distinct (node, drawn token); finished samples leave their nodes behind.
            vocab = logits.shape[-1]
            pairs, node_of_row = torch.unique(parent * vocab + nxt, return_inverse=True)  # sorted: deterministic
            parents, node_tokens = pairs // vocab, pairs % vocab
            if len(parents) != len(mask) or not bool((parents == torch.arange(len(parents), device=device)).all()):
                cache.batch_select_indices(parents)  # a node that split is copied, one left behind dropped
                mask, next_pos = mask[parents], next_pos[parents]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = model(input_ids=node_tokens[:, None], attention_mask=mask, position_ids=next_pos,
                        **cache_kwargs(cache), use_cache=True)
            cache, logits, next_pos = output_cache(out), out.logits[:, -1], next_pos + 1
        decode = self.tokenizer.decode
        return [Completion(decode(ids, skip_special_tokens=True), ids, done) for ids, done in zip(tokens, finished)]
