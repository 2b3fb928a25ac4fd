"""The page at / in headless Chromium (Debian's chromium + chromedriver through Selenium; nothing downloads a
browser): attach an image, send, watch the answer stream in; ask for a spoken answer and get a playable <audio>."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from tests.server.conftest import API_KEY, MODEL

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="minicpmo-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(240)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script: str, timeout: float = 240):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(script))


def test_page_chats_with_an_image_streams_and_speaks(server, browser, media_files):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    browser.execute_script("""
        const key = document.getElementById('api-key');
        key.value = arguments[0]; key.dispatchEvent(new Event('change'));
        document.getElementById('max-tokens').value = '8';
        document.getElementById('seed').value = '7';
        window.seen = [];  // every text the answer bubble showed, to see it stream in
        new MutationObserver(() => {
          const last = document.querySelector('.message.assistant:last-child .text');
          if (last) window.seen.push(last.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """, API_KEY)
    wait_for(browser, f"return document.getElementById('model').textContent === '{MODEL}'", 30)

    image_input = browser.find_element(By.ID, "image-input")
    browser.execute_script("arguments[0].hidden = false;", image_input)
    image_input.send_keys(str(media_files["picture"]))
    wait_for(browser, "return document.querySelectorAll('#attachments span').length === 1", 10)
    browser.find_element(By.ID, "prompt").send_keys("What is in this picture?")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "const m = document.querySelector('.message.assistant'); return m && m.dataset.state === 'done'")
    assert browser.find_element(By.CSS_SELECTOR, ".message.user img").get_attribute("src").startswith("data:image/png")
    answer = browser.find_element(By.CSS_SELECTOR, ".message.assistant .text").text
    partial = [t for t in browser.execute_script("return window.seen") if t]
    assert answer and len(set(partial)) > 1 and all(answer.startswith(t) for t in partial)  # grew piece by piece

    browser.find_element(By.ID, "speak").click()
    browser.find_element(By.ID, "prompt").send_keys("Say it aloud.")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "const m = document.querySelectorAll('.message.assistant')[1]; "
                      "return m && m.dataset.state !== 'streaming'")
    assert browser.find_elements(By.CSS_SELECTOR, ".message.error") == []
    duration = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const audio = document.querySelectorAll('.message.assistant')[1].querySelector('audio');
        if (!audio) { done(-1); return; }
        if (audio.readyState >= 1) { done(audio.duration); return; }
        audio.addEventListener('loadedmetadata', () => done(audio.duration));
        audio.addEventListener('error', () => done(-2));
    """)
    assert duration > 0  # the browser decoded the spoken answer: a playable wav
