"""Per-request sampling as logits processors, so concurrent requests never share random state.

Sampling is Gumbel-max: adding Gumbel noise from the request's own seeded generator to the
log-probabilities and taking the argmax draws from exactly the softmax distribution. The same seed
gives the same tokens whatever else runs at the same time, on any engine that can take a processor.
"""

from __future__ import annotations

import secrets

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tripod.protocol import SamplingParams


class OpenAIPenaltyProcessor(LogitsProcessor):
    """presence_penalty and frequency_penalty as OpenAI defines them, over the generated tokens only."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class GumbelSampler(LogitsProcessor):
    """Turns greedy decoding into sampling with request-owned randomness (see the module docstring)."""

    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        uniform = torch.rand(logprobs.shape, generator=self.generator, device=logprobs.device)
        uniform = uniform.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - 1e-7)
        return logprobs - torch.log(-torch.log(uniform))


def build_logits_processors(
    params: SamplingParams, prompt_length: int, device: torch.device | str
) -> LogitsProcessorList:
    """The processors that make greedy ``generate`` follow ``params``; empty means plain greedy."""
    processors = LogitsProcessorList()
    if params.presence_penalty or params.frequency_penalty:
        processors.append(OpenAIPenaltyProcessor(prompt_length, params.presence_penalty, params.frequency_penalty))
    if params.greedy:
        return processors
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(max(params.top_p, 1e-6)))
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    processors.append(GumbelSampler(seed, device))
    return processors
