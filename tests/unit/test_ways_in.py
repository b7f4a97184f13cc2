"""The new ways in, without the stack: upload and URL job bodies, the URL fetcher against a real
local HTTP server (SSRF guard, byte cap, content type, redirects), webhook verification, the CLI."""

from __future__ import annotations

import http.server
import json
import threading
import time
from urllib.parse import quote, unquote

import pytest

from api.errors import ApiError
from api.validation import parse_job_request, upload_key
from avsr_client import verify_webhook
from avsr_client.cli import main
from cpu_worker import url_input
from tasks.errors import JobError
from tasks.settings import Settings

SETTINGS = Settings(allowed_buckets=("clips",))
UPLOAD_ID = "0123456789abcdef0123456789abcdef"


def error_of(body, settings=SETTINGS) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_job_request(body, settings)
    return info.value


def test_upload_job_reads_the_work_bucket():
    request = parse_job_request({"upload_id": UPLOAD_ID, "beam_size": 2}, SETTINGS)
    key = upload_key(UPLOAD_ID, SETTINGS.default_tenant().id)
    assert request["input"] == {"type": "video", "bucket": SETTINGS.work_bucket, "key": key}
    assert request["beam_size"] == 2


def test_url_job():
    request = parse_job_request({"url": "https://example.org/talk.mp4"}, SETTINGS)
    assert request["input"] == {"type": "url", "url": "https://example.org/talk.mp4"}


@pytest.mark.parametrize(("body", "code"), [
    ({"upload_id": "../../etc"}, "invalid_field"),
    ({"upload_id": 5}, "invalid_field"),
    ({"upload_id": UPLOAD_ID, "s3_bucket": "clips"}, "invalid_input"),
    ({"upload_id": UPLOAD_ID, "url": "https://example.org/a.mp4"}, "invalid_input"),
    ({"url": "https://example.org/a.mp4", "s3_key": "a.mp4"}, "invalid_input"),
    ({"url": "https://example.org/a.mp4", "fps": 30}, "invalid_input"),
    ({"url": "ftp://example.org/a.mp4"}, "url_not_allowed"),
    ({"url": "file:///etc/passwd"}, "url_not_allowed"),
    ({"url": "http://127.0.0.1:8333/avsr-work/x"}, "url_not_allowed"),
    ({"url": "http://169.254.169.254/latest/meta-data/"}, "url_not_allowed"),
    ({"url": "http://[::1]/a.mp4"}, "url_not_allowed"),
    ({"url": "http://localhost/a.mp4"}, "url_not_allowed"),
    ({"url": "http://[::1/a.mp4"}, "url_not_allowed"),  # urlparse raises ValueError
    ({"url": "http://[example.com]/"}, "url_not_allowed"),
    ({"url": "http://example.com:99999/v.mp4"}, "url_not_allowed"),  # .port raises ValueError
    ({"url": "http://a..b/v.mp4"}, "url_not_allowed"),  # getaddrinfo would raise UnicodeError
    ({"url": f"http://{'a' * 64}.example.com/v.mp4"}, "url_not_allowed"),
    ({"url": 7}, "invalid_field"),
])
def test_bad_upload_and_url_bodies(body, code):
    error = error_of(body)
    assert (error.code, error.status) == (code, 400)


def test_predict_takes_neither():
    with pytest.raises(ApiError) as info:
        parse_job_request({"upload_id": UPLOAD_ID}, SETTINGS, legacy=True)
    assert info.value.code == "invalid_input"


def test_private_url_allowed_by_the_switch():
    request = parse_job_request({"url": "http://127.0.0.1:9/a.mp4"}, Settings(url_allow_private=True))
    assert request["input"]["type"] == "url"


# --- the URL fetcher, against a real HTTP server on 127.0.0.1 ------------------------------------

BODY = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64


