"""The OpenAI-compatible API through a real daphne, driven by the official ``openai`` SDK and httpx."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import chat_body

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_chat_completion(client):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    assert response.object == "chat.completion"


def test_streamed_chat_matches_the_non_streamed_one(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1, "the reply arrives in pieces"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_text_completions_streamed_and_not(client):
    response = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 6
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == response.choices[0].text


def test_default_completion_length_is_16_tokens(client):
    # ignore_eos: a sampled EOS must not end it early; only the default length may.
    response = client.completions.create(model="tiny", prompt="Once", extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 16 and response.choices[0].finish_reason == "length"


def test_same_seed_same_output_through_the_server(client):
    def sample(seed: int) -> str:
        response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, seed=seed)
        return response.choices[0].message.content

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_stop_in_both_modes(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0.9, seed=5)
    text = full.choices[0].message.content
    stop = text[8:11]
    expected = text[: text.index(stop)]
    cut = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=30, temperature=0.9, seed=5, stop=stop
    )
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=30, temperature=0.9, seed=5, stop=[stop], stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_path_is_the_same_view(server):
    response = httpx.post(server.url + "/api/chat/completions", json=chat_body(max_tokens=3), timeout=60)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3


def test_healthz(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}


# --- bad input: a clear OpenAI-shaped error, never a 500 or a hang ---------------------------------


def post(server, body: bytes | dict, path: str = "/v1/chat/completions", **kwargs) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(server.url + path, json=body, timeout=30, **kwargs)
    return httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": "hello"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (chat_body(max_tokens=-5), "max_tokens"),
        (chat_body(max_tokens=10**12), "max_tokens"),
        (chat_body(temperature="warm"), "temperature"),
        (chat_body(n=9), "n"),
        (chat_body(presence_penalty=9), "presence_penalty"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat_body(unknown_knob=True), "unknown_knob"),
    ],
)
def test_invalid_bodies_get_400_naming_the_field(server, body, param):
    assert_error(post(server, body), 400, param=param)


def test_malformed_json_and_non_objects(server):
    assert_error(post(server, b'{"messages": [}'), 400, code="invalid_json")
    assert_error(post(server, b""), 400, code="invalid_json")
    assert_error(post(server, b"[1, 2]"), 400)
    assert_error(post(server, b"\xff\xfe"), 400, code="invalid_json")
    assert_error(post(server, b"[" * 60_000), 400, code="invalid_json")  # nesting deeper than the parser goes
    assert_error(post(server, b'{"max_tokens": ' + b"7" * 5000 + b"}"), 400, code="invalid_json")  # huge integer


def test_prompt_longer_than_the_context(server):
    huge = chat_body("word " * 2100)
    assert_error(post(server, huge), 400, param="messages", code="context_length_exceeded")
    assert_error(post(server, {**huge, "stream": True}), 400, code="context_length_exceeded")
    assert_error(post(server, chat_body(max_tokens=2048)), 400, param="max_tokens", code="context_length_exceeded")


def test_body_over_the_size_limit_gets_413(server):
    big = chat_body("x" * 70_000)
    assert_error(post(server, big), 413, code="request_too_large")


def test_unknown_model_gets_404(server, client):
    assert_error(post(server, {**chat_body(), "model": "gpt-17"}), 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=MESSAGES)


def test_wrong_method_and_unknown_path(server):
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)


def test_curl_style_form_content_type_is_still_json(server):
    response = httpx.post(
        server.url + "/v1/completions",
        content=b'{"prompt": "hi", "max_tokens": 2}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
