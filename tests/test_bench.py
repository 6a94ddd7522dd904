"""``python -m tripod.bench`` against a real daphne serving the tiny model, and against the engine in-process."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import numpy
import pytest

from tests.processes import ROOT, LiveServer, free_port
from tripod.bench.cli import parse_args, run_benchmark
from tripod.bench.direct import FairSlots
from tripod.bench.metrics import RequestResult, percentile, summarize

NUM_REQUESTS = 4
CONCURRENCY = 2
PROMPT_LEN = 16
OUTPUT_LEN = 8
LOAD = [
    "--concurrency",
    str(CONCURRENCY),
    "--num-requests",
    str(NUM_REQUESTS),
    "--prompt-len",
    str(PROMPT_LEN),
    "--output-len",
    str(OUTPUT_LEN),
    "--no-progress",
]
LATENCY_KEYS = [f"{stat}_{name}_ms" for name in ("ttft", "itl", "tpot", "e2el") for stat in ("mean", "median", "p99")]
REPORT_KEYS = [
    *LATENCY_KEYS,
    "request_throughput",
    "output_throughput",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "duration",
    "concurrency",
    "transport",
    "url",
    "model",
    "machine",
    "commit",
    "label",
    "errors",
]


def bench(*flags: str) -> dict:
    return run_benchmark(parse_args([*flags, *LOAD]))


def assert_complete_run(report: dict, streamed: bool = True) -> None:
    """Every request done, exact token counts from usage, and latencies that make sense together."""
    assert set(REPORT_KEYS) <= set(report)
    assert report["completed"] == NUM_REQUESTS and report["failed"] == 0 and report["errors"] == []
    assert report["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
    # The tiny tokenizer is local, so every prompt is exactly PROMPT_LEN tokens as the engine counts them.
    assert report["prompt_tokens_exact"] is True
    assert report["total_input_tokens"] == NUM_REQUESTS * PROMPT_LEN
    assert report["concurrency"] == CONCURRENCY and report["model"] == "tiny"
    assert report["duration"] > 0
    assert report["request_throughput"] == pytest.approx(NUM_REQUESTS / report["duration"])
    assert report["output_throughput"] == pytest.approx(NUM_REQUESTS * OUTPUT_LEN / report["duration"])
    assert 0 < report["median_ttft_ms"] <= report["p99_ttft_ms"] <= report["p99_e2el_ms"]
    assert report["mean_ttft_ms"] <= report["mean_e2el_ms"] < report["duration"] * 1000
    if streamed:
        assert 0 < report["median_itl_ms"] <= report["p99_itl_ms"] < report["p99_e2el_ms"]
        assert 0 < report["median_tpot_ms"] < report["median_e2el_ms"]
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["hostname"] and machine["transformers"]


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_streamed_transports(server, transport):
    report = bench("--url", server.url, "--transport", transport, "--model", "tiny")
    assert report["transport"] == transport and report["url"] == server.url
    assert_complete_run(report)


def test_rest_reports_ttft_as_e2el_and_no_token_gaps(server):
    report = bench("--url", server.url, "--transport", "rest")
    assert_complete_run(report, streamed=False)
    assert report["median_ttft_ms"] == report["median_e2el_ms"]
    assert report["median_itl_ms"] is None and report["median_tpot_ms"] is None
    assert any("not streamed" in note for note in report["notes"])


def test_command_line_prints_json_and_writes_it_to_out(server, tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "tripod.bench", "--url", server.url, "--label", "cli run", "--out", str(out)]
    flags = ["--concurrency", "2", "--num-requests", "2", "--prompt-len", "16", "--output-len", "4"]
    done = subprocess.run([*command, *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    assert report["model"] == "tiny"  # the first id of GET /v1/models
    assert report["label"] == "cli run" and report["transport"] == "sse"
    assert report["completed"] == 2 and report["total_output_tokens"] == 8
    assert "2/2" in done.stderr  # the progress bar goes to stderr, never into the JSON


@pytest.mark.parametrize("transport", ["sse", "ws", "rest"])
def test_unreachable_server_is_counted_not_raised(transport):
    report = bench("--url", f"http://127.0.0.1:{free_port()}", "--transport", transport, "--timeout", "5")
    assert report["completed"] == 0 and report["failed"] == NUM_REQUESTS
    assert report["total_output_tokens"] == 0 and report["output_throughput"] == 0
    assert report["median_ttft_ms"] is None
    assert report["errors"][0]["count"] == NUM_REQUESTS
    assert "connect" in report["errors"][0]["message"].lower()
    assert any("GET /v1/models failed" in note for note in report["notes"])


def test_api_key_is_sent_over_http_and_websocket():
    secured = LiveServer({"API_KEY": "bench-secret"})
    try:
        secured.wait_ready()
        for transport in ("sse", "ws"):
            report = bench("--url", secured.url, "--transport", transport, "--api-key", "bench-secret")
            assert report["completed"] == NUM_REQUESTS, report["errors"]
        refused = bench("--url", secured.url, "--model", "tiny", "--warmup", "0")
        assert refused["failed"] == NUM_REQUESTS
        assert refused["errors"][0]["message"].startswith("HTTP 401")
    finally:
        secured.stop()


def test_direct_runs_the_same_load_on_the_engine_in_process():
    report = bench("--direct", "--model", "tiny")
    assert report["transport"] == "direct" and report["url"] is None and report["engine"] == "hf"
    assert report["slots"] >= 1
    assert_complete_run(report)


def test_direct_profile_tables_the_engine_threads_operators(tmp_path):
    """--profile: the model runs on the engine's threads, so a table of this thread alone would hold no matmul."""
    table = tmp_path / "profile.txt"
    report = bench("--direct", "--model", "tiny", "--engine", "hf-cb", "--profile", str(table))
    assert_complete_run(report)
    text = table.read_text()
    assert "Self CPU" in text and "aten::mm" in text


