"""Per-request sampling inside the continuous batch: temperature, top-k, top-p and seeded Gumbel-max noise.

The batch holds requests with different sampling arguments, so sampling runs as transformers' continuous-batching
logits processors, each step only those some request needs. The noise is keyed by the request's seed and step (a
counter-based hash), so a seed reproduces its output whatever else shares the batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
    ContinuousBatchingTemperatureLogitsWarper,
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.continuous_batching.utils import CudaGraphBuffer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tripod.engines.hf_cb_adjustments import BatchAdjustments, RequestAdjustments

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF


def noise_key(seed: int, step: int) -> int:
    """A non-zero 31-bit key for (seed, step); 0 means "no noise" (greedy)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return (x & 0x7FFFFFFF) or 1


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise of shape [len(keys), vocab], a pure function of each row's key (murmur3 finaliser)."""
    index = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    x = (keys.to(torch.int64).unsqueeze(-1) * 0x27D4EB2F + index * 0x165667B1) & _MASK32
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & _MASK32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & _MASK32
    x = x ^ (x >> 16)
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sampling_step(state: Any) -> int:
    """How many tokens the request generated before the one this step samples: its position past the prompt.

    Read from the position, which advances when the step is prepared, not from the generated tokens: under async
    batching (transformers' choice with flash attention) those lag a step behind, the last step's token being still on
    the device; and when transformers soft-resets a request they move into its prompt (``_true_initial_tokens`` keeps
    the prompt's own length).
    """
    prompt_length = getattr(state, "_true_initial_tokens", 0) or len(state.initial_tokens)
    return state.position_offset - prompt_length


class SeededGumbelSampler(ContinuousBatchingLogitsProcessor):
    """Per-request Gumbel-max noise: argmax(logprobs + Gumbel) draws from the (warped) distribution."""

    supported_kwargs: dict[str, type] = {"seed": int}
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        keys = []
        for request in requests_with_new_token:
            seed = request.state.logit_processor_kwargs.get("seed")
            keys.append(0 if seed is None else noise_key(seed, sampling_step(request.state)))
        return torch.tensor(keys, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        keys = tensor_arg[: scores.size(0)]
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        gumbel = -torch.log(-torch.log(uniform_noise(keys, scores.size(-1))))
        sampled = logprobs + gumbel
        return torch.where((keys != 0).unsqueeze(-1), sampled, scores.float()).to(scores.dtype)


class RequestSampling(ContinuousBatchingLogitsProcessorList):
    """Temperature, top-k, top-p (transformers' per-request processors) then the seeded sampler.

    Each step runs only the processors that some request in the batch needs: a greedy batch runs none, and a batch that
    samples at temperature 1 only adds noise; the two vocabulary sorts run only for a request that asks for top-k or
    top-p. Without a captured graph, the batch's requests are known on the host before the forward, so they also run on
    only the rows that sample. A captured CUDA graph cannot branch and runs on every row of the padded batch: there each
    row gets its request's arguments (neutral ones for greedy rows: zero key, no noise), and which processors the graph
    runs is part of its key (``SamplingKeyedGraphs``), so a batch replays a graph captured for its own chain.

    Requests registered in ``adjustments`` (penalties, logit_bias, a grammar, logprobs: ``hf_cb_adjustments``) have
    their rows adjusted first. That needs the host each step (a grammar's mask), which a captured graph cannot do: a
    batch holding such a request runs uncaptured (``run_adjusted_batches_eagerly``), row by row as without a graph.
    """

    def __init__(self, vocab_size: int, captured: bool = False) -> None:
        self.temperature = ContinuousBatchingTemperatureLogitsWarper(TemperatureLogitsWarper(1.0))
        self.top_k = ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=vocab_size))
        self.top_p = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(1.0))
        self.seeded = SeededGumbelSampler()
        self.processors = (self.temperature, self.top_k, self.top_p, self.seeded)
        super().__init__(LogitsProcessorList(self.processors), per_request_processors=False)
        self.tensors_required = len(self.processors)  # one int32 row of arguments per processor, in this order
        self.vocab_size = vocab_size
        self.captured = captured
        # Set by key_graphs_by_sampling once the manager's graphs are kept per chain; until then (or if transformers'
        # internals moved), a captured step runs the whole chain, which is right for any batch.
        self.keyed_graphs = False
        # What the next __call__ runs, as indices into self.processors. prepare_tensor_args and __call__ (or the
        # graph lookup that replaces it) run back to back on the batching thread, for the same batch.
        self.chain: tuple[int, ...] = ()
        # Without a graph: the rows that sample and each chained processor's arguments for them.
        self._rows = torch.empty(0, dtype=torch.int64)
        self._args: list[torch.Tensor] = []
        # Request id -> its adjustments, registered by the engine while the request runs; and this step's adjusted rows.
        self.adjustments: dict[str, RequestAdjustments] = {}
        self.adjusted: BatchAdjustments | None = None

    @property
    def eager(self) -> bool:
        """Whether the step being prepared must run uncaptured: it adjusts some request's row."""
        return self.adjusted is not None

    def needed(self, kwargs: list[dict]) -> tuple[int, ...]:
        """The processors that these sampling requests' arguments make a difference for."""
        if not kwargs:
            return ()
        used = (
            any(kw.get("temperature", 1.0) != 1.0 for kw in kwargs),
            any(kw.get("top_k", self.vocab_size) < self.vocab_size for kw in kwargs),
            any(kw.get("top_p", 1.0) < 1.0 for kw in kwargs),
            True,
        )
        return tuple(i for i, use in enumerate(used) if use)

    def prepare_tensor_args(self, requests_in_batch, arg_storage: torch.Tensor) -> torch.Tensor:
        with_new_token = [request for request in requests_in_batch if request.has_new_token]
        rows = [i for i, request in enumerate(with_new_token) if request.state.logit_processor_kwargs]
        sampling = [with_new_token[i] for i in rows]
        chain = self.needed([request.state.logit_processor_kwargs for request in sampling])
        self.adjusted = self._adjusted(with_new_token) if self.adjustments else None
        if self.captured and self.adjusted is None:
            super().prepare_tensor_args(requests_in_batch, arg_storage)  # every row's arguments, in static storage
            self.chain = chain if self.keyed_graphs else tuple(range(len(self.processors)))
            return arg_storage
        self.chain = chain
        if chain:  # a greedy batch (the common case) allocates nothing
            device = arg_storage.device
            self._args = [self.processors[i].prepare_tensor_args(sampling).to(device) for i in chain]
            self._rows = torch.tensor(rows, dtype=torch.int64, device=device)
        return arg_storage

    def _adjusted(self, with_new_token) -> BatchAdjustments | None:
        rows, requests = [], []
        for row, request in enumerate(with_new_token):
            adjustments = self.adjustments.get(request.state.request_id)
            if adjustments is not None:
                rows.append(row)
                requests.append(adjustments)
        return BatchAdjustments(rows, requests) if rows else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, logits_processor_args: torch.Tensor):
        if self.captured and self.adjusted is None:
            for i in self.chain:
                scores = self.processors[i](scores, logits_processor_args[i])
            return scores
        chain, self.chain = self.chain, ()
        adjusted, self.adjusted = self.adjusted, None
        if adjusted is not None:
            scores = adjusted.apply(scores)
        if chain:
            scores = self._sample_rows(chain, scores)
        if adjusted is not None:
            adjusted.observe(scores)
        return scores

    def _sample_rows(self, chain: tuple[int, ...], scores: torch.Tensor) -> torch.Tensor:
        # The scores have a row per request in the batch, the first ones those with a new token, in order; a request
        # still prefilling its prompt in chunks has a row that is never read. So all rows sample only if their counts
        # match.
        every_row = self._rows.numel() == scores.size(0)
        rows = scores if every_row else scores.index_select(0, self._rows)
        for i, args in zip(chain, self._args, strict=True):
            rows = self.processors[i](rows, args)
        return rows if every_row else scores.index_copy(0, self._rows, rows.to(scores.dtype))


