#!/usr/bin/env python
"""The seed's Gradio demo: ``python run_webui.py [--server-url URL] [--api-key KEY] [--host H] [--port P]``.

A chat page that is an ordinary client of this server's OpenAI-compatible API, through the official ``openai`` SDK:
that is what users' own code calls, it turns every error the server sends into a typed exception, and so the demo
also checks that the API is what the SDK expects. Nothing here reaches past that server: Gradio's analytics, version
check, run-history page (which can upload to the Hugging Face hub) and ``share`` link are off.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

# Before gradio is imported: it reads this at import and at every Blocks() it builds.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
# The SDK refuses to run without a key; a server with no key configured ignores the header.
NO_KEY = "unused"
# The sampling controls' initial values, and what a control Gradio has not rendered yet (``None``) stands for.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_TOKENS = 256


def make_client(server_url: str, api_key: str = "") -> openai.OpenAI:
    """An SDK client for ``server_url`` (with or without ``/v1``). No retries: the person at the page is the
    retry loop, and a retried 429 or dead server would only delay the error they need to see."""
    base_url = server_url.rstrip("/").removesuffix("/v1") + "/v1"
    timeout = httpx.Timeout(300, connect=5)  # the read timeout is between two chunks, not for the reply
    return openai.OpenAI(base_url=base_url, api_key=api_key or NO_KEY, max_retries=0, timeout=timeout)


def readable_error(error: openai.OpenAIError, server_url: str) -> str:
    """One sentence for a person, from whatever the SDK raised: never a traceback."""
    if isinstance(error, openai.APITimeoutError):
        return f"The server at {server_url} did not answer in time."
    if isinstance(error, openai.APIConnectionError):
        return f"Cannot reach the server at {server_url}: is it running? Start it with `make run`."
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        detail = body.get("message") or error.message
        text = f"The server refused the request ({error.status_code}): {detail}"
        if error.status_code == 401:
            text += " Pass a valid key with --api-key or the API_KEY environment variable."
        elif error.status_code == 429 and error.response.headers.get("retry-after"):
            text += f" Try again in {error.response.headers['retry-after']} s."
        return text
    if isinstance(error, openai.APIError):  # an error frame in the middle of a stream
        return f"The server stopped the reply: {error.message}"
    return f"The request failed: {error}"


def user_error(message: str, title: str) -> gr.Error:
    """What the page shows for a failure: the message, until closed. Gradio prints no traceback for it: these
    are expected (a wrong key, a server that is down), not bugs in the page."""
    return gr.Error(message, duration=None, title=title, print_exception=False)


def list_models(client: openai.OpenAI) -> list[str]:
    """The ids ``GET /v1/models`` lists; raises ``gr.Error`` with a readable message when it cannot."""
    try:
        return [model.id for model in client.models.list()]
    except openai.OpenAIError as error:
        raise user_error(readable_error(error, str(client.base_url)), "Model list") from None


def text_of(content: str | list | dict | None) -> str:
    """The text of a chat message as Gradio holds it: a string, or (Gradio 6) a list of parts, of which
    only text parts (``{"type": "text", "text": ...}``) mean anything to a text model."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, list | tuple):
        return "".join(text_of(part) for part in content if isinstance(part, str | dict))
    return ""


def chat_messages(message: str, history: list[dict] | None, system_prompt: str | None = "") -> list[dict[str, str]]:
    """The OpenAI ``messages`` for a new user turn after Gradio's ``history`` (role/content dicts). Any
    optional input may be ``None``: Gradio sends that for a control it has not rendered (a closed accordion)."""
    system_prompt = (system_prompt or "").strip()
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for turn in history or []:
        text = text_of(turn.get("content"))
        if turn.get("role") in ("user", "assistant") and text:
            messages.append({"role": turn["role"], "content": text})
    messages.append({"role": "user", "content": text_of(message)})
    return messages


def sampling_params(
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: float | None = None,
    seed: str | int | None = None,
) -> dict[str, float | int]:
    """The sampling fields of a request from the page's controls. ``None`` (a control Gradio has not
    rendered) is the control's default; an empty seed sends no ``seed`` (a random reply), a number sends it;
    anything else raises ``gr.Error`` rather than being dropped."""
    params: dict[str, float | int] = {
        "temperature": DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        "top_p": DEFAULT_TOP_P if top_p is None else float(top_p),
        "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens),
    }
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    text = "" if seed is None else str(seed).strip()
    if text:
        try:
            params["seed"] = int(text)
        except ValueError:
            raise user_error(
                f"The seed must be a whole number, or empty for a random reply; got {text!r}.", "Seed"
            ) from None
    return params


