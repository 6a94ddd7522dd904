"""What one request measured, and the summary ``vllm bench serve`` prints for many of them.

Key names follow vLLM (``mean_ttft_ms``, ``p99_itl_ms``, ``output_throughput``, ...) so results from this
bench and from vLLM's sit in one table.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

LATENCY_METRICS = ("ttft", "itl", "tpot", "e2el")
MAX_ERRORS_KEPT = 5


@dataclass
class RequestResult:
    """One request as the client saw it; times are seconds from ``time.perf_counter``.

    ``ttft`` is ``None`` when no text came back; ``itl`` holds the gaps between successive pieces of text.
    Token counts come from the server's ``usage``; ``usage_missing`` marks a stream that sent none.
    ``streamed`` is false for a REST reply, whose text all arrives at once: no TPOT can be told from it.
    """

    streamed: bool = True
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    content_pieces: int = 0
    usage_missing: bool = False

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, vLLM's definition; needs two tokens."""
        if not self.streamed or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks, as ``numpy.percentile`` computes it."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(name: str, seconds: list[float]) -> dict[str, float | None]:
    """``mean_<name>_ms``, ``median_<name>_ms``, ``std_<name>_ms``, ``p99_<name>_ms``; ``None`` with no samples."""
    if not seconds:
        return {f"{stat}_{name}_ms": None for stat in ("mean", "median", "std", "p99")}
    millis = [value * 1000 for value in seconds]
    return {
        f"mean_{name}_ms": statistics.fmean(millis),
        f"median_{name}_ms": statistics.median(millis),
        f"std_{name}_ms": statistics.pstdev(millis),
        f"p99_{name}_ms": percentile(millis, 99),
    }


def error_summary(results: list[RequestResult]) -> list[dict[str, Any]]:
    """The most frequent error messages with their counts, so a failed run says why without a log."""
    counts = Counter(result.error or "unknown error" for result in results if not result.ok)
    return [{"message": message, "count": count} for message, count in counts.most_common(MAX_ERRORS_KEPT)]


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The vLLM-named metrics over all requests; latencies only count requests that completed."""
    done = [result for result in results if result.ok]
    total_input = sum(result.prompt_tokens for result in done)
    total_output = sum(result.output_tokens for result in done)
    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "mean_input_tokens": total_input / len(done) if done else None,
        "mean_output_tokens": total_output / len(done) if done else None,
        "requests_without_usage": sum(result.usage_missing for result in done),
        "duration": duration,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": total_output / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_input + total_output) / duration if duration > 0 else 0.0,
    }
    samples = {
        "ttft": [result.ttft for result in done if result.ttft is not None],
        "itl": [gap for result in done for gap in result.itl],
        "tpot": [result.tpot for result in done if result.tpot is not None],
        "e2el": [result.e2el for result in done],
    }
    for name in LATENCY_METRICS:
        summary.update(latency_stats(name, samples[name]))
    summary["errors"] = error_summary(results)
    return summary


def per_request(results: list[RequestResult]) -> dict[str, list[Any]]:
    """Each request's numbers in prompt order, under the names of vLLM's ``--save-detailed`` (seconds)."""
    return {
        "input_lens": [result.prompt_tokens for result in results],
        "output_lens": [result.output_tokens for result in results],
        "ttfts": [result.ttft for result in results],
        "e2els": [result.e2el for result in results],
        "itls": [result.itl for result in results],
        "request_errors": [result.error for result in results],
    }