class SamplingKeyedGraphs(CudaGraphBuffer):
    """transformers' store of captured CUDA graphs, its keys extended by the sampling chain the graph runs."""

    def __init__(self, sampling: RequestSampling) -> None:
        super().__init__()
        self.sampling = sampling

    def get_graph(self, key: tuple[int, ...]) -> torch.cuda.CUDAGraph | None:
        return super().get_graph((*key, self.sampling.chain))

    def set_graph(self, key: tuple[int, ...], graph: torch.cuda.CUDAGraph) -> None:
        super().set_graph((*key, self.sampling.chain), graph)


def key_graphs_by_sampling(manager: Any, sampling: RequestSampling) -> None:
    """Have the manager keep its captured graphs per sampling chain (``RequestSampling``).

    The graphs live in the batch processor's inputs and outputs, which the manager makes on its loop thread when it
    starts, before any step: wrap that maker. Should transformers' internals move, warn and leave the graphs as they
    are; every captured step then runs the whole chain.
    """
    make = manager._create_batch_processor

    def make_keyed():
        processor = make()
        io = processor.inputs_and_outputs
        ios = [pair.device_io for pair in io.io_pairs] if hasattr(io, "io_pairs") else [io]  # async: two pairs
        if all(isinstance(getattr(each, "graphs", None), CudaGraphBuffer) for each in ios):
            for each in ios:
                each.graphs = SamplingKeyedGraphs(sampling)
            sampling.keyed_graphs = True
        else:
            logger.warning("cannot key CUDA graphs by sampling chain: every captured step runs the whole chain")
        return processor

    manager._create_batch_processor = make_keyed


def run_adjusted_batches_eagerly(manager: Any, sampling: RequestSampling) -> None:
    """Have the manager run a step uncaptured (no CUDA graph, no compiled forward) when it adjusts a request's row.

    The adjustments compute a grammar's mask on the host between the forward and the sampling, which a replayed graph
    would skip. The model runner is made with the batch processor on the loop thread: wrap its choice of forward.
    """
    make = manager._create_batch_processor

    def make_eager():
        processor = make()
        runner = processor.model_runner
        if not getattr(runner, "tripod_eager_when_adjusted", False):
            choose = runner._get_forward_fn

            def forward_fn(use_block_table: bool):
                return (runner._forward_process_and_sample, False) if sampling.eager else choose(use_block_table)

            runner._get_forward_fn = forward_fn
            runner.tripod_eager_when_adjusted = True
        return processor

    manager._create_batch_processor = make_eager
