"""The page at / in headless Chromium (Debian's chromium + chromedriver through Selenium; nothing downloads a
browser): attach an image, send, watch the answer stream in; ask for a spoken answer and get a playable <audio>;
attach audio and video and see them in the user's bubble; the icon the page names is served."""

from __future__ import annotations

import pytest

from tests.server.browser_support import chromium, wait_for
from tests.server.conftest import API_KEY, MODEL, need


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        driver.set_script_timeout(240)
        yield driver


OPEN_PAGE = """
    const key = document.getElementById('api-key');
    key.value = arguments[0]; key.dispatchEvent(new Event('change'));
    document.getElementById('max-tokens').value = '8';
    document.getElementById('seed').value = '7';
    window.sent = [];  // the JSON body of every request the page makes
    const plainFetch = window.fetch;
    window.fetch = (url, init) => {
      if (init && init.body) window.sent.push(JSON.parse(init.body));
      return plainFetch(url, init);
    };
"""


def attach(browser, input_id: str, path, count: int) -> None:
    from selenium.webdriver.common.by import By

    element = browser.find_element(By.ID, input_id)
    browser.execute_script("arguments[0].hidden = false;", element)
    element.send_keys(str(path))
    wait_for(browser, f"return document.querySelectorAll('#attachments span').length === {count}", 30)


def media_duration(browser, selector: str) -> float:
    """The duration the browser decoded for the player at ``selector`` (-1: none there, -2: cannot decode)."""
    return browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const player = document.querySelector(arguments[0]);
        if (!player) { done(-1); return; }
        if (player.readyState >= 1) { done(player.duration); return; }
        player.addEventListener('loadedmetadata', () => done(player.duration));
        player.addEventListener('error', () => done(-2));
    """, selector)


def test_page_chats_with_an_image_streams_and_speaks(server, browser, media_files):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    browser.execute_script(OPEN_PAGE + """
        window.seen = [];  // every text the answer bubble showed, to see it stream in
        new MutationObserver(() => {
          const last = document.querySelector('.message.assistant:last-child .text');
          if (last) window.seen.push(last.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """, API_KEY)
    wait_for(browser, f"return document.getElementById('model').textContent === '{MODEL}'", 30)

    attach(browser, "image-input", media_files["picture"], 1)
    # an answer long enough to watch it stream: with seed 1 the tiny checkpoint answers all 48 tokens (seed 7
    # stops after ~5, which a busy machine can make before the page's first read of the stream)
    browser.execute_script("document.getElementById('max-tokens').value = '48'; "
                           "document.getElementById('seed').value = '1';")
    browser.find_element(By.ID, "prompt").send_keys("What is in this picture?")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "const m = document.querySelector('.message.assistant'); return m && m.dataset.state === 'done'")
    assert browser.find_element(By.CSS_SELECTOR, ".message.user img").get_attribute("src").startswith("data:image/png")
    # textContent, as the partial texts were seen: WebElement.text is the rendered text, whitespace collapsed
    answer = browser.execute_script("return document.querySelector('.message.assistant .text').textContent")
    partial = [t for t in browser.execute_script("return window.seen") if t]
    assert answer and len(set(partial)) > 1 and all(answer.startswith(t) for t in partial)  # grew piece by piece

    browser.execute_script("document.getElementById('max-tokens').value = '8'; "
                           "document.getElementById('seed').value = '7';")
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


def test_page_shows_attached_audio_and_sends_video(server, browser, media_files):
    import soundfile

    from selenium.webdriver.common.by import By

    speech, video = need(media_files, "speech"), need(media_files, "video")
    browser.get(server.url + "/")
    browser.execute_script(OPEN_PAGE, API_KEY)
    wait_for(browser, f"return document.getElementById('model').textContent === '{MODEL}'", 30)
    attach(browser, "audio-input", speech, 1)
    attach(browser, "video-input", video, 2)
    chips = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#attachments span")]
    assert chips == ["audio speech.wav", "video clip.mp4"]
    browser.find_element(By.ID, "prompt").send_keys("What do you hear and see?")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "const m = document.querySelector('.message.assistant'); return m && m.dataset.state !== 'streaming'")
    assert browser.find_elements(By.CSS_SELECTOR, ".message.error") == []
    assert browser.find_element(By.CSS_SELECTOR, ".message.assistant .text").text  # the server answered

    [body] = [b for b in browser.execute_script("return window.sent") if "messages" in b]
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["input_audio", "video_url", "text"]
    assert parts[1]["video_url"]["url"].startswith("data:video/mp4;base64,")

    user = ".message.user"
    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, f"{user} figcaption")]
    assert captions == ["audio speech.wav", "video clip.mp4"]
    assert browser.find_element(By.CSS_SELECTOR, f"{user} audio").get_attribute("src").startswith("data:audio/")
    assert media_duration(browser, f"{user} audio") == pytest.approx(soundfile.info(str(speech)).duration, abs=0.05)
    assert media_duration(browser, f"{user} video") == pytest.approx(2.0, abs=0.2)  # the clip plays in the page


def test_page_icon_is_served(server, browser):
    import io

    import httpx
    from PIL import Image

    response = httpx.get(f"{server.url}/favicon.ico")  # no API key: like the page itself
    assert response.status_code == 200 and response.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(response.content)).format == "ICO"
    browser.get_log("browser")  # what earlier pages logged
    browser.get(server.url + "/")
    status = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.querySelector('link[rel=icon]').href).then((r) => done(r.status), () => done(-1));
    """)
    assert status == 200
    missing = [e["message"] for e in browser.get_log("browser") if "status of 404" in e["message"]]
    assert missing == []  # nothing the page (or the browser on its behalf) asks for is missing
