"""The transformers engine: one ``generate`` call per request, on its own thread.

``generate`` runs on a thread and feeds a ``TokenStreamer``; the reader waits at most
``engine_step_timeout`` for each piece, so a ``generate`` that crashes or hangs never hangs a client.
A ``StoppingCriteria`` tied to the request's cancel event stops the model within one decode step.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from tripod.engines.base import ChatModel, Delta, Prompt, RawGeneration, TokenLogprob
from tripod.engines.grammar import GrammarMatcher, ModelGrammars, request_grammar
from tripod.engines.logprobs import Pick, TokenTexts
from tripod.engines.random_weights import is_random, load_random_model
from tripod.engines.sampling import LogprobRecorder, build_logits_processors
from tripod.engines.text import IncrementalDetokenizer
from tripod.engines.tiny import resolve_model_path
from tripod.engines.tool_calls import tool_call_format
from tripod.errors import ContextLengthExceeded, EngineFailure, InvalidRequest
from tripod.protocol import SamplingParams, ToolUse

logger = logging.getLogger(__name__)


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


class _Failure:
    """Put on the streamer's queue by the generate thread when ``generate`` raises."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class TokenStreamer(BaseStreamer):
    """What ``generate`` streams, as ``(text, tokens)`` pieces for a reader on another thread.

    Each generated token is decoded as it comes (``IncrementalDetokenizer``, as in ``hf-cb``), so its text goes
    out at once; a character split over byte tokens waits for its last byte. transformers' ``TextIteratorStreamer``
    held text with punctuation or symbols back until the next space, which could keep a stream silent for many
    tokens, and decoded everything since the last line on every token. This one also counts tokens, sees EOS and
    carries generate's errors. The reader waits at most ``timeout`` for each piece. With a ``LogprobRecorder``, each
    piece also carries its tokens' logprob picks, one per token.
    """

    def __init__(self, tokenizer, eos_ids: set[int], timeout: float, logprobs: LogprobRecorder | None = None) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.eos_ids = eos_ids
        self.timeout = timeout
        self.logprobs = logprobs
        self.generated = 0
        self.saw_eos = False
        self._prompt_seen = False
        self._pending = 0  # tokens whose text is still held back (an incomplete character)
        self._picks: list[Pick] = []  # their logprob picks
        self._queue: queue.Queue = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first call hands over the prompt
            self._prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        self.generated += len(tokens)
        self._pending += len(tokens)
        if self.logprobs is not None:
            self._picks.extend(self.logprobs.take(token) for token in tokens)
        if tokens and tokens[-1] in self.eos_ids:
            self.saw_eos = True
        text = self.detokenizer.add(tokens)
        if text:
            self._send(text)

    def _send(self, text: str) -> None:
        self._queue.put((text, self._pending, self._picks))
        self._pending, self._picks = 0, []

    def end(self) -> None:
        text = self.detokenizer.flush()
        if text or self._pending:
            self._send(text)
        self._queue.put(_END)

    def fail(self, exc: BaseException) -> None:
        self._queue.put(_Failure(exc))

    def __iter__(self) -> Iterator[tuple[str, int, list[Pick]]]:
        while True:
            try:
                value = self._queue.get(timeout=self.timeout)
            except queue.Empty:
                raise EngineFailure(
                    f"The engine produced nothing for {self.timeout:g} s.", code="engine_timeout"
                ) from None
            if value is _END:
                return
            if isinstance(value, _Failure):
                raise EngineFailure(f"The engine failed: {value.exc}", code="engine_error") from value.exc
            yield value


class CancelCriteria(StoppingCriteria):
    """Ends ``generate`` at the next step once the request is cancelled; counts the steps it took."""

    def __init__(self, generation: HFGeneration) -> None:
        self.generation = generation

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        cancelled = self.generation.cancel_event.is_set()
        if cancelled:
            self.generation.steps_after_cancel += 1
        return torch.full((input_ids.shape[0],), cancelled, dtype=torch.bool, device=input_ids.device)


