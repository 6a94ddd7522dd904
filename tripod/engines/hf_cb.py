"""The continuous-batching engine (``hf-cb``): transformers' ``ContinuousBatchingManager``.

All requests share one generation loop that re-forms the batch every step, so throughput grows with concurrency
instead of each request paying for its own ``generate``. Per-request sampling is ``hf_cb_sampling``, the attention
setup ``hf_cb_attention``, and the transformers internals this relies on are checked at load (``hf_cb_internals``).
Stop strings and finish reasons live in the shared text layer (``TokenStream``), as for ``hf``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from tripod.engines.base import END, Delta, Prompt, PushItem, RawGeneration
from tripod.engines.cpu_threads import governed_threads, leave_a_core_for_the_server
from tripod.engines.hf import HFChatModel
from tripod.engines.hf_cb_adjustments import RequestAdjustments
from tripod.engines.hf_cb_attention import KV_PADDING, set_up_attention
from tripod.engines.hf_cb_internals import check_manager, check_transformers
from tripod.engines.hf_cb_sampling import RequestSampling, key_graphs_by_sampling, run_adjusted_batches_eagerly
from tripod.engines.text import IncrementalDetokenizer
from tripod.errors import EngineFailure
from tripod.protocol import SamplingParams

logger = logging.getLogger(__name__)


class StepDispatch:
    """Stands in for an event loop in the manager's output router, on the batching thread.

    The router hands each step's outputs over in one ``call_soon_threadsafe`` (``deliver_batch``). Requests
    read by a thread get theirs straight into their own queue; those pushed to an event loop are collected,
    and each loop is woken once per step with all of its requests' outputs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collected: dict[asyncio.AbstractEventLoop, list[tuple[CBGeneration, Any]]] = {}

    def collect(self, loop: asyncio.AbstractEventLoop, generation: CBGeneration, output: Any) -> None:
        with self._lock:
            self._collected.setdefault(loop, []).append((generation, output))

    def call_soon_threadsafe(self, callback, *args) -> None:
        callback(*args)
        with self._lock:
            collected, self._collected = self._collected, {}
        for loop, outputs in collected.items():
            try:
                loop.call_soon_threadsafe(_deliver_on_loop, outputs)
            except RuntimeError:  # that loop is closed: its readers are gone, free their places in the batch
                for generation, _ in outputs:
                    generation.cancel()


def _deliver_on_loop(outputs: list[tuple[CBGeneration, Any]]) -> None:
    for generation, output in outputs:
        generation.on_output(output)


_CANCELLED = object()


