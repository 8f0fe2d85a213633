"""The chat page in a real (headless) Chromium: type, send, watch a streamed reply and its tokens/s."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.server_utils import ServerProcess, shared_real_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="needs Debian's chromium and chromium-driver (.ci/run installs them: apt-get install chromium "
               "chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def real() -> ServerProcess:
    return shared_real_server()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_and_assets_are_served(real: ServerProcess) -> None:
    page = httpx.get(real.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/web/chat.js">' in page.text
    for name, kind in (("chat.js", "javascript"), ("chat.css", "css")):
        r = httpx.get(f"{real.url}/web/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]


def test_chat_page_streams_a_reply(real: ServerProcess, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(real.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "SmolLM2"))
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")
    browser.find_element(By.ID, "input").send_keys("Say hello in one short sentence.")
    browser.find_element(By.ID, "send").click()

    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".msg.user")))
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Say hello in one short sentence."
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant.done")))
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
    assert reply.strip(), "no reply text streamed in"
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    status = browser.find_element(By.ID, "status").text
    assert "tokens/s" in status and status.split()[0].isdigit(), status
    assert 0 < int(status.split()[0]) <= 12
