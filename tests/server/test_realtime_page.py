"""The page's Live mode in headless Chromium with a fake microphone fed from a wav (a spoken question): the
realtime websocket answers and the page plays the answer (its state says so)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from tests.server.conftest import API_KEY, MODEL
from tests.server.browser_support import chromium
from tests.server.browser_support import wait_for as page_wait_for


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory):
    import soundfile

    from minicpmo_cli.media.audio import load_audio

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("live-page")
    spoken = folder / "spoken.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), "Hello, can you hear me?"], check=True, capture_output=True)
    speech = load_audio(str(spoken))  # 16 kHz
    padded = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(48000, np.float32)])
    path = folder / "mic.wav"
    soundfile.write(str(path), padded, 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def live_browser(question_wav):
    with chromium("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={question_wav}%noloop") as driver:
        yield driver


def wait_for(driver, script: str, timeout: float = 300):
    return page_wait_for(driver, script, timeout, poll=0.2)


def test_live_mode_answers_a_spoken_question(server, live_browser):
    browser = live_browser
    browser.get(server.url + "/")
    browser.execute_script("""
        const key = document.getElementById('api-key');
        key.value = arguments[0]; key.dispatchEvent(new Event('change'));""", API_KEY)
    wait_for(browser, f"return document.getElementById('model').textContent === '{MODEL}'", 60)
    browser.execute_script("document.getElementById('live-camera').checked = true;"
                           "document.getElementById('live-toggle').click();")
    wait_for(browser, "return window.minicpmoLive.appended > 0")
    wait_for(browser, "return window.minicpmoLive.responses >= 1")
    live = browser.execute_script("return window.minicpmoLive")
    assert live["errors"] == [], live
    assert live["deltas"] > 0 and live["scheduledSeconds"] > 0
    assert live["assistant"] and live["assistant"][0]
    wait_for(browser, "return window.minicpmoLive.playedSeconds > 0")  # the answer was played
    wait_for(browser, "return window.minicpmoLive.user.length >= 1")  # the user's transcript
    shown = browser.execute_script("return document.getElementById('live-log').textContent")
    assert "assistant: " in shown and "you: " in shown
    browser.execute_script("document.getElementById('live-toggle').click();")
    assert browser.execute_script("return document.getElementById('live-panel').dataset.state") == "off"
