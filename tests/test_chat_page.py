"""The browser chat page, in a real headless Chromium: type a message, see tokens arrive, press
stop mid-reply, and see the server's running count return to 0.

Needs Debian's `chromium` (`make install` installs it where it can: root and apt-get) and the
`playwright` package (a dev dependency; it drives the system's Chromium, so it downloads no browser).
Without them the test is skipped and says which one is missing."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import ServerProcess, free_port, start_server, wait_idle
from modelserve.models.demo import DEMO_WORDS
from modelserve.models.random_init import build_random_model, build_word_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `apt-get install chromium` (make install does)"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="playwright is not installed: `make install`"
    ),
]

# A plain chat template: the tiny test model has none of its own.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PIECES_BEFORE_STOP = 20
# How long a page check may wait (Playwright's default is 5 s): Chromium, the server and its engine share
# two loaded CPUs here, and a check waits for what it checks, so a long bound costs nothing when it holds.
PAGE_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int]]:
    root = tmp_path_factory.mktemp("chat-page")
    # A long context, so a greedy reply of thousands of tokens is still running when stop is pressed.
    words = build_word_tokenizer(DEMO_WORDS)  # the demo's: random words that read as words in the screenshot
    model = build_random_model(root / "model", "llama", seed=5, max_len=8192, tokenizer=words)
    template = root / "template.jinja"
    template.write_text(TEMPLATE)
    http_port = free_port()
    args = ["--model", str(model), "--chat-template", str(template), "--max-max-new-tokens", "8000"]
    server = start_server(root, *args, "--http-port", str(http_port))
    try:
        server.wait_serving()
        yield server, http_port
    finally:
        server.terminate()


def test_a_reply_streams_into_the_page_and_stop_ends_it(chat_server: tuple[ServerProcess, int], tmp_path: Path) -> None:
    from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
    from playwright.sync_api import expect, sync_playwright

    server, http_port = chat_server
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(f"http://127.0.0.1:{http_port}/")
            expect(page.get_by_test_id("model")).not_to_have_text("connecting…")
            page.get_by_test_id("temperature").fill("0")  # greedy: the same long reply on every run
            page.get_by_test_id("max-tokens").fill("6000")
            page.get_by_test_id("prompt").fill("Tell me a long story about the sea")
            page.get_by_test_id("send").click()

            reply = page.get_by_test_id("message-assistant").locator(".text")
            page.wait_for_function(
                "n => (document.querySelector('.message.assistant .text')?.textContent ?? '').split(' ').length > n",
                arg=PIECES_BEFORE_STOP,
                polling=100,  # a timer, not animation frames: those may come late on a loaded machine
                timeout=PAGE_TIMEOUT_MS,
            )
            expect(page.get_by_test_id("stop")).to_be_enabled()
            page.screenshot(path=tmp_path / "chat-page-mid-reply.png")
            page.get_by_test_id("stop").click()

            expect(page.get_by_test_id("status")).to_have_text("stopped")
            assert page.get_by_test_id("message-assistant").get_attribute("data-ending") == "stopped"
            streamed = reply.text_content() or ""
            assert len(streamed.split()) > PIECES_BEFORE_STOP
            expect(page.get_by_test_id("send")).to_be_enabled()
        finally:
            browser.close()

    with server.channel() as channel:
        health = wait_idle(pb_grpc.GenerationServiceStub(channel))
    assert health.requests_running == 0, "the stopped reply still holds a batch slot"
    assert " ERROR " not in server.log()
    print(f"screenshot: {tmp_path / 'chat-page-mid-reply.png'}")
