"""image_url / video_url fetching cannot reach inside the network (SSRF), and every failed fetch reads the same.

The targets are HTTP servers the tests start on 127.0.0.1; `server` (the shared one) fetches public
addresses only, `open_server` runs with --allow-private-urls so that real fetches can fail in every way.
"""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.server.conftest import API_KEY, free_port
from tests.server.security_support import image_request, open_server, site  # noqa: F401 - fixtures

AUTH = {"Authorization": f"Bearer {API_KEY}"}
NOT_PUBLIC = ["http://127.0.0.1:{port}/pic.png", "http://localhost:{port}/pic.png", "http://0.0.0.0:{port}/pic.png",
              "http://[::1]:{port}/pic.png", "http://[::ffff:127.0.0.1]:{port}/pic.png", "http://10.0.0.1/pic.png",
              "http://169.254.169.254/latest/meta-data/", "http://224.0.0.1/pic.png", "http://2130706433:{port}/",
              "http://[2002:7f00:1::]:{port}/pic.png", "http://[64:ff9b::7f00:1]:{port}/pic.png",
              "http://100.64.0.1/pic.png", "https://127.0.0.1:{port}/pic.png"]


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.mark.parametrize("template", NOT_PUBLIC)
def test_loopback_private_and_special_addresses_are_refused(server, site, template):
    url = template.format(port=site.server.server_address[1])
    response = httpx.post(f"{server.url}/v1/chat/completions", json=image_request(url), headers=AUTH, timeout=120)
    error = error_of(response)
    assert error["param"] == "messages[0].content[1]" and error["code"] == "url_fetch_failed"
    assert "cannot fetch the URL" in error["message"]
    assert site.requests == []  # nothing was asked of the local site
    assert "allow-private-urls" in server.log_text()  # the reason is in the server's log, not the answer


def test_a_redirect_to_a_private_address_is_refused_at_that_hop(site, monkeypatch):
    """Each hop is checked: a public first hop (127.0.0.1 counts as public here) redirecting inside is refused."""
    from minicpmo_cli.server import fetch

    inside = fetch_site = None
    try:
        from tests.server.security_support import Site

        inside = Site(host="127.0.0.2").start()
        fetch_site = site
        monkeypatch.setattr(fetch, "refusal", lambda address: None if address == "127.0.0.1" else "private")
        url = f"{fetch_site.url}/redirect?to={inside.url}/pic.png"
        with pytest.raises(fetch.FetchFailed, match="private"):
            fetch.fetch(url, fetch.FetchLimits())
        assert fetch_site.paths() == [f"/redirect?to={inside.url}/pic.png"] and inside.requests == []
        assert fetch.fetch(f"{fetch_site.url}/redirect?to=/pic.png", fetch.FetchLimits())[:4] == b"\x89PNG"
    finally:
        if inside is not None:
            inside.stop()


def test_the_checked_address_is_the_one_connected_to(site, monkeypatch):
    """One DNS lookup per hop; the connection goes to that answer, with the URL's name as Host."""
    from minicpmo_cli.server import fetch

    port = site.server.server_address[1]
    lookups = []
    real = socket.getaddrinfo

    def answer(host, *args, **kwargs):
        lookups.append(host)
        if host == "pictures.test":  # a name whose next answer would differ: only the first may count
            return real("127.0.0.1" if len(lookups) == 1 else "192.0.2.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", answer)
    body = fetch.fetch(f"http://pictures.test:{port}/pic.png", fetch.FetchLimits(allow_private=True))
    assert body[:4] == b"\x89PNG" and lookups[0] == "pictures.test"
    assert all(host == "127.0.0.1" for host in lookups[1:])  # the pinned address (a literal: no DNS query)
    assert site.requests == [("/pic.png", f"pictures.test:{port}")]


def test_every_fetch_failure_reads_the_same(open_server, site):
    """Refused, not found, text instead of an image, a redirect to ftp://, a bad name: one text, one status."""
    closed = free_port()
    urls = [f"http://127.0.0.1:{closed}/pic.png", f"{site.url}/missing", f"{site.url}/text",
            f"{site.url}/redirect?to=ftp://127.0.0.1/pic.png", f"{site.url}/redirect?to=file:///etc/passwd",
            "http://no-such-host.invalid/pic.png"]
    answers = set()
    for url in urls:
        response = httpx.post(f"{open_server.url}/v1/chat/completions", json=image_request(url), timeout=120)
        error = error_of(response)
        answers.add((error["message"], error["code"], error["param"]))
    assert len(answers) == 1, answers
    log = open_server.log_text()
    assert "HTTP 404" in log and "not an image" in log.lower() or "looks like text" in log


def test_private_urls_are_fetched_with_the_opt_in(open_server, site):
    response = httpx.post(f"{open_server.url}/v1/chat/completions", json=image_request(f"{site.url}/pic.png"),
                          timeout=120)
    assert response.status_code == 200, response.text
    assert site.paths() == ["/pic.png"]


def test_only_http_and_https(server):
    for url in ("ftp://127.0.0.1/a.png", "file:///etc/passwd", "gopher://127.0.0.1:70/"):
        response = httpx.post(f"{server.url}/v1/chat/completions", json=image_request(url), headers=AUTH,
                              timeout=120)
        assert response.status_code == 400 and "data: or http(s)" in response.json()["error"]["message"]


def test_https_to_the_pinned_address_keeps_the_name_for_tls(tmp_path, monkeypatch):
    """Over TLS the pinned connection still sends the URL's name as SNI and checks the certificate against it."""
    import http.server
    import ssl
    import subprocess
    import threading

    from minicpmo_cli.server import fetch
    from tests.server.security_support import png_bytes

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=pictures.test", "-addext", "subjectAltName=DNS:pictures.test", "-keyout", str(key),
                           "-out", str(cert)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {made.stderr.decode()[:200]}")
    names, hosts = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            hosts.append(self.headers.get("Host"))
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    real_lookup, real_context = socket.getaddrinfo, ssl.create_default_context
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real_lookup(
        "127.0.0.1" if host == "pictures.test" else host, *a, **k))
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: real_context(cafile=str(cert)))
    try:
        body = fetch.fetch(f"https://pictures.test:{port}/pic.png", fetch.FetchLimits(allow_private=True))
        assert body[:4] == b"\x89PNG" and names == ["pictures.test"] and hosts == [f"pictures.test:{port}"]
        with pytest.raises(fetch.FetchFailed, match="certificate|CERTIFICATE"):  # the name is checked too
            fetch.fetch(f"https://127.0.0.1:{port}/pic.png", fetch.FetchLimits(allow_private=True))
    finally:
        httpd.shutdown()
