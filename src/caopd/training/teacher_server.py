"""A teacher behind a vLLM server: the teacher model runs on its own GPUs (``vllm serve TEACHER --max-logprobs K``)
and scores the student's completions through the OpenAI-compatible completions endpoint, returning its top-k
log-probabilities at every completion token (``prompt_logprobs``, nothing generated)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from caopd.errors import CaopdServiceError


class TeacherServer:
    def __init__(self, url: str, top_k: int, timeout_s: float = 600.0) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.url, self.top_k, self.timeout_s = url.rstrip("/"), top_k, timeout_s
        self.session = requests.Session()
        # A busy or restarting server answers 5xx or drops a connection now and then; a step should not die of it.
        retry = Retry(total=5, connect=5, read=5, status=3, status_forcelist=[500, 502, 503], backoff_factor=2,
                      allowed_methods=["GET", "POST"])
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.model = self._call("GET", "/v1/models")["data"][0]["id"]

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import requests

        try:
            response = self.session.request(method, self.url + path, json=payload, timeout=self.timeout_s)
        except requests.RequestException as err:
            raise CaopdServiceError(f"teacher server {self.url}: {type(err).__name__}; is `vllm serve` running "
                                    "there and reachable from this pod?") from None
        if response.status_code != 200:
            raise CaopdServiceError(f"teacher server {self.url}{path}: HTTP {response.status_code}: "
                                    f"{response.text[:300]}")
        return response.json()

    def top_logprobs(self, prompt_ids: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token ids, log-probabilities)``, each ``[total completion tokens, k]``, group after group and
        completion after completion (the order of ``completion_logits``), the teacher's most likely first."""
        sequences, starts = [], []
        for prompt, group in zip(prompt_ids, completions):
            for completion in group:
                sequences.append(list(prompt) + list(completion))
                starts.append(len(prompt))
        payload = {"model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": 1.0,
                   "prompt_logprobs": self.top_k}
        choices = sorted(self._call("POST", "/v1/completions", payload)["choices"], key=lambda c: c["index"])
        ids, logprobs = [], []
        for choice, sequence, start in zip(choices, sequences, starts):
            for position in range(start, len(sequence)):
                entries = sorted((choice["prompt_logprobs"][position] or {}).items(), key=lambda e: e[1]["rank"])
                entries = entries[: self.top_k]
                if len(entries) < self.top_k:
                    raise CaopdServiceError(f"teacher server {self.url} returned {len(entries)} log-probabilities "
                                            f"for a token, not top_k={self.top_k}: start it with --max-logprobs "
                                            f"{self.top_k} or more")
                ids.append([int(token) for token, _ in entries])
                logprobs.append([-math.inf if math.isnan(e["logprob"]) else e["logprob"] for _, e in entries])
        return torch.tensor(ids, dtype=torch.long), torch.tensor(logprobs, dtype=torch.float32)
