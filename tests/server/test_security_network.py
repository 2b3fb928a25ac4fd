"""Safe by default on a network: without --api-key only requests naming this server (or localhost) as their
Host are served (no DNS rebinding), cross-site form posts are refused, a server on a non-loopback address
without a key says so loudly, and the bearer scheme is read in any case."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL
from tests.server.security_support import open_server  # noqa: F401 - a fixture


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "127.0.0.1.nip.io:{port}",
                                  "localhost.attacker.example:{port}", "10.1.2.3:{port}", ""])
def test_without_a_key_other_host_names_are_refused(open_server, host):
    headers = {"Host": host.format(port=port_of(open_server))}
    for method, path in (("GET", "/v1/models"), ("GET", "/"), ("POST", "/v1/chat/completions")):
        response = httpx.request(method, f"{open_server.url}{path}", headers=headers, timeout=60,
                                 json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 403, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "host_not_allowed" and error["type"] == "permission_error"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "127.0.0.1", "[::1]:{port}",
                                  "app.localhost:{port}"])
def test_without_a_key_own_address_and_localhost_are_served(open_server, host):
    response = httpx.get(f"{open_server.url}/v1/models", headers={"Host": host.format(port=port_of(open_server))},
                         timeout=60)
    assert response.status_code == 200 and response.json()["data"][0]["id"] == MODEL


def test_health_answers_any_host(open_server):
    assert httpx.get(f"{open_server.url}/health", headers={"Host": "balancer.internal"}, timeout=60).status_code == 200


def test_with_a_key_any_host_is_served(server):
    response = httpx.get(f"{server.url}/v1/models", headers={"Host": "api.example.com",
                                                              "Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "http://attacker.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://other.localhost"},
])
def test_cross_site_form_posts_are_refused(open_server, headers):
    """What a page on another site can make a browser send without asking: a form, urlencoded or multipart."""
    form = httpx.post(f"{open_server.url}/v1/audio/transcriptions", headers=headers, timeout=60,
                      data={"model": MODEL}, files={"file": ("a.wav", b"RIFF....")})
    plain = httpx.post(f"{open_server.url}/v1/chat/completions", timeout=60,
                       headers={**headers, "Content-Type": "text/plain"},
                       content=b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}')
    for response in (form, plain):
        assert response.status_code == 403 and response.json()["error"]["code"] == "cross_site_request"


def test_same_origin_posts_pass(open_server):
    """The server's own web page (same origin) and clients that send no Origin are served."""
    origin = {"Origin": open_server.url, "Sec-Fetch-Site": "same-origin"}
    for headers in (origin, {}):
        response = httpx.post(f"{open_server.url}/v1/audio/transcriptions", headers=headers, timeout=120,
                              data={"model": MODEL}, files={"file": ("a.wav", b"")})
        assert response.status_code == 400 and "empty" in response.json()["error"]["message"]


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_bearer_scheme_is_read_in_any_case(server, scheme):
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}, timeout=60)
    assert response.status_code == 200


@pytest.mark.parametrize("value", [f"Basic {API_KEY}", API_KEY, f"Bearer {API_KEY}x", "Bearer", ""])
def test_other_credentials_are_401(server, value):
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": value}, timeout=60)
    assert response.status_code == 401


@pytest.mark.parametrize("host, loud", [("0.0.0.0", True), ("192.168.1.20", True), ("127.0.0.1", False),
                                        ("localhost", False), ("::1", False)])
def test_a_server_open_to_the_network_without_a_key_warns(cli, monkeypatch, host, loud):
    """`serve --host` off loopback without --api-key: a warning on stderr (uvicorn itself is not started)."""
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(kwargs["host"]))
    monkeypatch.delenv("MINICPMO_API_KEY", raising=False)
    result = cli("-q", "serve", "--host", host)
    assert result.code == 0 and started == [host]
    assert ("without --api-key" in result.stderr) is loud
    keyed = cli("serve", "--host", host, "--api-key", "k")
    assert keyed.code == 0 and "without --api-key" not in keyed.stderr


def test_websockets_from_another_sites_page_are_refused(open_server):
    """A page on another site can open a websocket to a loopback server without asking (no CORS): without a key,
    only the server's own pages (or clients that send no Origin) get the realtime route."""
    import json

    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    url = open_server.url.replace("http", "ws") + "/v1/realtime?model=tiny"
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(url, origin="http://attacker.example")
    assert refused.value.response.status_code == 403
    for origin in (None, open_server.url):
        with ws_client.connect(url, origin=origin) as conn:
            assert json.loads(conn.recv(timeout=60))["type"] == "session.created"
