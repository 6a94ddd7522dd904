"""Real headless Chromium for the chat page tests: Debian's ``chromium`` driven by Playwright, no download.

The page exposes its state in DOM attributes (``data-state``, ``data-raw``, … on each assistant message;
``data-models`` on ``#app``), so :class:`ChatPage` reads those rather than any script global.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    # Keep requestAnimationFrame and timers running at full speed in a headless page.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]

SKIP_VARIABLE = "TRIPOD_SKIP_BROWSER"


def chromium_path() -> str:
    """The system Chromium, or a failure that says how to get it (a skip only when asked for explicitly)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found is not None:
        return found
    message = (
        "Chromium is not installed, and the chat page tests need it: "
        "`apt-get install chromium` (`make services` does this). "
        f"Set {SKIP_VARIABLE}=1 to skip these tests on purpose."
    )
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


@contextmanager
def chromium_browser() -> Iterator:
    """A headless system Chromium for a test module's fixture, closed afterwards."""
    path = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class ChatPage:
    """The chat page at ``/`` in one browser page."""

    def __init__(self, page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.problems: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.problems.append(message.text))
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))

    def open(self, expect_models: str = "ready") -> ChatPage:
        self.page.goto(self.base_url + "/")
        self.page.wait_for_selector(f"#app[data-models={expect_models}]", timeout=30_000)
        return self

    def configure(
        self,
        *,
        transport: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        ignore_eos: bool | None = None,
    ) -> None:
        page = self.page
        if transport is not None:
            page.check(f'input[name="transport"][value="{transport}"]')
        if temperature is not None:
            page.fill("#temperature", str(temperature))
        if max_tokens is not None:
            page.fill("#max-tokens", str(max_tokens))
        if seed is not None or ignore_eos is not None:
            if page.locator("details.advanced").get_attribute("open") is None:
                page.click("details.advanced > summary")
            if seed is not None:
                page.fill("#seed", str(seed))
            if ignore_eos is not None:
                page.set_checked("#ignore-eos", ignore_eos)

    def send(self, text: str):
        """Type ``text``, press Enter; returns the locator of the reply this turn adds."""
        count = self.page.locator(".msg.assistant").count()
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")
        reply = self.page.locator(".msg.assistant").nth(count)
        reply.wait_for(state="attached")
        return reply

    def wait_state(self, reply, *states: str, timeout: float = 120_000) -> str:
        """Wait until the reply's ``data-state`` is one of ``states``; return it."""
        handle = reply.element_handle()
        self.page.wait_for_function(
            "([element, states]) => states.includes(element.dataset.state)",
            arg=[handle, list(states)],
            timeout=timeout,
        )
        return reply.get_attribute("data-state")

    def wait_text(self, reply, min_chars: int = 1, timeout: float = 60_000) -> str:
        """Wait until the reply shows at least ``min_chars`` characters; return its raw text."""
        handle = reply.element_handle()
        self.page.wait_for_function(
            "([element, n]) => (element.dataset.raw || '').length >= n",
            arg=[handle, min_chars],
            timeout=timeout,
        )
        return reply.get_attribute("data-raw")

    def record_growth(self) -> None:
        """From now on, note every length the text of a reply takes (to check that it grew in steps)."""
        self.page.evaluate(
            """() => {
                window.__growth = [];
                new MutationObserver((records) => {
                    for (const record of records) window.__growth.push((record.target.dataset.raw || '').length);
                }).observe(document.querySelector('#conversation'),
                           {subtree: true, attributes: true, attributeFilter: ['data-raw']});
            }"""
        )

    def growth(self) -> list[int]:
        return self.page.evaluate("() => window.__growth")
