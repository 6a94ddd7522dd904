"""Per-request sampling as logits processors, so concurrent requests never share random state.

Sampling is Gumbel-max: adding Gumbel noise from the request's own seeded generator to the
log-probabilities and taking the argmax draws from exactly the softmax distribution. The same seed
gives the same tokens whatever else runs at the same time, on any engine that can take a processor.
Before it, in this order: the raw logprobs are kept, penalties and logit_bias adjust the logits, and a grammar masks
them (``build_logits_processors``).
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

from tripod.engines.grammar import GrammarMatcher, apply_bitmask
from tripod.engines.logprobs import Pick, pick_logprobs
from tripod.protocol import SamplingParams


class LogprobRecorder(LogitsProcessor):
    """First in the chain: keeps this step's raw log-softmax until the streamer learns which token was chosen."""

    def __init__(self, top: int) -> None:
        self.top = top
        self._logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def take(self, token: int) -> Pick:
        """The pick for ``token``, chosen from the last step's scores."""
        chosen = torch.tensor([token], device=self._logprobs.device)
        return pick_logprobs(self._logprobs, chosen, [self.top])[0]


class LogitBiasProcessor(LogitsProcessor):
    """OpenAI's logit_bias: a value from -100 to 100 added to each listed token's logit."""

    def __init__(self, bias: tuple[tuple[int, float], ...], device: torch.device | str) -> None:
        self.ids = torch.tensor([token for token, _ in bias], dtype=torch.long, device=device)
        self.values = torch.tensor([value for _, value in bias], dtype=torch.float32, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.index_add(-1, self.ids, self.values.expand(scores.size(0), -1).to(scores.dtype))


class GrammarProcessor(LogitsProcessor):
    """Masks every token the request's grammar does not allow next; the last chosen token advances it first."""

    def __init__(self, matcher: GrammarMatcher, prompt_length: int) -> None:
        self.matcher = matcher
        self.prompt_length = prompt_length
        self.bitmask = matcher.grammars.bitmask(1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_length > self.matcher.generated:
            self.matcher.consume(int(input_ids[0, -1]))
        self.matcher.mask(self.bitmask, 0)
        return apply_bitmask(scores, self.bitmask)


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
    params: SamplingParams,
    prompt_length: int,
    device: torch.device | str,
    *,
    grammar: GrammarMatcher | None = None,
    logprobs: LogprobRecorder | None = None,
) -> LogitsProcessorList:
    """The processors that make greedy ``generate`` follow ``params``; empty means plain greedy."""
    processors = LogitsProcessorList()
    if logprobs is not None:
        processors.append(logprobs)
    if params.presence_penalty or params.frequency_penalty:
        processors.append(OpenAIPenaltyProcessor(prompt_length, params.presence_penalty, params.frequency_penalty))
    if params.logit_bias:
        processors.append(LogitBiasProcessor(params.logit_bias, device))
    if grammar is not None:
        processors.append(GrammarProcessor(grammar, prompt_length))
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
