"""The Gradio chat page (``run_webui.py``) as a client of a real daphne: a streamed multi-turn reply, readable
errors, and the page itself, started as ``python run_webui.py`` and driven over HTTP by ``gradio_client``.

The page runs in its own process, as users run it, and not only for realism: this test process has imported
Twisted (daphne), whose zope.interface marks ``abc.ABC`` with a ``__provides__`` descriptor that breaks the
construction of every Gradio component in the same process.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from itertools import pairwise

import gradio as gr
import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from playwright.sync_api import TimeoutError as PlaywrightTimeout

import run_webui
from tests.browser import chromium_browser
from tests.processes import LiveServer, Process, free_port

SECRET = "sk-webui-test-key"
# Gradio 6 keeps each turn's content as a list of parts; the page must flatten them into OpenAI messages.
HISTORY = [
    {"role": "user", "content": [{"type": "text", "text": "Tell me about rivers."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Rivers flow to the sea."}]},
]
ON_ONE_ENGINE = pytest.mark.parametrize("server", ["hf"], indirect=True)  # the page is engine-agnostic

# ``python run_webui.py ARGS`` with an audit hook that reports every name lookup or connection to a host other
# than this one: the page must reach nothing but the server it is pointed at (no analytics, no version check).
AUDITED_WEBUI = """
import runpy, sys
LOCAL = {"127.0.0.1", "localhost", "::1", "0.0.0.0", None}
def audit(event, args):
    if event in ("socket.getaddrinfo", "socket.connect"):
        host = args[0] if event == "socket.getaddrinfo" else args[1]
        host = host[0] if isinstance(host, tuple) else host
        host = host.decode() if isinstance(host, bytes) else host
        if host not in LOCAL:
            print("OUTSIDE", event, host, flush=True)
