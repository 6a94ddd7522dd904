"""``python -m tripod.bench``: flags, one run, and the JSON it prints.

    python -m tripod.bench --url http://127.0.0.1:8000 --transport sse --concurrency 16 \\
        --num-requests 48 --prompt-len 128 --output-len 128
    python -m tripod.bench --direct --concurrency 16 --num-requests 48   # the engine alone, no server

The JSON (stdout, and ``--out FILE``) uses the metric names of ``vllm bench serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tripod.bench.load import default_model, run_clients
from tripod.bench.machine import git_commit, machine_info
from tripod.bench.metrics import RequestResult, error_summary, per_request, summarize
from tripod.bench.prompts import PromptSet, build_prompts, load_tokenizer
from tripod.bench.transports import TRANSPORTS, Target

REST_NOTE = "rest is not streamed: ttft equals e2el, and itl and tpot are not measured (null)"
WORDS_NOTE = "no tokenizer could be loaded: prompts are approximated with words; see mean_input_tokens"
INEXACT_NOTE = "some prompts could not be cut to exactly prompt_len tokens; see mean_input_tokens"
DIRECT_NOTE = "direct: the engine in the bench's own process, no server; slots bounds generations at once"


@dataclass
class Run:
    """What one run did, before it becomes JSON: per-request results and how the run was set up."""

    transport: str
    url: str | None
    model: str | None
    prompts: PromptSet
    results: list[RequestResult]
    duration: float
    warmup: list[RequestResult]
    notes: list[str] = field(default_factory=list)
    engine: str | None = None
    slots: int | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tripod.bench",
        description="Drive an OpenAI-compatible server (or, with --direct, the engine in-process) with N "
        "concurrent clients and print vLLM-named latency and throughput metrics as JSON.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    parser.add_argument("--model", help="model name (default: the first id of GET /v1/models; --direct: TRIPOD_MODEL)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="sse")
    parser.add_argument("--concurrency", type=positive_int, default=1, help="clients sending at once")
    parser.add_argument("--num-requests", type=positive_int, default=32, help="requests in all")
    parser.add_argument("--prompt-len", type=positive_int, default=128, help="prompt length in tokens")
    parser.add_argument("--output-len", type=positive_int, default=128, help="tokens to generate per request")
    parser.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (for servers that refuse it); outputs may then be shorter",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (greedy) by default, as vLLM's bench")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts (and sampling when temperature > 0)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer, on HTTP and on the WebSocket")
    parser.add_argument("--tokenizer", help="tokenizer path or hub id, local files only (default: the model's)")
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, help="uncounted requests sent first, one at a time"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    parser.add_argument("--ws-path", default="/ws/chat/", help="WebSocket path on the server")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--label", help="free text stored in the JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    parser.add_argument(
        "--detailed", action="store_true", help="also store each request's lengths and latencies (seconds), as vLLM"
    )
    direct = parser.add_argument_group("in-process engine")
    direct.add_argument("--direct", action="store_true", help="run the load on the engine in-process, no server")
    direct.add_argument("--engine", default="hf", help="engine for --direct")
    direct.add_argument(
        "--slots", type=int, help="--direct: generations at once (default: TRIPOD_SLOTS or the engine's default)"
    )
    direct.add_argument(
        "--profile",
        type=Path,
        help="--direct: run the measured requests under torch.profiler and write its table of operators, by self "
        "time on the device (CPU without one), to this file",
    )
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def progress_counter(args: argparse.Namespace) -> tuple[tqdm, Callable[[RequestResult], None]]:
    """A progress bar on stderr and a thread-safe callback that advances it per finished request."""
    name = "direct" if args.direct else args.transport
    bar = tqdm(total=args.num_requests, desc=f"{name} c={args.concurrency}", file=sys.stderr, disable=not args.progress)
    lock = threading.Lock()

    def advance(result: RequestResult) -> None:
        with lock:
            bar.update(1)

    return bar, advance


def split_warmup(prompts: list[str], warmup: int) -> tuple[list[str], list[str]]:
    """Measured prompts first, warm-up prompts last: a warm-up never primes a measured prompt's cache."""
    cut = len(prompts) - warmup
    return prompts[:cut], prompts[cut:]