class _Server(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        routes = {"/video.mp4": (200, "video/mp4", BODY), "/page": (200, "text/html; charset=utf-8", b"<html>"),
                  "/missing": (404, "text/plain", b"no"), "/broken": (503, "text/plain", b"down"),
                  "/bare": (200, None, BODY)}
        if self.path == "/redirect" or self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", unquote(self.path.removeprefix("/redirect-to/"))
                             if self.path != "/redirect" else "/video.mp4")
            self.end_headers()
            return
        if self.path == "/odd-length":  # a Content-Length of '²' (latin-1 0xB2): isdigit(), but no number
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: \xb2\r\n"
                             b"Connection: close\r\n\r\n" + BODY)
            return
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x" * 1024)
                self.wfile.flush()
                time.sleep(0.1)
            return
        if self.path in ("/trickle", "/trickle-headers", "/trickle-headers-404"):  # a byte per 0.5 s, for 10 s
            status = b"404 Not Found" if self.path.endswith("404") else b"200 OK"
            self.wfile.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: video/mp4\r\n"
                             + (b"X-Slow: " if "headers" in self.path else b"\r\n"))
            for _ in range(20):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
                time.sleep(0.5)
            return
        status, ctype, body = routes.get(self.path, (404, "text/plain", b"no"))
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(url, tmp_path, max_bytes=1 << 20, timeout_s=30.0, allow_private=True):
    return url_input.fetch(url, tmp_path / "v", max_bytes=max_bytes, timeout_s=timeout_s, allow_private=allow_private)


@pytest.mark.parametrize("path", ["/video.mp4", "/redirect", "/bare", "/odd-length"])
def test_fetch_streams_the_video(server, tmp_path, path):
    assert fetch(server + path, tmp_path) == len(BODY)
    assert (tmp_path / "v").read_bytes() == BODY


@pytest.mark.parametrize(("path", "kwargs", "code", "retryable"), [
    ("/video.mp4", {"allow_private": False}, "url_not_allowed", False),
    ("/page", {}, "url_not_video", False),
    ("/missing", {}, "url_fetch_failed", False),
    ("/broken", {}, "url_fetch_failed", True),
    ("/video.mp4", {"max_bytes": 1000}, "input_too_large", False),  # declared Content-Length
    ("/slow", {"max_bytes": 4000}, "input_too_large", False),  # streamed, no Content-Length
    ("/slow", {"timeout_s": 0.5}, "url_fetch_failed", False),
])
def test_fetch_refuses(server, tmp_path, path, kwargs, code, retryable):
    with pytest.raises(JobError) as info:
        fetch(server + path, tmp_path, **kwargs)
    assert (info.value.code, info.value.retryable) == (code, retryable)


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers", "/trickle-headers-404", "/redirect-to/%2Ftrickle"])
def test_a_trickle_is_cut_off_at_the_url_timeout(server, tmp_path, path):
    start = time.monotonic()
    with pytest.raises(JobError) as info:
        fetch(server + path, tmp_path, timeout_s=1.5)
    assert (info.value.code, info.value.retryable) == ("url_fetch_failed", False)
    assert "took longer than 1.5 s" in info.value.message
    assert time.monotonic() - start < 4  # not when the server stops (10 s) nor a read timeout (30 s)


def test_every_hop_is_checked():
    for url in ("http://169.254.169.254/latest/", "http://10.0.0.1/a.mp4", "gopher://example.org/"):
        with pytest.raises(JobError) as info:
            url_input._check(url, allow_private=False)
        assert info.value.code == "url_not_allowed"


@pytest.mark.parametrize("location", ["http://a..b/v.mp4", f"http://{'a' * 64}.example.com/v.mp4",
                                      "http://example.com:99999/v.mp4", "http://[::1/v.mp4"])
def test_a_redirect_to_a_bad_address_is_not_allowed(server, tmp_path, location):
    with pytest.raises(JobError) as info:
        fetch(f"{server}/redirect-to/{quote(location, safe='')}", tmp_path)
    assert (info.value.code, info.value.retryable) == ("url_not_allowed", False)


def test_fetch_unreachable_is_retryable(tmp_path):
    with pytest.raises(JobError) as info:
        fetch("http://127.0.0.1:9/video.mp4", tmp_path)
    assert (info.value.code, info.value.retryable) == ("url_fetch_failed", True)


# --- the client's webhook check, against the service's signer ------------------------------------

