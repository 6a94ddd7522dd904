"""Metrics, JSON logs with request ids, and the OpenAPI document, on a real daphne."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import websockets
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import chat_body
from tests.processes import ROOT, LiveServer


@pytest.fixture(scope="module")
def observed():
    server = LiveServer({"TRIPOD_MAX_TOKENS_CAP": "64"}).wait_ready()
    try:
        yield server
    finally:
        server.stop()


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(metrics: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted({"model": "tiny", **labels}.items())))
    return metrics.get(key, 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_follow_requests_on_every_transport(observed):
    before = scrape(observed)
    rest = httpx.post(observed.url + "/v1/chat/completions", json=chat_body(max_tokens=7), timeout=60).json()
    httpx.post(observed.url + "/v1/chat/completions", json=chat_body(max_tokens=5, stream=True), timeout=60)

    async def ws() -> None:
        async with websockets.connect(observed.ws_url + "/ws/chat/") as socket:
            await socket.send(json.dumps({"type": "chat", "id": 1, **chat_body(max_tokens=3)}))
            while json.loads(await socket.recv())["type"] != "done":
                pass

    asyncio.run(ws())
    bad = httpx.post(observed.url + "/v1/chat/completions", json=chat_body("word " * 2100), timeout=60)
    assert bad.status_code == 400
    after = scrape(observed)

    for transport, tokens in (("rest", 7), ("sse", 5), ("ws", 3)):
        assert delta(before, after, "tripod:request_success_total", transport=transport, finished_reason="length") == 1
        assert delta(before, after, "tripod:generation_tokens_total", transport=transport) == tokens
        assert delta(before, after, "tripod:time_to_first_token_seconds_count", transport=transport) == 1
        assert delta(before, after, "tripod:e2e_request_latency_seconds_count", transport=transport) == 1
        assert delta(before, after, "tripod:request_queue_time_seconds_count", transport=transport) == 1
        # Every token after the first has an inter-token latency.
        assert delta(before, after, "tripod:inter_token_latency_seconds_count", transport=transport) == tokens - 1
        assert value(after, "tripod:num_requests_running", transport=transport) == 0
        assert value(after, "tripod:num_requests_waiting", transport=transport) == 0
    assert delta(before, after, "tripod:prompt_tokens_total", transport="rest") == rest["usage"]["prompt_tokens"]
    assert delta(before, after, "tripod:request_errors_total", transport="rest", code="context_length_exceeded") == 1
    assert any(name == "tripod:worker_slots" and slots >= 1 for (name, _), slots in after.items())


def test_a_cancelled_stream_is_counted_as_cancelled(observed):
    before = scrape(observed)
    body = chat_body(max_tokens=64, ignore_eos=True, stream=True)
    with httpx.stream("POST", observed.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                break
    deadline = time.monotonic() + 10
    while True:
        after = scrape(observed)
        if delta(before, after, "tripod:request_success_total", transport="sse", finished_reason="cancelled") == 1:
            break
        assert time.monotonic() < deadline, "the cancellation was never counted"
        time.sleep(0.1)
    assert value(after, "tripod:num_requests_running", transport="sse") == 0


def test_every_log_line_is_json_with_the_request_id(observed):
    request_id = "trace-abc.123"
    response = httpx.post(
        observed.url + "/v1/chat/completions",
        json=chat_body("a secret prompt about otters", max_tokens=4),
        headers={"X-Request-ID": request_id},
        timeout=60,
    )
    assert response.headers["x-request-id"] == request_id
    completion = response.json()["choices"][0]["message"]["content"]
    generated = httpx.get(observed.url + "/healthz").headers["x-request-id"]
    assert len(generated) == 32, "a request without an id gets one"
    time.sleep(0.3)
    lines = [line for line in observed.output().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line parses
    assert all("request_id" in entry for entry in entries)
    mine = [entry for entry in entries if entry["request_id"] == request_id]
    generation = next(entry for entry in mine if entry.get("event") == "generation")
    assert generation["model"] == "tiny" and generation["transport"] == "rest" and generation["status"] == "ok"
    assert generation["completion_tokens"] == 4 and generation["prompt_tokens"] > 0
    assert generation["ttft_ms"] > 0 and generation["duration_ms"] >= generation["ttft_ms"]
    # The worker logs under the same request id.
    assert any(entry["logger"] == "asgi_worker.loop" for entry in mine)
    assert any(entry.get("event") == "http" and entry["status"] == 200 for entry in mine)
    # No prompt or completion text unless TRIPOD_LOG_CONTENT=1.
    assert "otters" not in observed.output()
    assert completion not in observed.output() or len(completion) < 3


def test_log_content_when_asked():
    server = LiveServer({"TRIPOD_LOG_CONTENT": "1"}).wait_ready()
    try:
        httpx.post(server.url + "/v1/chat/completions", json=chat_body("otters", max_tokens=2), timeout=60)
        generation = [json.loads(line) for line in server.output().splitlines() if '"generation"' in line][-1]
        assert generation["prompt"][0]["content"] == "otters" and "completion" in generation
    finally:
        server.stop()


def test_openapi_document_is_valid_and_complete(observed):
    document = httpx.get(observed.url + "/v1/openapi.json", timeout=30).json()
    validate(document)
    paths = document["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}", "/v1/usage"):
        assert path in paths
    chat = paths["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    error = chat["responses"]["400"]["content"]["application/json"]["schema"]
    assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    assert "messages" in chat["requestBody"]["content"]["application/json"]["schema"]["required"]
    docs = httpx.get(observed.url + "/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_schemathesis_finds_no_server_error(observed):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            observed.url + "/v1/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--request-timeout",
            "30",
            "--suppress-health-check",
            "all",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_grafana_dashboard_uses_only_exported_metrics(observed):
    import re

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tripod.json").read_text())
    used = {
        re.sub(r"_bucket$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"tripod:[a-z0-9_]+", target["expr"])
    }
    text = httpx.get(observed.url + "/metrics", timeout=30).text
    # Families are listed (HELP/TYPE) even before a labelled metric has its first sample.
    families = {family.name for family in text_string_to_metric_families(text)}
    exported = families | {name + "_total" for name in families}
    assert len(used) >= 10 and used <= exported, used - exported


def test_readyz_says_why_a_model_failed_to_load(tmp_path):
    server = LiveServer({"TRIPOD_MODEL": str(tmp_path / "no-model-here")}).wait_ready()
    try:
        deadline = time.monotonic() + 30
        while True:
            body = httpx.get(server.url + "/readyz", timeout=30).json()
            if "failed" in body["checks"]["model"]["error"]:
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
        assert body["status"] == "not_ready" and body["missing"] == ["model"]
    finally:
        server.stop()
