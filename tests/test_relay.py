"""The ``openai`` engine relays to an OpenAI-compatible upstream: here, a second instance of this server."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from tests.conftest import chat_body
from tests.processes import Cluster, LiveServer

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


def relay_front(cluster: Cluster, served_name: str, upstream_model: str, **upstream: str) -> LiveServer:
    """A web process that serves ``served_name`` through an ``openai``-engine worker, which asks the upstream that
    ``upstream`` (its ``TRIPOD_UPSTREAM_*`` variables) names for ``upstream_model``."""
    front = cluster.web(TRIPOD_SERVED_MODEL_NAME=served_name)
    cluster.worker("--engine", "openai", "--model", upstream_model, "--served-model-name", served_name, **upstream)
    return front


@pytest.fixture(scope="module")
def relay(redis_module):
    """upstream: an embedded Tripod on the tiny model; front: web + an ``openai``-engine worker."""
    with LiveServer() as upstream, Cluster(redis_module) as cluster:
        upstream.wait_ready()
        upstream_env = {"TRIPOD_UPSTREAM_URL": upstream.url + "/v1", "TRIPOD_UPSTREAM_API_KEY": "sk-upstream"}
        yield upstream, relay_front(cluster, "relayed", "tiny", **upstream_env)


def clients(relay) -> tuple[openai.OpenAI, openai.OpenAI]:
    upstream, front = relay
    make = lambda url: openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)  # noqa: E731
    return make(upstream.url), make(front.url)


def test_relayed_completions_match_the_upstream(relay):
    direct, relayed = clients(relay)
    assert [m.id for m in relayed.models.list()] == ["relayed"]
    want = direct.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    got = relayed.chat.completions.create(model="relayed", messages=MESSAGES, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage == want.usage
    assert got.model == "relayed"
    stream = relayed.chat.completions.create(
        model="relayed",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert chunks[-1].usage == want.usage
    text = relayed.completions.create(model="relayed", prompt="Once upon", max_tokens=5, temperature=0)
    assert (
        text.choices[0].text
        == direct.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0).choices[0].text
    )


def test_seed_and_stop_pass_through(relay):
    direct, relayed = clients(relay)
    want = direct.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, seed=4)
    text = want.choices[0].message.content
    stop = text[6:9]
    got = relayed.chat.completions.create(model="relayed", messages=MESSAGES, max_tokens=20, seed=4, stop=stop)
    assert got.choices[0].message.content == text[: text.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_upstream_errors_keep_their_status_and_code(relay):
    _, front = relay
    response = httpx.post(front.url + "/v1/chat/completions", json={**chat_body("word " * 2100), "model": "relayed"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_a_client_leaving_the_front_cancels_the_upstream_generation(relay):
    upstream, front = relay
    body = {**chat_body(max_tokens=1900, ignore_eos=True, stream=True), "model": "relayed"}
    with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                break
    deadline = time.monotonic() + 10
    while "finish_reason=cancelled" not in upstream.output():
        assert time.monotonic() < deadline, "the upstream never stopped"
        time.sleep(0.05)
    line = [entry for entry in upstream.output().splitlines() if "finish_reason=cancelled" in entry][-1]
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 1900


def test_an_upstream_that_refuses_this_server_is_a_502_not_the_clients_fault(relay, redis_module):
    upstream, _ = relay
    with Cluster(redis_module) as cluster:
        upstream_env = {"TRIPOD_UPSTREAM_URL": upstream.url + "/v1"}
        front = relay_front(cluster, "misconfigured", "no-such-upstream-model", **upstream_env)
        response = httpx.post(front.url + "/v1/chat/completions", json={**chat_body(), "model": "misconfigured"})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_error"
