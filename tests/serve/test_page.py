"""The chat page in a real browser (Debian's headless Chromium through playwright): it shows
the model, streams a reply, and its stop button cancels one mid-way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("MINIGPT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = os.environ.get("MINIGPT_SCREENSHOT")  # e.g. docs/serve.png, to refresh it

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium installed")


def test_the_page_streams_a_reply_and_stops_one(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(server.url + "/")
            page.click("#toggle-settings")
            page.fill("#api-key", server.api_key)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelector('#model-info').textContent"
                                   ".includes('step 42')")
            assert "val loss 3.500" in page.text_content("#model-info")
            page.fill("#max-tokens", "40")
            page.dispatch_event("#max-tokens", "change")
            page.fill("#input", "Hello there")
            page.press("#input", "Enter")  # Enter sends
            page.wait_for_selector(".message.user")
            page.wait_for_function("document.querySelectorAll('.assistant .copy').length == 1",
                                   timeout=30_000)
            reply = page.text_content(".assistant .text")
            assert reply and page.text_content(".message.user") == "Hello there"
            # a long greedy reply (this model's runs past 2000 tokens), stopped mid-way
            for field, value in (("#max-tokens", "100000"), ("#temperature", "0")):
                page.fill(field, value)
                page.dispatch_event(field, "change")
            page.fill("#input", "line one")
            page.press("#input", "Shift+Enter")  # a new line, not sent
            page.type("#input", "line two")
            assert page.input_value("#input") == "line one\nline two"
            page.press("#input", "Enter")
            page.wait_for_function(
                "document.querySelectorAll('.assistant .text')[1]?.textContent.length > 3")
            page.click("#stop")
            page.wait_for_function("document.querySelector('#status').textContent"
                                   " == 'stopped'")
            assert page.is_visible("#send") and not page.is_visible("#stop")
            assert page.locator(".assistant .copy").count() == 2
            if SCREENSHOT:
                page.screenshot(path=SCREENSHOT)
            page.click("#new-chat")
            assert page.locator(".message").count() == 0
        finally:
            browser.close()
