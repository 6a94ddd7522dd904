"""The chat page at ``/`` in real headless Chromium, against a real daphne serving the tiny model with each engine.

Each transport is used the way a person would: type, press Enter, watch the reply grow, press Stop. The
SSE reply also survives a cut network: a TCP relay between browser and server drops every connection
mid-stream, the browser's EventSource reconnects by itself, and the finished text must equal the same
seeded request made without interruption (no gap, no repeat). The tests also take the screenshots the
README shows: into var/screenshots/ by default, so that a test run leaves the tree clean, and into
docs/img/ with ``TRIPOD_SCREENSHOT_DIR=docs/img``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.browser import ChatPage, chromium_browser
from tests.processes import ROOT, LiveServer
from tests.tcp_proxy import TCPProxy

IMAGES = ROOT / os.environ.get("TRIPOD_SCREENSHOT_DIR", "var/screenshots")
PROMPT = "Tell me about rivers."
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
TRANSPORTS = ["ws", "sse"]
SAMPLING = {"temperature": 1.0, "seed": 1234}
LENGTH = 120  # tokens of the replies compared with REST: enough to see them grow, and to cut one mid-stream


@pytest.fixture(scope="module")
def chromium():
    with chromium_browser() as browser:
        yield browser


def _serve(env: dict[str, str] | None = None) -> LiveServer:
    live = LiveServer({"TRIPOD_LOG_LEVEL": "WARNING", **(env or {})})
    live.wait_ready()
    return live


@pytest.fixture(scope="module", params=["hf", "hf-cb"])
def live(request) -> Iterator[LiveServer]:
    """An open server (no key) on the embedded defaults with each engine, model loaded."""
    server = _serve({"TRIPOD_ENGINE": request.param})
    try:
        httpx.post(server.url + "/v1/completions", json={"prompt": "warm", "max_tokens": 1}, timeout=120)
        yield server
    finally:
        server.stop()


@pytest.fixture
def chat(chromium, live) -> Iterator[ChatPage]:
    """A fresh browser context (empty localStorage) on the page; fails the test on any console error."""
    context = chromium.new_context(viewport=DESKTOP)
    page = ChatPage(context.new_page(), live.url)
    try:
        yield page
    finally:
        context.close()
    assert page.problems == [], "the page logged errors (a CSP violation, a failed request, a script error)"


_expected: dict[tuple[str, str], str] = {}


def expected_reply(live: LiveServer, messages: list[dict], max_tokens: int, sampling: dict = SAMPLING) -> str:
    """What the same seeded request gives over plain REST: the text the page must end up showing. (Seeded
    sampling rather than greedy: the tiny model's greedy text repeats itself, which could hide a repeat.)
    Asked once per distinct request: several tests compare against the same one."""
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, **sampling}
    key = (live.url, json.dumps(body, sort_keys=True))
    if key not in _expected:
        response = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
        response.raise_for_status()
        _expected[key] = response.json()["choices"][0]["message"]["content"]
    return _expected[key]


# --- the page and its assets, over plain HTTP -------------------------------------------------------------


def test_page_and_assets_are_served_with_a_strict_policy(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy
    assert f"connect-src 'self' ws://127.0.0.1:{live.port} wss://127.0.0.1:{live.port}" in policy
    html = page.text
    assert '<meta name="viewport"' in html
    # No inline script or style: everything the page runs comes from /ui/.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html and " style=" not in html
    assets = re.findall(r'"/ui/([\w.]+)\?v=(\w+)"', html)
    assert sorted(name for name, _ in assets) == ["chat.css", "chat.js", "markdown.js"]
    for name, version in assets:
        first = httpx.get(f"{live.url}/ui/{name}?v={version}")
        assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
        assert first.headers["etag"] == f'"{version}"'
        assert first.headers["content-type"].startswith("text/css" if name.endswith(".css") else "text/javascript")
        again = httpx.get(f"{live.url}/ui/{name}", headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    # Only the whitelisted names exist; nothing from the URL reaches the filesystem.
    for name in ["pages.py", "chat.html", "..%2Fpages.py", "%2E%2E%2Fsettings.py", "chat.js.map"]:
        assert httpx.get(f"{live.url}/ui/{name}").status_code == 404
    assert httpx.post(live.url + "/", json={}).status_code == 405


def test_markdown_is_rendered_and_nothing_in_it_runs(chat):
    chat.open()
    cases = {
        "block": "# Title\n\nSome **bold**, *italic* and `x < y` code.\n\n- one\n- two\n\n1. first\n2. second",
        "code": "```python\nprint('<b>hi</b>')\n```",
        "unclosed": "Streaming:\n```\nstill inside",
        "link": "[docs](https://example.com/a_b?x=1&y=2) and https://example.org.",
        "attack": (
            '<script>alert(1)</script><img src=x onerror="alert(1)"> [x](javascript:alert(1)) '
            '[y](https://a.b/"onmouseover="alert(1)) <a href="javascript:alert(1)">z</a>'
        ),
        "table": "Counts:\n| River | Length \\| km |\n|:--|--:|\n| **Nile** | 6650 |\n| Amazon |\n\nAfter.",
        "not a table": "a | b\nno delimiter row",
        "table attack": '| <script>alert(1)</script> | x |\n|---|---|\n| <img src=x onerror="alert(1)"> | y |',
    }
    rendered = chat.page.evaluate(
        """async (cases) => {
            const { renderMarkdown } = await import('/ui/markdown.js');
            const out = {};
            for (const [name, source] of Object.entries(cases)) {
                const box = document.createElement('div');
                box.innerHTML = renderMarkdown(source);
                out[name] = {
                    html: box.innerHTML,
                    tags: [...box.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()),
                    attributes: [...box.querySelectorAll('*')].flatMap((e) => e.getAttributeNames()),
                    hrefs: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href')),
                    text: box.textContent,
                };
            }
            return out;
        }""",
        cases,
    )
    block = rendered["block"]
    assert block["tags"] == ["h1", "p", "strong", "em", "code", "ul", "li", "li", "ol", "li", "li"]
    assert "<code>x &lt; y</code>" in block["html"]
    code = rendered["code"]
    assert code["tags"] == ["pre", "code"] and code["text"] == "print('<b>hi</b>')"
    unclosed = rendered["unclosed"]  # a fence still streaming runs to the end of the text
    assert unclosed["tags"] == ["p", "pre", "code"] and unclosed["text"] == "Streaming:still inside"
    assert rendered["link"]["hrefs"] == ["https://example.com/a_b?x=1&y=2", "https://example.org"]
    attack = rendered["attack"]
    assert set(attack["tags"]) <= {"p", "a"}
    assert all(href.startswith("https://") for href in attack["hrefs"])
    assert set(attack["attributes"]) <= {"href", "target", "rel"}
    assert "<script>alert(1)</script>" in attack["text"]  # shown as text, not run
    table = rendered["table"]
    rows = ["thead", "tr", "th", "th", "tbody", "tr", "td", "strong", "td", "tr", "td", "td"]
    assert table["tags"] == ["p", "div", "table", *rows, "p"]
    assert '<th class="align-left">River</th><th class="align-right">Length | km</th>' in table["html"]
    assert '<td class="align-left">Amazon</td><td class="align-right"></td>' in table["html"]
    assert rendered["not a table"]["tags"] == ["p", "br"]
    table_attack = rendered["table attack"]
    assert set(table_attack["attributes"]) == {"class"} and "script" not in table_attack["tags"]
    assert "<script>alert(1)</script>" in table_attack["text"]


# --- streaming over each transport --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_reply_streams_in_and_shows_its_numbers(chat, live, transport):
    chat.open()
    chat.configure(transport=transport, max_tokens=LENGTH, ignore_eos=True, **SAMPLING)
    chat.record_growth()
    reply = chat.send(PROMPT)
    assert chat.wait_state(reply, "done", "error") == "done"
    raw = reply.get_attribute("data-raw")
    assert raw == expected_reply(live, [{"role": "user", "content": PROMPT}], LENGTH)
    # The text arrived in pieces, each a longer prefix: it streamed, it was not shown all at once.
    lengths = chat.growth()
    assert lengths == sorted(lengths)
    assert len({n for n in lengths if 0 < n < len(raw)}) >= 2, lengths
    assert reply.get_attribute("data-transport") == transport
    assert reply.get_attribute("data-finish-reason") == "length"
    assert reply.get_attribute("data-tokens") == str(LENGTH)
    assert float(reply.get_attribute("data-tps")) > 0 and int(reply.get_attribute("data-ttft-ms")) >= 0
    meta = reply.locator(".meta").inner_text()
    assert f"{LENGTH} tokens" in meta and "tok/s" in meta and "TTFT" in meta and "max tokens reached" in meta
    assert chat.page.is_visible("#send") and chat.page.is_hidden("#stop")

    # The next turn sends the whole conversation; temperature 0 is sent as 0 (greedy), not dropped.
    chat.configure(temperature=0, max_tokens=20)
    second = chat.send("And about lakes?")
    assert chat.wait_state(second, "done", "error") == "done"
    history = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": raw},
        {"role": "user", "content": "And about lakes?"},
    ]
    assert second.get_attribute("data-raw") == expected_reply(live, history, 20, {**SAMPLING, "temperature": 0})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stop_ends_the_generation_on_the_server(chat, live, transport):
    chat.open()
    chat.configure(transport=transport, max_tokens=1500, ignore_eos=True)
    reply = chat.send("Write a very long story.")
    chat.wait_text(reply, 1)
    assert chat.page.is_visible("#stop") and chat.page.is_hidden("#send")
    chat.page.click("#stop")
    assert chat.wait_state(reply, "stopped", "done", "error", timeout=30_000) == "stopped"
    assert reply.get_attribute("data-finish-reason") == "cancelled"
    # The count comes from the server's usage: the tokens it really generated before it stopped.
    generated = int(reply.get_attribute("data-tokens"))
    assert 0 < generated < 1500
    text = reply.get_attribute("data-raw")
    chat.page.wait_for_timeout(500)
    assert reply.get_attribute("data-raw") == text
    assert "stopped" in reply.locator(".meta").inner_text()
    assert chat.page.is_visible("#send") and chat.page.is_hidden("#stop")
    # And nothing is left running (the gauge settles just after the last frame goes out).
    idle = re.compile(r'^tripod:num_requests_running\{[^}]*transport="' + transport + r'"[^}]*\} 0\.0$', re.M)
    deadline = time.monotonic() + 10
    while not idle.search(httpx.get(live.url + "/metrics").text):
        assert time.monotonic() < deadline, "a stopped generation is still counted as running"
        time.sleep(0.1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refused_request_shows_the_servers_error(chat, live, transport):
    chat.open()
    chat.configure(transport=transport, max_tokens=100_000)
    reply = chat.send(PROMPT)
    assert chat.wait_state(reply, "error", "done") == "error"
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 100_000}
    error = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60).json()["error"]
    shown = reply.locator(".error").inner_text()
    assert error["message"] in shown and error["code"] in shown
    # The failed turn is not part of the conversation: the next one is answered as if it never happened.
    chat.configure(max_tokens=10, ignore_eos=True, **SAMPLING)
    second = chat.send("Hello")
    assert chat.wait_state(second, "done", "error") == "done"
    assert second.get_attribute("data-raw") == expected_reply(live, [{"role": "user", "content": "Hello"}], 10)
    # SSE's refused POST is a failed request in the console; nothing else may be.
    chat.problems[:] = [p for p in chat.problems if not (transport == "sse" and "status of 400" in p)]


def test_an_sse_reply_survives_a_cut_connection(chromium, live):
    proxy = TCPProxy(live.port)
    context = chromium.new_context(viewport=DESKTOP)
    try:
        chat = ChatPage(context.new_page(), proxy.url).open()
        chat.configure(transport="sse", max_tokens=LENGTH, ignore_eos=True, **SAMPLING)
        # The stream's response stops after a few frames (perhaps mid-frame), whatever the model's speed.
        proxy.hold_stream(after_bytes=2500)
        reply = chat.send(PROMPT)
        assert proxy.held.wait(60)
        before = chat.wait_text(reply, 1)
        assert reply.get_attribute("data-state") == "streaming"
        connections = proxy.accepted
        proxy.cut()
        assert chat.wait_state(reply, "done", "error") == "done"
        raw = reply.get_attribute("data-raw")
        assert raw.startswith(before) and len(raw) > len(before)
        assert raw == expected_reply(live, [{"role": "user", "content": PROMPT}], LENGTH), "a gap or a repeat"
        # It really reconnected, and told the server where it was.
        assert int(reply.get_attribute("data-reconnects")) >= 1
        assert proxy.accepted > connections
        reads = [headers for method, target, headers in proxy.requests() if target.startswith("/v1/streams/")]
        assert len(reads) >= 2 and "last-event-id" not in reads[0]
        assert int(reads[1]["last-event-id"]) >= 1
        assert "resumed" in reply.locator(".meta").inner_text()
        # The browser reports the cut connection; nothing else may go wrong.
        assert [p for p in chat.problems if "net::ERR_" not in p] == []
    finally:
        context.close()
        proxy.close()


# --- the conversation: kept across reloads, copied, regenerated -------------------------------------------


def test_the_conversation_survives_a_reload_and_new_chat_clears_it(chat, live):
    chat.open()
    chat.configure(max_tokens=12, ignore_eos=True, **SAMPLING)
    first = chat.send(PROMPT)
    assert chat.wait_state(first, "done", "error") == "done"
    raw = first.get_attribute("data-raw")
    chat.page.reload()
    chat.page.wait_for_selector("#app[data-models=ready]")
    assert chat.page.locator(".msg.user").all_inner_texts() == [PROMPT]
    restored = chat.page.locator(".msg.assistant")
    assert restored.count() == 1 and restored.get_attribute("data-raw") == raw
    assert "12 tokens" in restored.locator(".meta").inner_text()
    # The restored turns are the conversation: the next request carries them. (The seed and ignore_eos are
    # per-session choices that a reload does not keep.)
    chat.configure(ignore_eos=True, seed=SAMPLING["seed"])
    second = chat.send("And about lakes?")
    assert chat.wait_state(second, "done", "error") == "done"
    history = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": raw},
        {"role": "user", "content": "And about lakes?"},
    ]
    assert second.get_attribute("data-raw") == expected_reply(live, history, 12)

    chat.page.click("#new-chat")
    chat.page.reload()
    chat.page.wait_for_selector("#app[data-models=ready]")
    assert chat.page.locator(".msg").count() == 0 and chat.page.is_visible("#empty")


def test_regenerate_replaces_the_last_reply(chat, live):
    chat.open()
    chat.configure(max_tokens=12, ignore_eos=True, **SAMPLING)
    first = chat.send("Hello")
    assert chat.wait_state(first, "done", "error") == "done"
    second = chat.send(PROMPT)
    assert chat.wait_state(second, "done", "error") == "done"
    # Only the last reply offers Regenerate; every finished one offers Copy.
    assert chat.page.locator(".regenerate:visible").count() == 1
    assert chat.page.locator(".copy:visible").count() == 2
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first.get_attribute("data-raw")},
        {"role": "user", "content": PROMPT},
    ]
    assert second.get_attribute("data-raw") == expected_reply(live, history, 12)

    chat.configure(seed=99)
    second.locator(".regenerate").click()
    again = chat.page.locator(".msg.assistant").nth(1)
    assert chat.wait_state(again, "done", "error") == "done"
    assert chat.page.locator(".msg.assistant").count() == 2 and chat.page.locator(".msg.user").count() == 2
    regenerated = expected_reply(live, history, 12, {**SAMPLING, "seed": 99})
    assert again.get_attribute("data-raw") == regenerated != expected_reply(live, history, 12)
    # The replaced reply is gone for good: a reload shows the new one.
    chat.page.reload()
    chat.page.wait_for_selector("#app[data-models=ready]")
    assert chat.page.locator(".msg.assistant").nth(1).get_attribute("data-raw") == regenerated


def test_copy_puts_the_reply_on_the_clipboard(chromium, live):
    context = chromium.new_context(viewport=DESKTOP)
    try:
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
        chat = ChatPage(context.new_page(), live.url).open()
        chat.configure(max_tokens=12, ignore_eos=True, **SAMPLING)
        reply = chat.send(PROMPT)
        assert chat.wait_state(reply, "done", "error") == "done"
        reply.locator(".copy").click()
        chat.page.wait_for_selector(".copy[data-copied=yes]")
        assert chat.page.evaluate("() => navigator.clipboard.readText()") == reply.get_attribute("data-raw")
        # Without the Clipboard API (a page over plain http on another host), the fallback copies the same text.
        chat.page.evaluate(
            """() => {
                Object.defineProperty(navigator, 'clipboard', {value: undefined, configurable: true});
                window.__copied = null;
                document.addEventListener('copy', () => { window.__copied = getSelection().toString() ||
                    document.activeElement.value.slice(document.activeElement.selectionStart,
                                                       document.activeElement.selectionEnd); });
            }"""
        )
        reply.locator(".copy").click()
        chat.page.wait_for_function("() => window.__copied !== null")
        assert chat.page.evaluate("() => window.__copied") == reply.get_attribute("data-raw")
        assert chat.problems == []
    finally:
        context.close()


# --- API keys -------------------------------------------------------------------------------------------------


def test_a_server_with_a_key_asks_for_it(chromium):
    key = "tripod-browser-test-key"
    server = _serve({"API_KEY": key})
    context = chromium.new_context(viewport=DESKTOP)
    try:
        # The page holds no data: it loads without a key, and the API refuses without one.
        assert httpx.get(server.url + "/").status_code == 200
        assert httpx.get(server.url + "/ui/chat.js").status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401
        chat = ChatPage(context.new_page(), server.url).open(expect_models="auth")
        assert chat.page.is_visible("#auth")
        chat.page.fill("#api-key", "wrong-key")
        chat.page.click("#api-key-save")
        chat.page.wait_for_selector("#auth-message:has-text('refused')")
        assert chat.page.get_attribute("#app", "data-models") == "auth"
        chat.page.fill("#api-key", key)
        chat.page.click("#api-key-save")
        chat.page.wait_for_selector("#app[data-models=ready]")
        assert chat.page.is_hidden("#auth")
        assert chat.page.locator("#model option").all_inner_texts() == ["tiny"]
        for transport in TRANSPORTS:  # the key goes as a subprotocol (WebSocket) and as a header (POST)
            chat.configure(transport=transport, max_tokens=8)
            reply = chat.send(f"Hello over {transport}")
            assert chat.wait_state(reply, "done", "error") == "done", reply.inner_text()
        # The key is remembered in this tab across a reload, but never put in localStorage (which outlives it).
        chat.page.reload()
        chat.page.wait_for_selector("#app[data-models=ready]")
        stored = chat.page.evaluate("() => JSON.stringify({...localStorage})")
        assert key not in stored and chat.page.evaluate("() => sessionStorage.getItem('tripod.apiKey')") == key
        # Only the refused first try logged an error (the 401s of /v1/models).
        assert all("401" in problem for problem in chat.problems), chat.problems
    finally:
        context.close()
        server.stop()


# --- screenshots for the README ---------------------------------------------------------------------------

SCREENSHOT_PROMPT = (
    "Give me a **short** answer:\n\n- what does `POST /v1/streams` return?\n- can a reply resume after a drop?"
)


def _converse(chat: ChatPage) -> None:
    """Two turns: a question written in Markdown, then a follow-up, each answered by the tiny model."""
    for text in (SCREENSHOT_PROMPT, "Thanks! And in *one* sentence?"):
        reply = chat.send(text)
        assert chat.wait_state(reply, "done", "error") == "done"


def test_screenshots_desktop_and_phone(chromium, live):
    IMAGES.mkdir(parents=True, exist_ok=True)
    desktop = chromium.new_context(viewport=DESKTOP)
    try:
        chat = ChatPage(desktop.new_page(), live.url).open()
        chat.configure(temperature=0.8, max_tokens=60)
        _converse(chat)
        chat.page.screenshot(path=str(IMAGES / "chat-desktop.png"))
        assert chat.problems == []
    finally:
        desktop.close()

    phone = chromium.new_context(**PHONE)
    try:
        chat = ChatPage(phone.new_page(), live.url).open()
        page = chat.page
        # Settings live in a sheet on a phone: hidden until opened.
        assert page.is_hidden("#settings")
        page.click("#settings-toggle")
        page.wait_for_selector("#settings", state="visible")
        page.touchscreen.tap(12, 420)  # the scrim beside the sheet closes it
        page.wait_for_selector("#settings", state="hidden")
        page.click("#settings-toggle")
        page.wait_for_selector("#settings", state="visible")
        chat.configure(temperature=0.8, max_tokens=60)
        page.click("#settings-close")
        page.wait_for_selector("#settings", state="hidden")
        _converse(chat)
        # Nothing wider than the screen: no sideways scrolling at 390 px.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        for selector in ["#prompt", "#send", "#model", "#settings-toggle", ".msg.assistant .meta"]:
            box = page.locator(selector).first.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        page.screenshot(path=str(IMAGES / "chat-phone.png"))
        assert chat.problems == []
    finally:
        phone.close()