def test_verify_webhook_accepts_the_services_signature():
    from tasks.signing import signature

    body, now = b'{"job_id": "x"}', int(time.time())
    headers = {"webhook-id": "d1", "webhook-timestamp": str(now), "webhook-signature": signature("s3cret", "d1",
                                                                                               str(now), body)}
    assert verify_webhook(body, headers, "s3cret")
    assert verify_webhook(body, {k.upper(): v for k, v in headers.items()}, "s3cret")
    assert not verify_webhook(body + b" ", headers, "s3cret")
    assert not verify_webhook(body, headers, "other")
    assert not verify_webhook(body, {**headers, "webhook-id": "d2"}, "s3cret")
    assert not verify_webhook(body, headers, "s3cret", now=now + 3600)  # a replay
    assert not verify_webhook(body, {}, "s3cret")


@pytest.mark.parametrize("changed", [
    {"webhook-signature": "v1,\u00e9"}, {"webhook-signature": "v1,\ud800"}, {"webhook-timestamp": "\u00b2"},
    {"webhook-timestamp": "9" * 5000}, {"webhook-id": "\ud800"},
])
def test_verify_webhook_refuses_crafted_headers_without_raising(changed):
    from tasks.signing import signature

    body, now = b'{"job_id": "x"}', str(int(time.time()))
    headers = {"webhook-id": "d1", "webhook-timestamp": now, "webhook-signature": signature("s3cret", "d1", now, body)}
    assert verify_webhook(body, {**headers, **changed}, "s3cret") is False


def test_verify_webhook_refuses_everything_without_a_secret():
    from tasks.signing import signature

    body, now = b"{}", str(int(time.time()))
    headers = {"webhook-id": "d1", "webhook-timestamp": now, "webhook-signature": signature("", "d1", now, body)}
    assert verify_webhook(body, headers, "") is False  # an unset secret signs with an empty key: anyone could


class _Redirect(http.server.BaseHTTPRequestHandler):
    """Answers every request 302 to `self.server.target`; records the headers it was sent."""

    def log_message(self, *args):
        pass

    def _redirect(self) -> None:
        self.server.seen.append(dict(self.headers))  # type: ignore[attr-defined]
        self.send_response(302)
        self.send_header("Location", self.server.target)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_DELETE = _redirect


