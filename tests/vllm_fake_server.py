"""A stand-in for `vllm serve MODEL` on 127.0.0.1 (vLLM does not install here): the two endpoints a teacher server
answers — /v1/models and /v1/completions with ``prompt_logprobs`` — computed by a real model through transformers,
in vLLM's JSON layout: per prompt position (None first) a dict token id → {logprob, rank, decoded_token} with the
top ``prompt_logprobs`` tokens plus the actual token when it ranks lower. ``max_logprobs`` caps k as vLLM's flag
of that name does."""

from __future__ import annotations

import json
import threading

import torch
from servers import InProcessHTTP, QuietHandler


class FakeVLLM(InProcessHTTP):
    def __init__(self, model, name: str = "teacher", max_logprobs: int = 20) -> None:
        self.model, self.name, self.max_logprobs = model, name, max_logprobs
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        super().__init__()

    @torch.no_grad()
    def prompt_logprobs(self, sequence: list[int], k: int) -> list[dict | None]:
        logits = self.model(input_ids=torch.tensor([sequence])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out: list[dict | None] = [None]
        for position in range(1, len(sequence)):
            row = logprobs[position - 1]
            ranks = row.argsort(descending=True)
            entries = {int(t): r + 1 for r, t in enumerate(ranks[:k].tolist())}
            actual = sequence[position]
            if actual not in entries:
                entries[actual] = int((row > row[actual]).sum()) + 1
            out.append({str(t): {"logprob": float(row[t]), "rank": rank, "decoded_token": f"<{t}>"}
                        for t, rank in entries.items()})
        return out

    def _handler(self):
        fake = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": fake.name, "object": "model"}]})
                self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if self.path != "/v1/completions" or body.get("model") != fake.name:
                    return self._send(404, {"error": f"no model {body.get('model')!r}"})
                k = body["prompt_logprobs"]
                if k > fake.max_logprobs:
                    return self._send(400, {"error": f"Requested prompt logprobs of {k}, which is greater than "
                                            f"max allowed: {fake.max_logprobs}"})
                prompts = body["prompt"]
                with fake._lock:
                    choices = [{"index": i, "text": "", "finish_reason": "length",
                                "prompt_logprobs": fake.prompt_logprobs(p, k)} for i, p in enumerate(prompts)]
                self._send(200, {"object": "text_completion", "model": fake.name, "choices": choices[::-1]})

        return Handler