sys.addaudithook(audit)
sys.argv = ["run_webui.py", *sys.argv[1:]]
runpy.run_path("run_webui.py", run_name="__main__")
"""


def greedy(server: LiveServer, messages: list[dict], max_tokens: int) -> str:
    """The same request, not streamed, straight to the server: what the page must have shown."""
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def wait_for(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def raised_message(client, **params) -> str:
    with pytest.raises(gr.Error) as raised:
        list(run_webui.stream_reply(client, [{"role": "user", "content": "Hi"}], "tiny", **params))
    return raised.value.message


@pytest.fixture(scope="module")
def secured() -> Iterator[LiveServer]:
    """A server that wants ``API_KEY``; nothing here generates, so its model never loads."""
    server = LiveServer({"API_KEY": SECRET}).wait_ready()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(server) -> Iterator[tuple[str, Process]]:
    """``python run_webui.py`` on a free port, pointed at ``server`` the way people paste it (with ``/v1``)."""
    port = free_port()
    argv = [sys.executable, "-c", AUDITED_WEBUI, "--server-url", server.url + "/v1/", "--port", str(port)]
    webui = Process("webui", argv, {"API_KEY": ""})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert webui.alive() and time.monotonic() < deadline, webui.output()
            try:
                if httpx.get(url + "config", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url, webui
    finally:
        webui.stop()


@pytest.fixture(scope="module")
def chromium():
    with chromium_browser() as browser:
        yield browser


def test_chat_messages_flatten_gradio_history():
    assert run_webui.chat_messages("And lakes?", HISTORY, system_prompt="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about rivers."},
        {"role": "assistant", "content": "Rivers flow to the sea."},
        {"role": "user", "content": "And lakes?"},
    ]


def test_controls_gradio_has_not_rendered_mean_their_defaults():
    # A closed accordion's controls arrive as None: the first message must still go out, with the defaults.
    assert run_webui.chat_messages("Hi", None, None) == [{"role": "user", "content": "Hi"}]
    assert run_webui.chat_messages("Hi", [], "  ") == [{"role": "user", "content": "Hi"}]
    assert run_webui.sampling_params(None, None, None, None) == {"temperature": 0.7, "top_p": 1.0, "max_tokens": 256}


def test_an_empty_seed_sends_none_and_a_number_sends_it():
    for empty in (None, "", "   "):
        assert "seed" not in run_webui.sampling_params(0.7, 1, 16, empty), empty
    for filled, sent in (("1234", 1234), (" 0 ", 0), (-5, -5), (42.0, 42), (str(2**70), 2**70)):
        assert run_webui.sampling_params(0.7, 1, 16, filled)["seed"] == sent, filled
    with pytest.raises(gr.Error, match="whole number"):
        run_webui.sampling_params(0.7, 1, 16, "abc")


@ON_ONE_ENGINE
def test_stream_reply_grows_to_the_greedy_completion(server):
    messages = run_webui.chat_messages("And lakes?", HISTORY)
    client = run_webui.make_client(server.url)
    partials = list(run_webui.stream_reply(client, messages, "tiny", temperature=0, max_tokens=24))
    assert len(partials) >= 3, partials
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in pairwise(partials))
    assert partials[-1] and partials[-1] == greedy(server, messages, 24)


def test_key_is_sent_and_a_wrong_one_is_a_readable_error(secured):
    assert run_webui.list_models(run_webui.make_client(secured.url, SECRET)) == ["tiny"]

    wrong = run_webui.make_client(secured.url, "wrong")
    with pytest.raises(gr.Error) as raised:
        run_webui.list_models(wrong)
    assert raised.value.message.startswith("The server refused the request (401): "), raised.value.message
    message = raised_message(wrong)
    assert message.startswith("The server refused the request (401):") and "--api-key" in message, message
    assert "Traceback" not in message


def test_bad_request_and_server_down_are_readable(secured):
    message = raised_message(run_webui.make_client(secured.url, SECRET), seed=2**70)
    assert message == "The server refused the request (400): 'seed' must fit in 64 bits.", message

    down = f"http://127.0.0.1:{free_port()}"
    message = raised_message(run_webui.make_client(down, SECRET))
    assert message == f"Cannot reach the server at {down}/v1/: is it running? Start it with `make run`.", message


def test_arguments_default_from_the_environment(monkeypatch):
    for name in ("TRIPOD_SERVER_URL", "API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    args = run_webui.parse_args([])
    assert (args.server_url, args.api_key, args.host, args.port) == ("http://127.0.0.1:8000", "", "127.0.0.1", 7860)

    monkeypatch.setenv("TRIPOD_SERVER_URL", "http://gpu-box:8000")
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    assert run_webui.parse_args([]).api_key == "from-openai-env"
    monkeypatch.setenv("API_KEY", "from-api-key-env")
    args = run_webui.parse_args([])
    assert (args.server_url, args.api_key) == ("http://gpu-box:8000", "from-api-key-env")
    assert run_webui.parse_args(["--api-key", "flag", "--server-url", "http://x"]).api_key == "flag"


@ON_ONE_ENGINE
def test_page_lists_the_models_and_streams_a_reply(server, page):
    url, webui = page
    config = httpx.get(url + "config", timeout=10).json()
    model = next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == "model")
    assert (model["choices"], model["value"]) == ([["tiny", "tiny"]], "tiny")

    client = Client(url, verbose=False)
    assert client.predict("tiny", api_name="/refresh_models")["choices"] == [["tiny", "tiny"]]
    # message, model, system prompt, temperature, top_p, max_tokens, seed
    job = client.submit("Hello there", "tiny", "", 0, 1, 16, None, api_name="/chat")
    final = job.result(timeout=120)
    assert len(job.outputs()) >= 3, job.outputs()
    assert final and final == greedy(server, [{"role": "user", "content": "Hello there"}], 16)

    with pytest.raises(AppError, match=r"^The server refused the request \(400\): 'seed' must fit in 64 bits\.$"):
        client.predict("Hello there", "tiny", "", 0, 1, 16, 2**70, api_name="/chat")

    # The stop button: Gradio closes the reply's generator, which must cancel the generation on the server.
    # Greedy, because this prompt's greedy reply repeats one word and never samples the end of text.
    cancelled = server.output().count("finish_reason=cancelled")
    job = client.submit("Hello there", "tiny", "", 0, 1, 1000, None, api_name="/chat")
    assert wait_for(lambda: len(job.outputs()) >= 2), job.status()
    assert job.cancel()
    assert wait_for(lambda: server.output().count("finish_reason=cancelled") > cancelled, timeout=10)
    assert "OUTSIDE" not in webui.output() and "Traceback" not in webui.output(), webui.output()


# What Gradio shows for a failed event: a toast, or a bare red "Error" in the component's status tracker.
GRADIO_ERRORS = "[data-testid=toast-body], span.error"


def _reply_or_error(tab, index: int) -> str:
    """Wait until the ``index``-th bot message has finished (no stop button, the message box usable again) or
    Gradio shows an error; return that message's text."""
    tab.wait_for_function(
        """([i, errors]) => document.querySelector(errors) ||
                 (document.querySelectorAll('[data-testid=bot]').length > i &&
                  document.querySelectorAll('[data-testid=bot]')[i].innerText.trim() &&
                  !document.querySelector('[data-testid=stop-button]') &&
                  !document.querySelector('#message textarea').disabled)""",
        arg=[index, GRADIO_ERRORS],
        timeout=120_000,
    )
    errors = tab.locator(GRADIO_ERRORS).all_inner_texts()
    assert errors == [], errors
    return tab.locator("[data-testid=bot]").nth(index).inner_text()