@pytest.fixture
def redirect_to_elsewhere():
    """(redirecting server URL, headers the redirect target received)."""
    servers = []
    for target in (None, "elsewhere"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
        server.seen, server.target = [], target  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    first, elsewhere = servers
    first.target = f"http://127.0.0.1:{elsewhere.server_address[1]}/stolen"  # type: ignore[attr-defined]
    yield f"http://127.0.0.1:{first.server_address[1]}", elsewhere.seen  # type: ignore[attr-defined]
    for server in servers:
        server.shutdown()


def test_the_client_never_follows_a_redirect_with_its_key(redirect_to_elsewhere):
    from avsr_client import AvsrError, Client

    url, seen_elsewhere = redirect_to_elsewhere
    client = Client(url, "secret-key", timeout=5)
    for call in (lambda: client.status("f" * 32), lambda: client.submit(s3_bucket="b", s3_key="v.mp4")):
        with pytest.raises(AvsrError) as info:
            call()
        assert info.value.code == "redirected"
    assert seen_elsewhere == []


def test_cli_transcribe_without_a_model_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("AVHUBERT_MODEL_PATH", raising=False)
    assert main(["transcribe", str(tmp_path / "clip.mp4")]) == 2
    assert "--model" in capsys.readouterr().err


def test_cli_unreachable_service_is_an_error(capsys):
    assert main(["--url", "http://127.0.0.1:9", "status", "0" * 32]) == 1
    assert capsys.readouterr().err.startswith("error: unreachable:")


def test_a_name_is_checked_by_what_it_resolves_to_and_connected_to_that(server, tmp_path, monkeypatch):
    from tasks import pinned_http

    # a public-looking name that resolves to a private address (DNS rebinding's second answer) is refused
    monkeypatch.setattr(pinned_http, "resolve_host", lambda host, port: ["10.1.2.3"])
    with pytest.raises(JobError) as info:
        fetch("http://videos.example.org/video.mp4", tmp_path, allow_private=False)
    assert info.value.code == "url_not_allowed"
    # the connection goes to the address that was resolved and checked, the name stays the Host
    port = int(server.rsplit(":", 1)[1])
    calls = []
    monkeypatch.setattr(pinned_http, "resolve_host", lambda host, p: calls.append((host, p)) or ["127.0.0.1"])
    assert fetch(f"http://videos.example.org:{port}/video.mp4", tmp_path) == len(BODY)
    assert calls == [("videos.example.org", port)]


def test_cli_transcribe_reports_a_bad_video_like_the_service(capsys, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00not a video" * 100)
    assert main(["transcribe", str(video), "--model", str(tmp_path / "unused.pt"), "--quiet"]) == 1
    assert "error: bad_media:" in capsys.readouterr().err


# --- --speaker: the CLI's parsing, the client's body, per-track text --------------------------------

class _Recorder:
    """A `requests.Session` stand-in: records each request, answers a job or a result."""

    def __init__(self, result: dict | None = None):
        self.headers: dict = {}
        self.calls: list[tuple[str, str, dict]] = []
        self.result = result

    def request(self, method, url, **kwargs):
        import requests

        self.calls.append((method, url, kwargs))
        response = requests.Response()
        response.status_code = 200
        body = self.result if url.endswith("/result") else {"job_id": "j" * 32, "status": "queued", "links": {}}
        response._content = json.dumps(body).encode()
        return response


@pytest.mark.parametrize(("argument", "sent"), [
    ("all", "all"), ("speaking", "speaking"), ("1.5,640,360", {"t": 1.5, "x": 640.0, "y": 360.0}),
    ("0,0,0", {"t": 0.0, "x": 0.0, "y": 0.0}),
])
def test_cli_submit_sends_the_speaker(monkeypatch, capsys, argument, sent):
    from avsr_client import cli

    recorder = _Recorder()
    monkeypatch.setattr(cli, "_client", lambda args: cli.Client(args.server, session=recorder))
    assert main(["submit", "--upload-id", UPLOAD_ID, "--speaker", argument]) == 0
    ((method, url, kwargs),) = recorder.calls
    assert (method, url.rsplit("/", 2)[-2:]) == ("POST", ["v1", "jobs"])
    assert kwargs["json"] == {"upload_id": UPLOAD_ID, "speaker": sent}
    assert capsys.readouterr().out.strip() == "j" * 32


def test_client_omits_an_unset_speaker():
    from avsr_client.client import Client

    recorder = _Recorder()
    Client("http://api", session=recorder).submit(upload_id=UPLOAD_ID)
    assert "speaker" not in recorder.calls[0][2]["json"]  # the service's default: "largest"


@pytest.mark.parametrize("argument", ["loudest", "1,2", "1,2,3,4", "a,b,c", "-1,2,3", "1,nan,3", "1,inf,3", ""])
def test_cli_bad_speaker_is_an_argparse_error(capsys, argument):
    with pytest.raises(SystemExit) as info:
        main(["submit", "--upload-id", UPLOAD_ID, "--speaker", argument])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--speaker" in err and "T,X,Y" in err


def test_cli_prints_one_line_per_track(monkeypatch, capsys):
    from avsr_client import cli

    two = {"text": "hi there bye", "transcripts": [{"track": 1, "text": "hi there", "confidence": 0.9},
                                                   {"track": 2, "text": "bye", "confidence": 0.7}]}
    one = {"text": "hi there", "transcripts": [{"track": 1, "text": "hi there", "confidence": 0.9}]}
    for result, printed in ((two, "track-1: hi there\ntrack-2: bye\n"), (one, "hi there\n"),
                            ({"text": "plain"}, "plain\n")):
        monkeypatch.setattr(cli, "_client", lambda args, r=result: cli.Client(args.server, session=_Recorder(r)))
        assert main(["result", "j" * 32, "--format", "text"]) == 0
        assert capsys.readouterr().out == printed


def test_cli_transcribe_takes_the_speaker(monkeypatch, capsys, tmp_path):
    import sys
    import types

    seen = {}
    fake = types.SimpleNamespace(transcribe=lambda path, **kw: seen.update(kw) or {"text": "x"},
                                 render=lambda result, fmt: result["text"] + "\n")
    monkeypatch.setitem(sys.modules, "avsr_client.local", fake)
    monkeypatch.setattr("avsr_client.local", fake, raising=False)
    assert main(["transcribe", str(tmp_path / "a.mp4"), "--model", "m.pt", "--speaker", "2,10,20"]) == 0
    assert seen["speaker"] == {"t": 2.0, "x": 10.0, "y": 20.0}