class HFGeneration(RawGeneration):
    """One request's ``generate`` thread and the streamer that reads it."""

    def __init__(self, model: HFChatModel, input_ids: list[int], params: SamplingParams, max_new_tokens: int) -> None:
        super().__init__()
        self.prompt_tokens = len(input_ids)
        self.texts = model.token_texts if params.logprobs else None
        recorder = LogprobRecorder(params.top_logprobs) if params.logprobs else None
        self.streamer = TokenStreamer(model.tokenizer, model.eos_ids, model.step_timeout, recorder)
        device = model.device
        ids = torch.tensor([input_ids], dtype=torch.long, device=device)
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            # Sampling is done by our processors (per-request seeded), so generate itself stays greedy
            # and the model's own sampling defaults never leak into a request.
            do_sample=False,
            num_beams=1,
            temperature=1.0,
            top_p=1.0,
            top_k=50,
            repetition_penalty=1.0,
            eos_token_id=sorted(model.eos_ids),
            pad_token_id=model.pad_id,
        )
        if params.ignore_eos:
            generation_config.min_new_tokens = max_new_tokens
        self._kwargs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=generation_config,
            logits_processor=build_logits_processors(
                params, len(input_ids), device, grammar=model.grammar_matcher(params, max_new_tokens), logprobs=recorder
            ),
            stopping_criteria=StoppingCriteriaList([CancelCriteria(self)]),
            streamer=self.streamer,
        )
        self._model = model.model
        self._thread = threading.Thread(target=self._run, name="tripod-hf-generate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._model.generate(**self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the reader
            logger.exception("generate failed")
            self.streamer.fail(exc)
        finally:
            self._kwargs = {}

    @property
    def completion_tokens(self) -> int:  # type: ignore[override]
        return self.streamer.generated

    @property
    def eos(self) -> bool:  # type: ignore[override]
        return self.streamer.saw_eos

    def __iter__(self) -> Iterator[Delta]:
        for text, tokens, picks in self.streamer:
            yield Delta(text, tokens, self._logprobs(picks))

    def _logprobs(self, picks: list[Pick]) -> tuple[TokenLogprob, ...]:
        return () if self.texts is None else tuple(self.texts.token_logprob(pick) for pick in picks)

    def close(self) -> None:
        if self._thread.is_alive():
            self.cancel()
            # A healthy generate stops at its next step; a hung one must not hold the caller too.
            self._thread.join(timeout=min(self.streamer.timeout, 2.0))


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: a tool call's ``arguments`` as a mapping, where OpenAI sends JSON text
    (transformers' convention; templates render it with ``tojson``). Arguments that are not a JSON object stay text."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_template_call(call) for call in calls]}
        out.append(message)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        arguments = None
    if isinstance(arguments, dict):
        function["arguments"] = arguments
    return {**call, "type": call.get("type", "function"), "function": function}


class HFChatModel(ChatModel):
    """``AutoTokenizer`` + ``AutoModelForCausalLM``: GPU and bf16 when there is one, else CPU float32."""

    engine = "hf"
    default_slots = 4

    def __init__(self, engine: str | None = None, model_name: str | None = None, **options: Any) -> None:
        super().__init__(engine, model_name, **options)
        self.model = None
        self.tokenizer = None
        self.path = options.get("path") or model_name
        self.device = pick_device(options.get("device", "auto"))
        self.dtype = pick_dtype(options.get("dtype", "auto"), self.device)
        self.step_timeout = float(options.get("step_timeout", 60.0))
        self.cache_dir = Path(options.get("cache_dir") or Path.home() / ".cache" / "tripod")
        self.adapter = options.get("adapter") or ""
        self._grammars: ModelGrammars | None = None
        self._token_texts: TokenTexts | None = None
        self._lazy_lock = threading.Lock()

    @property
    def can_generate(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        # transformers writes to stderr with its own handler and progress bars; route it through ours so
        # that logs stay one JSON object per line.
        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        if is_random(self.path):
            logger.info("building %s with random weights on %s (%s)", self.path, self.device, self.dtype)
            self.tokenizer, model = load_random_model(self.path, self.cache_dir, self.device, self.dtype)
        else:
            path = resolve_model_path(self.path, self.cache_dir)
            logger.info("loading %s from %s on %s (%s)", self.model_name, path, self.device, self.dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        if self.adapter:
            from peft import PeftModel

            # A LoRA adapter from `run_train`: merged once at load, so generation costs what the base model costs.
            logger.info("applying the adapter %s", self.adapter)
            model = PeftModel.from_pretrained(model, self.adapter).merge_and_unload()
        self.model = model.to(self.device).eval()
        config = self.model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length or 2048
        )
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        # Only EOS and padding come from the model's generation_config: its other defaults (no_repeat_ngram_size,
        # suppress_tokens, ...) would otherwise fill every field a request leaves unset.
        self.model.generation_config = GenerationConfig(
            eos_token_id=sorted(eos_ids), pad_token_id=self.tokenizer.pad_token_id
        )
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        )
        self.tool_format = tool_call_format(self.tokenizer, self.options.get("tool_parser") or None)

    @property
    def grammars(self) -> ModelGrammars:
        """llguidance's view of the tokenizer and the compiled grammars, made on the first constrained request."""
        if self._grammars is None:
            with self._lazy_lock:
                if self._grammars is None:
                    vocab_size = int(self.model.config.get_text_config().vocab_size)
                    self._grammars = ModelGrammars(self.tokenizer, vocab_size, self.eos_ids)
        return self._grammars

    @property
    def token_texts(self) -> TokenTexts:
        """Each token's text and bytes for logprobs, made on the first request that asks for them."""
        if self._token_texts is None:
            lltokenizer = self.grammars.tokenizer
            with self._lazy_lock:
                if self._token_texts is None:
                    self._token_texts = TokenTexts(self.tokenizer, lltokenizer)
        return self._token_texts

    def grammar_matcher(self, params: SamplingParams, max_new_tokens: int) -> GrammarMatcher | None:
        """The request's grammar matcher, or None when its reply is free."""
        grammar = request_grammar(params, self.tool_format, self.tokenizer)
        return None if grammar is None else self.grammars.matcher(grammar, max_new_tokens)

    def encode(self, prompt: Prompt, tools: ToolUse | None = None) -> list[int]:
        """Apply the chat template to messages (with the tools offered), or tokenize a raw prompt."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            # An empty prompt still needs a first position: start from the end-of-text token, as OpenAI does.
            return ids or [self.pad_id]
        if not self.tokenizer.chat_template:
            raise InvalidRequest(
                f"The model '{self.model_name}' has no chat template; use /v1/completions.",
                param="messages",
                code="no_chat_template",
            )
        extra = {"tools": [tool.as_template_tool() for tool in tools.tools]} if tools is not None else {}
        try:
            text = self.tokenizer.apply_chat_template(
                template_messages(prompt), add_generation_prompt=True, tokenize=False, **extra
            )
        except Exception as exc:  # noqa: BLE001 - templates raise anything (TemplateError, TypeError, ...)
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from exc
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prepare(
        self, prompt: Prompt, params: SamplingParams, max_prompt_tokens: int | None, max_tokens_cap: int | None = None
    ) -> tuple[list[int], int]:
        """Token ids of the prompt and the new-token budget, after every length check."""
        vocab_size = self.model.config.get_text_config().vocab_size
        outside = [token for token, _ in params.logit_bias if not 0 <= token < vocab_size]
        if outside:
            raise InvalidRequest(
                f"'logit_bias' names token {outside[0]}; this model's tokens are 0 to {vocab_size - 1}.",
                param="logit_bias",
                code="invalid_value",
            )
        ids = self.encode(prompt, params.tools)
        param = "prompt" if isinstance(prompt, str) else "messages"
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            raise InvalidRequest(
                f"Your {param} is {len(ids)} tokens; this server accepts at most {max_prompt_tokens}.",
                param=param,
                code="prompt_too_long",
            )
        room = self.context_length - len(ids)
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your {param} resulted in {len(ids)} tokens.",
                param=param,
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the {param}, {params.max_tokens} in the "
                "completion). Please reduce the length of the prompt or the completion.",
                param="max_tokens",
            )
        if params.max_tokens is not None:
            return ids, params.max_tokens
        return ids, min(room, max_tokens_cap) if max_tokens_cap else room

    def _start_raw(
        self,
        prompt: Prompt,
        params: SamplingParams,
        max_prompt_tokens: int | None = None,
        max_tokens_cap: int | None = None,
    ) -> tuple[RawGeneration, int]:
        ids, max_new_tokens = self.prepare(prompt, params, max_prompt_tokens, max_tokens_cap)
        return HFGeneration(self, ids, params, max_new_tokens), max_new_tokens