def test_percentile_matches_numpy():
    rng = random.Random(7)
    for size in (1, 2, 5, 100, 1001):
        values = [rng.uniform(0, 50) for _ in range(size)]
        for q in (0, 50, 99, 100):
            assert percentile(values, q) == pytest.approx(numpy.percentile(values, q))


def test_tpot_excludes_the_first_token_and_failures_are_left_out_of_latencies():
    done = RequestResult(ok=True, ttft=0.1, e2el=0.5, itl=[0.2, 0.2], output_tokens=5, prompt_tokens=3)
    failed = RequestResult(ok=False, error="boom", e2el=9.0)
    summary = summarize([done, failed], duration=1.0)
    assert summary["mean_tpot_ms"] == pytest.approx(100.0)  # (500 ms - 100 ms) / (5 - 1)
    assert summary["mean_e2el_ms"] == pytest.approx(500.0)
    assert summary["completed"] == 1 and summary["failed"] == 1
    assert summary["errors"] == [{"message": "boom", "count": 1}]


def test_direct_slots_admit_waiters_in_arrival_order():
    """--direct queues like the server: a client that asks again goes behind those already waiting."""
    slots = FairSlots(2)
    admitted: list[int] = []
    running = peak = 0
    lock = threading.Lock()

    def client(number: int) -> None:
        nonlocal running, peak
        for _ in range(3):
            with slots:
                with lock:
                    admitted.append(number)
                    running += 1
                    peak = max(peak, running)
                time.sleep(0.01)
                with lock:
                    running -= 1

    slots.__enter__(), slots.__enter__()  # both slots busy: every client queues
    threads = []
    for number in range(4):
        threads.append(threading.Thread(target=client, args=(number,)))
        threads[-1].start()
        while slots._next_ticket < number + 3:  # wait until this client holds its ticket
            time.sleep(0.001)
    slots.__exit__(None, None, None), slots.__exit__(None, None, None)
    for thread in threads:
        thread.join()
    # An unfair semaphore lets clients 0 and 1 take their slots straight back: [0, 1, 0, 1, ...].
    assert admitted[:4] == [0, 1, 2, 3]
    assert sorted(admitted) == sorted(list(range(4)) * 3) and peak == 2
