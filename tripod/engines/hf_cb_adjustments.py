"""Per-request logit adjustments inside the continuous batch: penalties, logit_bias, a grammar mask and logprobs.

A request that asks for one of them registers a ``RequestAdjustments`` with the batch's ``RequestSampling`` under its
request id; each step, the rows of the registered requests (only those) are adjusted before the sampling chain, in
``hf``'s order: raw logprobs kept, penalties, logit_bias, grammar mask. A batch where no request asks runs none of it.

The manager takes each token as the argmax of what the logits processor returns (``do_sample=False``), so right after
the sampling chain the same argmax of an adjusted row is that request's token. It is read there, on the batching
thread, rather than from the manager's ``generated_tokens``, which lag a step under async batching: it advances the
grammar, counts for the penalties and picks the logprobs, exactly, whatever the batching mode.
"""

from __future__ import annotations

from collections import deque

import torch

from tripod.engines.grammar import GrammarMatcher, apply_bitmask
from tripod.engines.logprobs import Pick, pick_logprobs
from tripod.errors import EngineFailure
from tripod.protocol import SamplingParams


class RequestAdjustments:
    """What one request changes in its row of the scores, and what it keeps of each step (its logprob picks)."""

    def __init__(self, params: SamplingParams, grammar: GrammarMatcher | None, device: torch.device | str) -> None:
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.counts: torch.Tensor | None = None  # how often each token was generated, made on the first step
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = torch.tensor([token for token, _ in params.logit_bias], dtype=torch.long, device=device)
            values = torch.tensor([value for _, value in params.logit_bias], dtype=torch.float32, device=device)
            self.bias = ids, values
        self.grammar = grammar
        self.top = params.top_logprobs if params.logprobs else None  # None: no logprobs
        self.picks: deque[Pick] = deque()  # appended on the batching thread, taken by the reader

    @classmethod
    def of(
        cls, params: SamplingParams, grammar: GrammarMatcher | None, device: torch.device | str
    ) -> RequestAdjustments | None:
        """The request's adjustments, or None when it asks for none (its rows then cost nothing)."""
        wanted = params.presence_penalty or params.frequency_penalty or params.logit_bias or params.logprobs
        return cls(params, grammar, device) if wanted or grammar is not None else None

    @property
    def penalised(self) -> bool:
        return bool(self.presence or self.frequency)

    def take_picks(self, tokens: list[int]) -> list[Pick]:
        """The logprob picks of ``tokens``, the request's next generated tokens, in order."""
        picks = []
        for token in tokens:
            pick = self.picks.popleft() if self.picks else None
            if pick is None or pick[0] != token:
                raise EngineFailure(
                    f"The batch's logprobs lost step with its tokens (token {token}, pick {pick}).",
                    code="engine_error",
                )
            picks.append(pick)
        return picks


class BatchAdjustments:
    """The adjusted rows of one step: found in ``prepare_tensor_args``, ``apply``-ed, then ``observe``-d in the
    logits processor's call (both on the batching thread)."""

    def __init__(self, rows: list[int], requests: list[RequestAdjustments]) -> None:
        self.rows = rows
        self.requests = requests
        self._index: torch.Tensor | None = None
        self._raw: torch.Tensor | None = None
        self._with_logprobs = [i for i, request in enumerate(requests) if request.top is not None]

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` with the adjusted rows penalised, biased and masked (a new tensor when any row changes)."""
        device = scores.device
        self._index = index = torch.tensor(self.rows, dtype=torch.long, device=device)
        rows = scores.index_select(0, index).float()
        if self._with_logprobs:
            self._raw = torch.log_softmax(rows[self._with_logprobs], dim=-1)
        penalised = [i for i, request in enumerate(self.requests) if request.penalised]
        if penalised:
            for i in penalised:
                if self.requests[i].counts is None:
                    self.requests[i].counts = torch.zeros(scores.size(-1), dtype=torch.float32, device=device)
            counts = torch.stack([self.requests[i].counts for i in penalised])
            frequency = torch.tensor([self.requests[i].frequency for i in penalised], device=device).unsqueeze(-1)
            presence = torch.tensor([self.requests[i].presence for i in penalised], device=device).unsqueeze(-1)
            rows[penalised] -= counts * frequency + (counts > 0).float() * presence
        for i, request in enumerate(self.requests):
            if request.bias is not None:
                rows[i].index_add_(0, *request.bias)
        constrained = [i for i, request in enumerate(self.requests) if request.grammar is not None]
        if constrained:
            bitmask = self.requests[constrained[0]].grammar.grammars.bitmask(len(constrained))
            for row, i in enumerate(constrained):
                self.requests[i].grammar.mask(bitmask, row)
            rows[constrained] = apply_bitmask(rows[constrained], bitmask)
        return scores.index_copy(0, index, rows.to(scores.dtype))

    def observe(self, scores: torch.Tensor) -> None:
        """Read each adjusted row's token from the final scores (the manager's argmax) and keep what it changes."""
        chosen = scores.index_select(0, self._index).argmax(dim=-1)
        for i, request in enumerate(self.requests):
            if request.counts is not None:
                request.counts[chosen[i]] += 1
        if self._with_logprobs:
            picks = pick_logprobs(
                self._raw, chosen[self._with_logprobs], [self.requests[i].top for i in self._with_logprobs]
            )
            for i, pick in zip(self._with_logprobs, picks, strict=True):
                self.requests[i].picks.append(pick)
        if any(request.grammar is not None for request in self.requests):
            tokens = chosen.tolist()
            for request, token in zip(self.requests, tokens, strict=True):
                if request.grammar is not None:
                    request.grammar.consume(token)