def run_server(args: argparse.Namespace) -> Run:
    """Load a server over HTTP or WebSocket; the part of the JSON that depends on the transport."""
    model, model_error = args.model, None
    if model is None:
        model, model_error = asyncio.run(default_model(args.url, args.api_key))
    loaded = load_tokenizer(args.tokenizer, model)
    tokenizer, tokenizer_name = loaded if loaded else (None, None)
    prompt_set = build_prompts(args.num_requests + args.warmup, args.prompt_len, args.seed, tokenizer, tokenizer_name)
    measured, warmup_prompts = split_warmup(prompt_set.prompts, args.warmup)
    target = Target(
        url=args.url,
        model=model,
        output_len=args.output_len,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
        api_key=args.api_key,
        timeout=args.timeout,
        ws_path=args.ws_path,
    )
    warmup, _ = asyncio.run(run_clients(target, args.transport, warmup_prompts, 1))
    bar, advance = progress_counter(args)
    with bar:
        results, duration = asyncio.run(run_clients(target, args.transport, measured, args.concurrency, advance))
    notes = [REST_NOTE] if args.transport == "rest" else []
    if model_error:
        notes.append(f"GET /v1/models failed: {model_error}")
    return Run(args.transport, args.url, model, prompt_set, results, duration, warmup, notes)


def run_direct(args: argparse.Namespace) -> Run:
    """The same load on the engine in this process."""
    from tripod.bench.direct import engine_slots, load_engine, run_threads

    chat_model = load_engine(args.model, args.engine)
    slots = args.slots if args.slots is not None else engine_slots(chat_model)
    own_tokenizer = getattr(chat_model, "tokenizer", None)
    if args.tokenizer is None and own_tokenizer is not None:
        tokenizer, tokenizer_name = own_tokenizer, chat_model.model_name
    else:
        loaded = load_tokenizer(args.tokenizer, args.model or chat_model.model_name)
        tokenizer, tokenizer_name = loaded if loaded else (None, None)
    prompt_set = build_prompts(args.num_requests + args.warmup, args.prompt_len, args.seed, tokenizer, tokenizer_name)
    measured, warmup_prompts = split_warmup(prompt_set.prompts, args.warmup)
    load = dict(
        slots=slots,
        output_len=args.output_len,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
    )
    warmup, _ = run_threads(chat_model, warmup_prompts, 1, **load)
    bar, advance = progress_counter(args)
    with bar, profiled(args.profile):
        results, duration = run_threads(chat_model, measured, args.concurrency, on_result=advance, **load)
    return Run(
        "direct",
        None,
        chat_model.model_name,
        prompt_set,
        results,
        duration,
        warmup,
        [DIRECT_NOTE],
        engine=chat_model.engine,
        slots=slots,
    )


@contextmanager
def profiled(table_path: Path | None) -> Iterator[None]:
    """torch.profiler around the block when ``table_path`` is given; its operator table, busiest first, goes there."""
    if table_path is None:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    on_cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    # The model runs on the engine's threads (the batching loop, generate threads), not on this one. Older torch
    # builds lack the option; there the table holds device kernels and this thread's operators only.
    try:
        options = {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except TypeError:
        options = {}
    with profile(activities=activities, **options) as profiler:
        yield
    sort_by = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90))


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """One run from parsed flags, as the JSON-ready dict that ``main`` prints."""
    run = run_direct(args) if args.direct else run_server(args)
    notes = list(run.notes)
    if run.prompts.tokenizer is None:
        notes.append(WORDS_NOTE)
    elif not run.prompts.exact:
        notes.append(INEXACT_NOTE)
    commit, dirty = git_commit()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "transport": run.transport,
        "url": run.url,
        "model": run.model,
        "concurrency": args.concurrency,
        "max_concurrency": args.concurrency,
        "num_requests": args.num_requests,
        "num_prompts": args.num_requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "tokenizer": run.prompts.tokenizer,
        "prompt_tokens_exact": run.prompts.exact,
    }
    if run.engine is not None:
        report["engine"] = run.engine
        report["slots"] = run.slots
    report.update(summarize(run.results, run.duration))
    report["warmup"] = {
        "requests": len(run.warmup),
        "failed": sum(not result.ok for result in run.warmup),
        "errors": error_summary(run.warmup),
    }
    report["notes"] = notes
    if args.detailed:
        report.update(per_request(run.results))
    report["machine"] = machine_info()
    report["commit"] = commit
    report["commit_dirty"] = dirty
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run, print the JSON (and write ``--out``); failed requests are data, not an exit code."""
    args = parse_args(argv)
    report = run_benchmark(args)
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0