def _set_max_tokens(tab, value: str) -> None:
    """Type ``value`` into the max_tokens box until Gradio holds it: the slider's range input shows a value once
    Gradio took it into its state, and a message sent before that would still carry 256. A box typed into while the
    accordion still renders can lose the value, so it is typed again (a few times at most)."""
    box = tab.locator("#max-tokens input[type=number]")
    for _ in range(5):
        box.fill(value)
        box.press("Enter")
        box.blur()
        try:
            tab.wait_for_function(
                "v => document.querySelector('#max-tokens input[type=range]').value === v", arg=value, timeout=3000
            )
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"Gradio never took max_tokens={value}")


@ON_ONE_ENGINE
def test_a_person_chats_in_chromium_before_and_after_opening_sampling(server, page, chromium):
    url, webui = page
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    try:
        tab = context.new_page()
        problems: list[str] = []
        tab.on("pageerror", lambda error: problems.append(str(error)))
        sent: list[list] = []  # the inputs of each chat call, as the page sends them to Gradio's queue
        tab.on("request", lambda r: "/queue/join" in r.url and sent.append(json.loads(r.post_data)["data"]))
        tab.goto(url)
        box = tab.locator("#message textarea")

        # The first message, "Sampling" never opened: a reply, no error.
        box.fill("Hello there")
        box.press("Enter")
        assert _reply_or_error(tab, 0)

        # Opened, the seed left empty: no seed goes out (a random reply); typed in, that seed.
        tab.get_by_text("Sampling").click()
        seed = tab.locator("#seed textarea, #seed input").first
        seed.wait_for()
        assert seed.input_value() == ""
        _set_max_tokens(tab, "8")
        box.fill("And again?")
        box.press("Enter")
        assert _reply_or_error(tab, 1)
        seed.fill("1234")
        box.fill("Once more.")
        box.press("Enter")
        assert _reply_or_error(tab, 2)
        seeds = [data[-1] for data in sent if len(data) == 8 and data[2] == "tiny"]
        assert len(seeds) == 3 and seeds[1] in (None, "") and seeds[2] == "1234", sent
        assert [data[6] for data in sent if len(data) == 8 and data[2] == "tiny"][1:] == [8, 8], sent
        assert problems == [], problems
    finally:
        context.close()
    assert "Traceback" not in webui.output() and "OUTSIDE" not in webui.output(), webui.output()
