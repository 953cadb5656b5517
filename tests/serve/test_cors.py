"""Web pages of other origins: refused by default, allowed with ``--cors-origin``, checked
over HTTP and in a real browser (headless Chromium), which is what enforces CORS."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

APP = "http://localhost:3000"


@pytest.fixture(scope="module")
def cors_server(start_server, server):
    s = start_server("--cors-origin", APP, "--cors-origin", "https://chat.example",
                     api_key=server.api_key)
    yield s
    s.stop()


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})


def test_an_allowed_origin_passes_the_preflight_without_the_key(cors_server):
    for origin in (APP, "https://chat.example"):
        r = preflight(cors_server.url, origin)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_an_allowed_origin_still_needs_the_key_and_sees_retry_after(cors_server):
    url, origin = f"{cors_server.url}/v1/models", {"Origin": APP}
    r = httpx.get(url, headers={**origin, **cors_server.headers})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    assert "retry-after" in r.headers["access-control-expose-headers"].lower()
    r = httpx.get(url, headers=origin)  # the browser may ask; the key still decides
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_other_origins_are_refused(cors_server, server):
    r = preflight(cors_server.url, "http://evil.example")
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{cors_server.url}/v1/models",
                  headers={"Origin": "http://evil.example", **cors_server.headers})
    assert "access-control-allow-origin" not in r.headers
    # without --cors-origin, no origin but the server's own
    r = httpx.get(f"{server.url}/v1/models", headers={"Origin": APP, **server.headers})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert preflight(server.url, APP).status_code == 405


# ---- in a browser -----------------------------------------------------------------------

CHROMIUM = os.environ.get("MINIGPT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
PAGE = """<!doctype html><meta charset="utf-8"><title>another app</title><pre id="out"></pre>
<script>
async function ask(api, key) {
  const out = document.querySelector("#out");
  try {
    const r = await fetch(api + "/v1/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({messages: [{role: "user", content: "Hi"}], max_tokens: 8,
                            stream: true})});
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let text = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      text += decoder.decode(value, {stream: true});
    }
    out.textContent = "status " + r.status + ": " + (text.includes("data: [DONE]") ? "done" : text);
  } catch (e) {
    out.textContent = "failed: " + e.name;
  }
}
</script>"""


@pytest.fixture
def other_origin(tmp_path):
    """A page served from another origin (http://localhost:PORT, the API being on
    http://127.0.0.1:PORT)."""
    (tmp_path / "index.html").write_text(PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=tmp_path)
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://localhost:{port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium installed")
def test_a_page_of_another_origin_streams_only_where_allowed(start_server, server,
                                                            other_origin):
    sync_api = pytest.importorskip("playwright.sync_api")
    allowing = start_server("--cors-origin", other_origin, api_key=server.api_key)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(other_origin + "/")
                for api, expected in ((allowing.url, "status 200: done"),
                                      (server.url, "failed: TypeError")):
                    page.evaluate("document.querySelector('#out').textContent = ''")
                    page.evaluate("([api, key]) => ask(api, key)", [api, server.api_key])
                    page.wait_for_function("document.querySelector('#out').textContent")
                    assert page.text_content("#out") == expected
            finally:
                browser.close()
    finally:
        allowing.stop()