class CBGeneration(RawGeneration):
    """One request inside the shared continuous batch."""

    def __init__(self, model: HFContinuousBatchingModel, input_ids: list[int], params: SamplingParams, max_new: int):
        super().__init__()
        self.model = model
        self.prompt_tokens = len(input_ids)
        self.push_timeout = model.step_timeout
        self.request_id = uuid.uuid4().hex
        self.outputs: queue.Queue = queue.Queue()
        self.detokenizer = IncrementalDetokenizer(model.tokenizer)
        self.finished = False
        self._seen = 0
        # Set once by push_to: then outputs go to that loop's reader instead of self.outputs.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: Callable[[PushItem], None] | None = None
        self._ended = False
        manager = model.manager
        self.adjustments = RequestAdjustments.of(params, model.grammar_matcher(params, max_new), model.device)
        self.texts = model.token_texts if params.logprobs else None
        self._sampling = manager.logit_processor
        if self.adjustments is not None:
            self._sampling.adjustments[self.request_id] = self.adjustments
        with manager.output_router._lock:
            manager.output_router.result_handlers[self.request_id] = (self._route, model.dispatch)
        kwargs: dict[str, Any] = {}
        if not params.greedy:
            kwargs = {
                "temperature": float(params.temperature),
                "top_k": int(params.top_k or model.vocab_size),
                "top_p": float(max(params.top_p, 1e-6)),
                "seed": int(params.seed if params.seed is not None else secrets.randbits(63)),
            }
        accepted = manager.add_request(
            input_ids,
            request_id=self.request_id,
            max_new_tokens=max_new,
            streaming=True,
            eos_token_id=-1 if params.ignore_eos else sorted(model.eos_ids),
            **kwargs,
        )
        if accepted is None:
            self._forget()
            raise EngineFailure("The continuous batching manager is not accepting requests.", code="engine_error")

    @classmethod
    def start(cls, model: HFContinuousBatchingModel, *args) -> CBGeneration:
        """Start a request; a manager whose loop died on an earlier error is replaced once, first."""
        model.ensure_manager()
        return cls(model, *args)

    def _route(self, output) -> None:
        """The router's handler, on the batching thread."""
        with self._lock:
            if self._loop is None:
                self.outputs.put(output)
                return
            loop = self._loop
        self.model.dispatch.collect(loop, self, output)

    def _delta(self, output) -> Delta | None:
        """One output of the manager (all tokens so far) as the new text; None when it adds nothing."""
        if output.error:
            raise EngineFailure(f"The engine failed: {output.error}", code="engine_error")
        tokens = output.generated_tokens
        new = tokens[self._seen :]
        self._seen = self.completion_tokens = len(tokens)
        done = output.is_finished()
        if done and tokens and tokens[-1] in self.model.eos_ids:
            self.eos = True
        text = self.detokenizer.add(new) if new else ""
        if done:
            text += self.detokenizer.flush()
            self.finished = True
        logprobs = ()
        if self.texts is not None and new:
            logprobs = tuple(self.texts.token_logprob(pick) for pick in self.adjustments.take_picks(new))
        return Delta(text, len(new), logprobs) if text or new else None

    def __iter__(self) -> Iterator[Delta]:
        try:
            while not self.finished:
                try:
                    output = self.outputs.get(timeout=self.model.step_timeout)
                except queue.Empty:
                    raise EngineFailure(
                        f"The engine produced nothing for {self.model.step_timeout:g} s.", code="engine_timeout"
                    ) from None
                if output is _CANCELLED or self.cancel_event.is_set():
                    return
                delta = self._delta(output)
                if delta is not None:
                    yield delta
        finally:
            self._forget()

    def push_to(self, loop: asyncio.AbstractEventLoop, sink: Callable[[PushItem], None]) -> None:
        with self._lock:
            self._loop, self._sink = loop, sink
            early = []
            while not self.outputs.empty():
                early.append(self.outputs.get_nowait())
        for output in early:
            self.on_output(output)

    def on_output(self, output) -> None:
        """A pushed output, on the reader's loop."""
        if self._ended:
            return
        if output is _CANCELLED or self.cancel_event.is_set():
            self._end(END)
            return
        try:
            delta = self._delta(output)
        except EngineFailure as exc:
            self._end(exc)
            return
        if delta is not None:
            self._sink(delta)
        if self.finished:
            self._end(END)

    def _end(self, item: PushItem) -> None:
        self._ended = True
        self._forget()
        self._sink(item)

    def cancel(self) -> None:
        super().cancel()
        if not self.finished:
            self.model.manager.cancel_request(self.request_id)
        # A cancelled request gets no final output from the manager: end our own stream.
        with self._lock:
            loop = self._loop
            if loop is None:
                self.outputs.put(_CANCELLED)
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.on_output, _CANCELLED)
            except RuntimeError:
                pass  # the reader's loop is closed

    def _forget(self) -> None:
        self._sampling.adjustments.pop(self.request_id, None)
        router = self.model.manager.output_router
        with router._lock:
            router.result_handlers.pop(self.request_id, None)

    def close(self) -> None:
        if not self.finished:
            self.cancel()
        self._forget()

    async def aclose(self) -> None:
        self.close()  # nothing here waits: cancelling only marks the request in the manager


