"""Nothing blocks the event loop: a slow URL fetch leaves every other request (here /health) answered, and a
server trickling one byte every half second cannot hold a fetch past its deadline (--url-timeout)."""

from __future__ import annotations

import threading

import httpx

from tests.server.security_support import image_request, open_server, site  # noqa: F401 - fixtures

LIMIT = 120  # s: only a failing server reaches this; a working one answers at once


def post_in_background(url: str, body: dict) -> tuple[threading.Event, dict]:
    done, result = threading.Event(), {}

    def run() -> None:
        try:
            result["response"] = httpx.post(url, json=body, timeout=LIMIT)
        except httpx.HTTPError as exc:
            result["error"] = exc
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, result


def test_health_answers_while_a_fetch_hangs(open_server, site):
    done, result = post_in_background(f"{open_server.url}/v1/chat/completions", image_request(f"{site.url}/hold"))
    assert site.arrived.wait(LIMIT), "the server never fetched the URL"
    try:
        health = httpx.get(f"{open_server.url}/health", timeout=LIMIT)
        still_fetching = not done.is_set()  # the site holds the fetch until it is released
        models = httpx.get(f"{open_server.url}/v1/models", timeout=LIMIT)
    finally:
        site.release.set()
    assert health.status_code == 200 and models.status_code == 200
    assert still_fetching, "/health was answered only after the fetch ended: the loop was blocked"
    assert done.wait(LIMIT) and result["response"].status_code == 400  # a half-sent header is no image


def test_a_trickling_server_cannot_hold_a_fetch_past_its_deadline(open_server, site):
    """The site sends a byte every half second for up to 5 minutes; the fetch ends at --url-timeout."""
    done, result = post_in_background(f"{open_server.url}/v1/chat/completions",
                                      image_request(f"{site.url}/trickle"))
    assert site.arrived.wait(LIMIT)
    finished = done.wait(LIMIT)
    site.release.set()
    assert finished, "the fetch was still running after two minutes"
    error = result["response"].json()["error"]
    assert result["response"].status_code == 400 and error["code"] == "url_fetch_failed"
    assert "took longer than" in open_server.log_text()
