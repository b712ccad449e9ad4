"""The playground page at ``/`` in a real browser: Debian's chromium and chromedriver driven by selenium.

CI installs both (.ci/run); without them the test fails in CI and skips on a developer's machine. The test types
a prompt, clicks Generate and waits until ``#output`` holds the prompt and the greedy text that the API gives for
it; then it continues and forks the session from the page. It takes a screenshot: into the test's temporary
folder, or where ``PLAYGROUND_SCREENSHOT`` says (``PLAYGROUND_SCREENSHOT=docs/img/playground.png`` renews the
picture in docs/http.md).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realservers import need_binary
from servicekit import RunningServer

from textgen.service.runtime import load_bundle

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PROMPT = "The "


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or need_binary("chromium", "chromium")
    driver_path = shutil.which("chromedriver") or need_binary("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,760"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def api_greedy(port: int, prompt: str, max_tokens: int, session_id: str | None = None) -> str:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if session_id:
        body["session_id"] = session_id
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return str(json.loads(r.read())["choices"][0]["text"])


def test_playground_streams_the_greedy_text_continues_and_forks(browser: Any, tmp_path: Path) -> None:
    rt = load_bundle(None, intra_op_threads=1)  # the packaged model: readable text for the screenshot
    srv = RunningServer(rt, http_port=0)
    try:
        port = srv.server.http_port
        want = api_greedy(port, PROMPT, 120)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 30)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPT)
        for field, value in (("temperature", "0"), ("max-tokens", "120")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        output = browser.find_element(By.ID, "output")
        wait.until(lambda _: output.get_attribute("textContent") == PROMPT + want)
        wait.until(lambda _: browser.find_element(By.ID, "status").text.startswith("done"))
        assert browser.find_element(By.ID, "tokens").text == "120"
        assert browser.find_element(By.ID, "ttft").text.endswith("ms")
        wait.until(lambda _: browser.find_element(By.ID, "session-tokens").text == str(len(PROMPT) + 120))
        # Continue: the session's next turn (an empty prompt) goes on from the text shown
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("30")
        wait.until(lambda _: browser.find_element(By.ID, "continue").is_enabled())
        browser.find_element(By.ID, "continue").click()
        more = api_greedy(port, PROMPT + want, 30)
        wait.until(lambda _: output.get_attribute("textContent") == PROMPT + want + more)
        wait.until(lambda _: browser.find_element(By.ID, "status").text.startswith("done"))
        # Fork: a new session with the same text; continuing it adds the same greedy text again
        browser.find_element(By.ID, "fork").click()
        wait.until(lambda _: "(fork)" in browser.find_element(By.ID, "session").text)
        wait.until(lambda _: browser.find_element(By.ID, "continue").is_enabled())
        browser.find_element(By.ID, "continue").click()
        again = api_greedy(port, PROMPT + want + more, 30)
        wait.until(lambda _: output.get_attribute("textContent") == PROMPT + want + more + again)
        wait.until(lambda _: browser.find_element(By.ID, "status").text.startswith("done"))
        shot = Path(os.environ.get("PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
        wait.until(lambda _: browser.find_element(By.ID, "session-tokens").text == str(len(PROMPT) + 180))
        assert browser.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG")
    finally:
        srv.stop()


def test_playground_sends_the_token_typed_into_the_page(browser: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("page-token-123\n")
    rt = load_bundle(None, intra_op_threads=1)
    srv = RunningServer(rt, http_port=0, auth_tokens_file=str(tokens))
    try:
        port = srv.server.http_port
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda _: "enter the token" in browser.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "generate").click()  # without the token: the API's 401, shown in the page
        wait.until(lambda _: "Bearer" in browser.find_element(By.ID, "status").text)
        browser.find_element(By.ID, "token").send_keys("page-token-123")
        for field, value in (("prompt", PROMPT), ("temperature", "0"), ("max-tokens", "40")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        want = srv.client(token="page-token-123").generate_text(PROMPT, max_tokens=40).text
        output = browser.find_element(By.ID, "output")
        wait.until(lambda _: output.get_attribute("textContent") == PROMPT + want)
        wait.until(lambda _: browser.find_element(By.ID, "model").text.startswith("model: textgen-"))
        stored = browser.execute_script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
        assert "page-token-123" not in stored and "page-token-123" not in browser.get_cookies().__repr__()
    finally:
        srv.stop()