class HFContinuousBatchingModel(HFChatModel):
    """``hf-cb``: the transformers model behind one ``ContinuousBatchingManager``."""

    engine = "hf-cb"
    default_slots = 64

    def __init__(self, engine: str | None = None, model_name: str | None = None, **options: Any) -> None:
        super().__init__(engine, model_name, **options)
        self.manager = None
        self.cb_num_blocks = options.get("cb_num_blocks") or None
        self.cb_max_batch_tokens = options.get("cb_max_batch_tokens") or None
        self.cb_cuda_graph = options.get("cb_cuda_graph", "auto")
        kv_padding = options.get("cb_kv_padding")
        self.cb_kv_padding = KV_PADDING if kv_padding is None else int(kv_padding)
        self.cb_packed_gqa = bool(options.get("cb_packed_gqa", True))
        self.cb_split_keys = int(options.get("cb_split_keys") or 0)
        self.dispatch = StepDispatch()
        self.core_governor = None

    def load(self) -> None:
        check_transformers()  # before the weights load: a moved internal fails here, named, not inside a request
        super().load()
        # On CPU, torch's pool grows to every core while the rest of the machine is idle (cpu_threads.py).
        self.core_governor = None if self.device.startswith("cuda") else governed_threads(self.model)
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        self._manager_lock = threading.Lock()
        self._start_manager()

    def ensure_manager(self) -> None:
        """Replace the manager if its generation loop stopped (a failed batch kills it in transformers 5.24)."""
        manager = self.manager
        if manager.is_running() and manager.background_thread_status.fatal_error is None:
            return
        with self._manager_lock:
            if self.manager is manager:
                logger.warning(
                    "continuous batching loop stopped (%s); starting a new one",
                    manager.background_thread_status.fatal_error,
                )
                try:
                    manager.stop(block=True, timeout=10)
                except Exception:  # noqa: BLE001 - the old loop is dead already
                    logger.debug("stopping the dead manager failed", exc_info=True)
                self.model.destroy_cached_continuous_batching_manager()
                self._start_manager()

    def _start_manager(self) -> None:
        on_gpu = self.device.startswith("cuda")
        if not on_gpu:
            # Auto-sizing takes most of host RAM on CPU: size the KV cache from settings instead. A step of at most
            # 256 tokens splits a burst of prefills over more steps, so the first requests of a burst start sooner
            # and the streams already decoding wait less (docs/BENCHMARKS.md).
            self.cb_num_blocks = self.cb_num_blocks or 512
            self.cb_max_batch_tokens = self.cb_max_batch_tokens or 256
        use_graph = on_gpu if self.cb_cuda_graph == "auto" else self.cb_cuda_graph in (True, "1", "true", "yes")
        packed_gqa = set_up_attention(on_gpu=on_gpu, packed_gqa=self.cb_packed_gqa, split_keys=self.cb_split_keys)
        threads = torch.get_num_threads() if on_gpu else leave_a_core_for_the_server()
        cb_config = ContinuousBatchingConfig(
            num_blocks=self.cb_num_blocks,
            max_batch_tokens=self.cb_max_batch_tokens,
            use_cuda_graph=use_graph,
            kv_padding_interval_size=self.cb_kv_padding,  # KV_PADDING says why 1024
            max_memory_percent=0.8,  # our processors make vocabulary-sized temporaries
            per_request_processors=False,
        )
        generation_config = GenerationConfig(
            do_sample=False,  # sampling is the seeded Gumbel-max processor's job: argmax after it
            max_new_tokens=self.context_length,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        manager = self.model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        check_manager(manager)
        resolved = manager.continuous_batching_config
        captured = any(resolved.cuda_graph_booleans) or bool(
            resolved.varlen_compile_config or resolved.decode_compile_config
        )
        manager.logit_processor = RequestSampling(self.vocab_size, captured=captured)
        if captured:
            key_graphs_by_sampling(manager, manager.logit_processor)
            run_adjusted_batches_eagerly(manager, manager.logit_processor)
        # The manager's loop thread inherits "daemon" from the thread that starts it: start it from a daemon
        # thread, so that a server (or a bench) can exit without stopping the manager first.
        starter = threading.Thread(target=manager.start, name="tripod-cb-start", daemon=True)
        starter.start()
        starter.join()
        self.manager = manager
        logger.info(
            "continuous batching on %s: num_blocks=%s max_batch_tokens=%s cuda_graph=%s kv_padding=%s async=%s"
            " packed_gqa=%s split_keys=%d torch_threads=%d%s",
            self.device,
            self.cb_num_blocks,
            self.cb_max_batch_tokens,
            use_graph,
            resolved.kv_padding_interval_size,
            resolved.use_async_batching,
            packed_gqa,
            self.cb_split_keys if packed_gqa else 0,
            threads,
            " (governed: grows to every core while the machine is quiet)" if self.core_governor else "",
        )

    def _start_raw(
        self,
        prompt: Prompt,
        params: SamplingParams,
        max_prompt_tokens: int | None = None,
        max_tokens_cap: int | None = None,
    ) -> tuple[RawGeneration, int]:
        ids, max_new = self.prepare(prompt, params, max_prompt_tokens, max_tokens_cap)
        return CBGeneration.start(self, ids, params, max_new), max_new
