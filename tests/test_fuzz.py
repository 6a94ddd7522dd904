"""Property-based fuzzing of request bodies: whatever a client sends, no 5xx and no hang."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot", "", None]), json_values)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": st.one_of(st.text(max_size=40), json_values)},
        optional={"name": json_values, "tool_call_id": json_values, "tool_calls": json_values},
    ),
    max_size=4,
)
# Bodies close to valid ones: right field names, any values. Generation is bounded so the fuzz stays fast.
near_valid = st.fixed_dictionaries(
    {"messages": messages, "max_tokens": st.one_of(st.integers(1, 4), json_values)},
    optional={
        "model": st.one_of(st.just("tiny"), json_values),
        "temperature": json_values,
        "top_p": json_values,
        "stop": json_values,
        "seed": json_values,
        "n": json_values,
        "presence_penalty": json_values,
        "frequency_penalty": json_values,
        "stream": st.booleans(),
        "stream_options": json_values,
        "logprobs": json_values,
        "user": json_values,
    },
)


def check(server, path: str, body: bytes) -> None:
    response = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code < 500, (body, response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=near_valid)
def test_chat_bodies_never_5xx(server, body):
    # A null max_tokens means "up to the context length": keep accepted bodies short.
    if body.get("max_tokens") is None:
        body["max_tokens"] = 2
    check(server, "/v1/chat/completions", json.dumps(body).encode())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_arbitrary_json_never_5xx(server, path, body):
    if isinstance(body, dict):
        body = {**body, "max_tokens": 2}
    check(server, path, json.dumps(body).encode())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_5xx(server, raw):
    check(server, "/v1/chat/completions", raw)