def stream_reply(
    client: openai.OpenAI,
    messages: list[dict[str, str]],
    model: str,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: float | None = None,
    seed: str | int | None = None,
) -> Iterator[str]:
    """Yield the assistant's reply so far, growing by each streamed delta; raise ``gr.Error`` with a readable
    message on any failure. Closing the generator closes the stream, which cancels the generation."""
    if not model:
        raise user_error("No model to talk to: the server listed none. Press “Refresh models”.", "No model")
    params = sampling_params(temperature, top_p, max_tokens, seed)
    reply = ""
    try:
        with client.chat.completions.create(model=model, messages=messages, stream=True, **params) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    reply += chunk.choices[0].delta.content
                    yield reply
    except openai.OpenAIError as error:
        raise user_error(readable_error(error, str(client.base_url)), "Server error") from None
    if not reply:
        yield ""  # the model ended at once: show an empty turn rather than nothing


def build_app(server_url: str = DEFAULT_SERVER_URL, api_key: str = "") -> gr.Blocks:
    """The chat page: a model list from the server (with a refresh), sampling controls, and a chat that
    streams each reply and sends the whole conversation as ``messages``."""
    client = make_client(server_url, api_key)
    try:
        models = list_models(client)
    except gr.Error as error:  # the page still starts; "Refresh models" tries again
        print(f"run_webui: {error.message}", file=sys.stderr)
        models = []

    def refresh_models(current: str | None) -> gr.Dropdown:
        choices = list_models(client)
        return gr.Dropdown(choices=choices, value=current if current in choices else (choices or [None])[0])

    def respond(message, history, model, system_prompt, temperature, top_p, max_tokens, seed):
        messages = chat_messages(message, history, system_prompt)
        yield from stream_reply(
            client, messages, model, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
        )

    with gr.Blocks(title="AI Tripod", analytics_enabled=False) as app:
        gr.Markdown(f"## AI Tripod chat\nTalking to `{client.base_url}`.")
        with gr.Row(equal_height=True):
            model = gr.Dropdown(
                choices=models, value=models[0] if models else None, label="Model", elem_id="model", scale=4
            )
            refresh = gr.Button("Refresh models", scale=1)
        with gr.Accordion("Sampling", open=False):
            system_prompt = gr.Textbox(label="System prompt", placeholder="(none)", lines=2)
            with gr.Row():
                temperature = gr.Slider(0, 2, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=DEFAULT_TOP_P, step=0.05, label="top_p")
                max_tokens = gr.Slider(
                    1, 4096, value=DEFAULT_MAX_TOKENS, step=1, label="max_tokens", elem_id="max-tokens"
                )
                # A text box, not gr.Number: a Number shows and sends 0 for "empty", so no reply would be random.
                seed = gr.Textbox(value="", label="Seed (empty: random)", placeholder="random", elem_id="seed")
        refresh.click(refresh_models, inputs=model, outputs=model, api_name="refresh_models")
        gr.ChatInterface(
            respond,
            additional_inputs=[model, system_prompt, temperature, top_p, max_tokens, seed],
            textbox=gr.Textbox(placeholder="Message AI Tripod…", show_label=False, elem_id="message"),
            analytics_enabled=False,
            # The server queues and rate-limits; the page should not serialize its users on top of that.
            concurrency_limit=None,
            api_name="chat",
        )
    return app


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A Gradio chat page that is a client of an AI Tripod server.")
    parser.add_argument(
        "--server-url",
        default=os.environ.get("TRIPOD_SERVER_URL", DEFAULT_SERVER_URL),
        help=f"the server's base URL (default: $TRIPOD_SERVER_URL, else {DEFAULT_SERVER_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("API_KEY") or os.environ.get("OPENAI_API_KEY", ""),
        help="the key to send (default: $API_KEY, then $OPENAI_API_KEY; empty: none)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address the page listens on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="the page's port (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    app = build_app(args.server_url, args.api_key)
    app.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, run_history=False)


if __name__ == "__main__":
    main(sys.argv[1:])
