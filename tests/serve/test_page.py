"""The chat page in a real browser (Debian's headless Chromium through playwright): it shows
the model, streams a reply, and its stop button cancels one mid-way; a long conversation
drops its oldest turns to fit the context, failed turns stay out of it, New chat during a
reply starts empty, the end of a reply is scrolled into view, and loading logs no error."""

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


# ---- helpers for the tests below -------------------------------------------------------------

def open_chat(browser, server, width=900, height=640, **settings):
    """The page on ``server``, the model shown, ``settings`` (field id: value) set."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(server.url + "/")
    settings = {"api-key": server.api_key, **settings} if server.api_key else settings
    set_fields(page, settings)
    page.wait_for_function("document.querySelector('#model-info').textContent"
                           ".includes('step')")
    return page


def set_fields(page, settings: dict):
    """Sets the settings (field id: value) as a user would, the panel closed afterwards."""
    page.click("#toggle-settings")
    for field, value in settings.items():
        page.fill(f"#{field}", str(value))
        page.dispatch_event(f"#{field}", "change")
    page.click("#toggle-settings")


def record_chats(page) -> list:
    """(status, request body) of every chat request the page makes, as they are answered."""
    answers = []
    page.on("response", lambda r: answers.append((r.status, r.request.post_data_json))
            if r.url.endswith("/v1/chat/completions") else None)
    return answers


def say(page, text):
    """Sends ``text`` and waits for the reply (or its error) to end."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("!document.querySelector('#send').hidden", timeout=30_000)


def contents(body) -> list:
    return [m["content"] for m in body["messages"]]


@pytest.fixture(scope="module")
def small_server(toy_run, tmp_path_factory, start_server):
    """A server over a toy run with a context of only 64 tokens (bytes)."""
    root = tmp_path_factory.mktemp("small")
    (root / "data.txt").write_text("hello\n")
    s = start_server(run_dir=toy_run(root / "small", root / "data.txt", seed=5, step=7,
                                     max_seq_length=64))
    yield s
    s.stop()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


# ---- the tests -----------------------------------------------------------------------------------

def test_a_long_conversation_drops_its_oldest_turns_and_failed_turns(small_server, browser):
    page = open_chat(browser, small_server, **{"max-tokens": 10, "system": "Be brief."})
    answers = record_chats(page)
    words = ["first", "second", "third", "fourth"]
    statuses = []
    for n, word in enumerate(words, 1):
        say(page, word)
        statuses.append(page.text_content("#status"))
        assert page.locator(".error").count() == 0, page.text_content(".error")
        assert page.locator(".assistant .copy").count() == n
        status, body = answers[-1]  # the request that was answered with the reply
        assert status == 200 and contents(body)[0] == "Be brief."  # the system prompt stays
        assert contents(body)[-1] == word
    assert "first" not in contents(answers[-1][1])  # 64 tokens hold no 4 turns
    assert page.locator(".left-out").count() >= 2  # the dropped turn is greyed
    # said on the turn that left them out (a later turn may fit without leaving out more)
    assert any("no longer fit" in status for status in statuses), statuses
    # a message too long for the context even alone: its error, and no reply bubble
    say(page, "x" * 100)
    assert "more than the model's context of 64" in page.text_content(".error")
    assert page.locator(".assistant").count() == len(words)
    assert page.locator(".assistant .copy").count() == len(words)
    assert "left-out" in page.locator(".user").last.get_attribute("class")
    # ... and it is no part of the conversation: the next message goes on without it
    say(page, "fifth")
    assert page.locator(".error").count() == 1
    assert page.locator(".assistant .copy").count() == len(words) + 1
    status, body = answers[-1]
    assert status == 200 and contents(body)[-1] == "fifth"
    assert "x" * 100 not in contents(body)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system"] + ["user", "assistant"] * (len(roles) // 2 - 1) + ["user"]


def test_new_chat_during_a_reply_starts_an_empty_conversation(server, browser):
    page = open_chat(browser, server, **{"max-tokens": 100000, "temperature": 0})
    answers = record_chats(page)
    page.fill("#input", "first chat")
    page.press("#input", "Enter")
    page.wait_for_function(
        "document.querySelector('.assistant .text')?.textContent.length > 3")
    page.click("#new-chat")
    page.wait_for_timeout(500)  # the stopped reply's clean-up has run by now
    assert page.locator(".message").count() == 0
    assert page.text_content("#status") == ""
    assert page.is_visible("#send") and not page.is_visible("#stop")
    set_fields(page, {"max-tokens": 5})
    say(page, "second chat")
    status, body = answers[-1]
    assert status == 200 and body["messages"] == [{"role": "user", "content": "second chat"}]
    assert page.locator(".assistant .copy").count() == 1


def test_the_end_of_a_reply_is_scrolled_into_view(server, browser):
    page = open_chat(browser, server, height=400, **{"max-tokens": 300, "temperature": 0})
    say(page, "Hello")
    assert page.locator(".assistant .copy").count() == 1
    assert page.evaluate("(c => c.scrollHeight - c.scrollTop - c.clientHeight)"
                         "(document.querySelector('#conversation'))") <= 1


def test_loading_the_page_asks_for_no_favicon_and_logs_no_error(small_server, browser):
    page = browser.new_page()  # small_server needs no API key: /v1/models answers 200
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: requests.append(r.url))
    page.goto(small_server.url + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent"
                           ".includes('step 7')")
    page.wait_for_load_state("networkidle")
    assert not [url for url in requests if "favicon" in url]
    assert errors == []
