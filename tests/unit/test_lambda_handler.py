"""deploy/lambda/handler.py against a real HTTP server on 127.0.0.1 that records what it receives."""

from __future__ import annotations

import copy
import importlib.util
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
HANDLER = ROOT / "deploy" / "lambda" / "handler.py"

# The ObjectCreated:Put example of the S3 event message structure (AWS S3 user guide, "Event
# message structure"; also the Lambda console's "s3-put" test event), with our names.
S3_PUT_EVENT = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": "2026-11-25T08:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "127.0.0.1"},
            "responseElements": {
                "x-amz-request-id": "C3D13FE58DE4C810",
                "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "avsr-video-upload",
                "bucket": {
                    "name": "avsr-input",
                    "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                    "arn": "arn:aws:s3:::avsr-input",
                },
                "object": {
                    "key": "incoming/talk+show%281%29.mp4",
                    "size": 1024,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                    "sequencer": "0055AED6DCD90281E5",
                },
            },
        }
    ]
}


def s3_record(
    key: str, event_name: str = "ObjectCreated:Put", sequencer: str = "0A1B2C3D4E5F678901", bucket: str = "avsr-input"
) -> dict:
    record = copy.deepcopy(S3_PUT_EVENT["Records"][0])
    record["eventName"] = event_name
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"].update(key=key, sequencer=sequencer)
    return record


class Recorder:
    """A real API stand-in: records requests; answers from `script` (status, body), then 202."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple[int, dict]] = []
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # the Parameters and Secrets extension
                url = urlparse(self.path)
                with recorder.lock:
                    recorder.requests.append(
                        {"method": "GET", "path": url.path, "query": parse_qs(url.query), "headers": self.headers}
                    )
                self._answer(
                    200,
                    {
                        "Parameter": {
                            "Name": parse_qs(url.query)["name"][0],
                            "Type": "SecureString",
                            "Value": "key-from-ssm",
                        }
                    },
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with recorder.lock:
                    recorder.requests.append(
                        {"method": "POST", "path": self.path, "body": body, "headers": self.headers}
                    )
                    status, answer = recorder.script.pop(0) if recorder.script else (None, None)
                if status is None:
                    key = self.headers.get("Idempotency-Key", "")
                    status, answer = 202, {"job_id": f"job-{key[:8]}", "status": "queued"}
                self._answer(status, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def posts(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def api(monkeypatch):
    recorder = Recorder()
    for name in list(__import__("os").environ):
        if name.startswith("AVSR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AVSR_API_URL", recorder.url + "/")
    monkeypatch.setenv("AVSR_API_KEY", "test-key")
    monkeypatch.setenv("AVSR_RETRY_BASE_S", "0.01")
    monkeypatch.setenv("AVSR_HTTP_TIMEOUT_S", "2")
    yield recorder
    recorder.close()


@pytest.fixture()
def handler():
    """A fresh copy of the handler module, loaded by path as Lambda (and the integration test) do."""
    spec = importlib.util.spec_from_file_location("avsr_lambda_handler", HANDLER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Context:
    aws_request_id = "6f5c1a2e-0000-4000-8000-000000000001"

    def __init__(self, remaining_ms: int = 30_000):
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def test_direct_video_job_is_posted_with_key_and_idempotency(api, handler):
    result = handler.lambda_handler(
        {"s3_bucket": "avsr-input", "s3_key": "a/clip.mp4", "modality": "video", "beam_size": 5, "unknown": "dropped"},
        Context(),
    )
    (request,) = api.posts
    assert request["path"] == "/v1/jobs"
    assert request["headers"]["X-API-Key"] == "test-key"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == {"s3_bucket": "avsr-input", "s3_key": "a/clip.mp4", "modality": "video", "beam_size": 5}
    key = request["headers"]["Idempotency-Key"]
    assert len(key) == 64
    assert result == {"job_ids": [f"job-{key[:8]}"], "errors": [], "skipped": []}


def test_direct_prefix_job_with_every_option(api, handler):
    event = {
        "s3_bucket": "b",
        "s3_prefix": "frames/clip7/",
        "modality": "audiovisual",
        "beam_size": 3,
        "callback_url": "https://hooks.example.com/avsr",
        "fps": 25,
        "speaker": {"t": 1.5, "x": 320, "y": 180},
    }
    result = handler.lambda_handler(event)
    assert api.posts[0]["body"] == event
    assert len(result["job_ids"]) == 1 and not result["errors"]


def test_direct_idempotency_key_is_stable_for_a_retried_invocation_and_can_be_given(api, handler):
    event = {"s3_bucket": "b", "s3_key": "x.mp4"}
    handler.lambda_handler(event, Context())
    handler.lambda_handler(event, Context())  # Lambda's retry of an async invocation: same request id
    handler.lambda_handler({**event, "idempotency_key": "caller-chosen"}, Context())
    keys = [r["headers"]["Idempotency-Key"] for r in api.posts]
    assert keys[0] == keys[1] and keys[2] == "caller-chosen"
    assert "idempotency_key" not in api.posts[2]["body"]


@pytest.mark.parametrize(
    "event",
    [
        {"s3_key": "x.mp4"},
        {"s3_bucket": "b"},
        {"s3_bucket": "b", "s3_key": "x.mp4", "s3_prefix": "p/"},
    ],
)
def test_direct_invalid_payload_is_reported_without_a_request(api, handler, event):
    result = handler.lambda_handler(event)
    assert result["job_ids"] == [] and len(result["errors"]) == 1
    assert "exactly one of" in result["errors"][0]["error"]
    assert api.posts == []


def test_s3_put_sample_event_with_url_encoded_key(api, handler):
    result = handler.lambda_handler(copy.deepcopy(S3_PUT_EVENT), Context())
    (request,) = api.posts
    assert request["body"] == {"s3_bucket": "avsr-input", "s3_key": "incoming/talk show(1).mp4"}
    assert result["job_ids"] == [f"job-{request['headers']['Idempotency-Key'][:8]}"]


def test_s3_several_records_videos_marker_frames_and_removals(api, handler, monkeypatch):
    monkeypatch.setenv("AVSR_JOB_MODALITY", "video")
    monkeypatch.setenv("AVSR_JOB_FPS", "25")
    monkeypatch.setenv("AVSR_JOB_CALLBACK_URL", "https://hooks.example.com/avsr")
    event = {
        "Records": [
            s3_record("incoming/a.MOV", sequencer="01"),
            s3_record("incoming/clip+7/000001.jpg", sequencer="02"),
            s3_record("incoming/clip+7/_DONE", sequencer="03"),
            s3_record("incoming/b.webm", event_name="ObjectRemoved:Delete", sequencer="04"),
            s3_record("_DONE", sequencer="05"),
            s3_record("incoming/notes.txt", event_name="ObjectCreated:CompleteMultipartUpload", sequencer="06"),
        ]
    }
    result = handler.lambda_handler(event, Context())
    bodies = [r["body"] for r in api.posts]
    options = {"modality": "video", "callback_url": "https://hooks.example.com/avsr"}
    assert bodies == [  # fps only for frames: the API refuses it for a video
        {"s3_bucket": "avsr-input", "s3_key": "incoming/a.MOV", **options},
        {"s3_bucket": "avsr-input", "s3_prefix": "incoming/clip 7/", **options, "fps": 25.0},
    ]
    assert len(result["job_ids"]) == 2 and result["errors"] == []
    assert [s["s3_key"] for s in result["skipped"]] == [
        "incoming/clip 7/000001.jpg",
        "incoming/b.webm",
        "_DONE",
        "incoming/notes.txt",
    ]


def test_s3_idempotency_keys_stable_across_event_redelivery_and_new_per_upload(api, handler):
    event = {"Records": [s3_record("v/a.mp4", sequencer="0055AED6DCD90281E5"), s3_record("v/b.mp4")]}
    handler.lambda_handler(copy.deepcopy(event), Context())
    handler.lambda_handler(copy.deepcopy(event), Context())  # S3 delivers the same event again
    handler.lambda_handler({"Records": [s3_record("v/a.mp4", sequencer="0055AED6DCD90281F9")]}, Context())
    keys = [r["headers"]["Idempotency-Key"] for r in api.posts]
    assert keys[:2] == keys[2:4] and keys[0] != keys[1]
    assert keys[4] != keys[0], "a new upload of the same key is a new job"


def test_5xx_is_retried_with_the_same_request_then_succeeds(api, handler):
    api.script = [(500, {"error": "boom"}), (503, {"error": "busy"})]
    result = handler.lambda_handler(copy.deepcopy(S3_PUT_EVENT), Context())
    assert len(api.posts) == 3
    assert len({json.dumps(r["body"]) for r in api.posts}) == 1
    assert len({r["headers"]["Idempotency-Key"] for r in api.posts}) == 1
    assert result["job_ids"] and result["errors"] == []


def test_429_is_retried(api, handler):
    api.script = [(429, {"error": "slow down"})]
    result = handler.lambda_handler({"s3_bucket": "b", "s3_key": "x.mp4"})
    assert len(api.posts) == 2 and result["job_ids"]


def test_4xx_is_reported_not_retried_and_does_not_fail_the_s3_event(api, handler):
    api.script = [(400, {"error": "bad modality"})]
    result = handler.lambda_handler(copy.deepcopy(S3_PUT_EVENT), Context())
    assert len(api.posts) == 1
    (error,) = result["errors"]
    assert error["status"] == 400 and error["retryable"] is False and "bad modality" in error["error"]
    assert error["source"] == {"s3_bucket": "avsr-input", "s3_key": "incoming/talk show(1).mp4"}


def test_persistent_5xx_raises_for_s3_events_after_every_record_was_tried(api, handler, monkeypatch):
    monkeypatch.setenv("AVSR_SUBMIT_ATTEMPTS", "3")
    api.script = [(502, {})] * 3  # the first record fails every attempt, the second succeeds
    event = {"Records": [s3_record("v/a.mp4", sequencer="01"), s3_record("v/b.mp4", sequencer="02")]}
    with pytest.raises(handler.SubmitError) as raised:
        handler.lambda_handler(event, Context())
    assert len(api.posts) == 4
    result = json.loads(str(raised.value))
    assert len(result["job_ids"]) == 1 and result["errors"][0]["status"] == 502


def test_persistent_5xx_is_returned_for_direct_invocations(api, handler, monkeypatch):
    monkeypatch.setenv("AVSR_SUBMIT_ATTEMPTS", "2")
    api.script = [(500, {})] * 2
    result = handler.lambda_handler({"s3_bucket": "b", "s3_key": "x.mp4"})
    assert len(api.posts) == 2
    assert result["job_ids"] == [] and result["errors"][0]["retryable"] is True


def test_connection_errors_are_retried_and_reported(handler, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("AVSR_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AVSR_API_KEY", "k")
    monkeypatch.setenv("AVSR_RETRY_BASE_S", "0.01")
    monkeypatch.setenv("AVSR_SUBMIT_ATTEMPTS", "3")
    result = handler.lambda_handler({"s3_bucket": "b", "s3_key": "x.mp4"})
    (error,) = result["errors"]
    assert error["retryable"] is True and error["status"] is None
    with pytest.raises(handler.SubmitError):
        handler.lambda_handler(copy.deepcopy(S3_PUT_EVENT))


def test_retries_stop_when_the_invocation_runs_out_of_time(api, handler, monkeypatch):
    monkeypatch.setenv("AVSR_HTTP_TIMEOUT_S", "5")
    api.script = [(500, {})] * 4
    result = handler.lambda_handler({"s3_bucket": "b", "s3_key": "x.mp4"}, Context(remaining_ms=3000))
    assert len(api.posts) == 1 and result["errors"][0]["status"] == 500


def test_api_key_from_ssm_through_the_extension(api, handler, monkeypatch):
    monkeypatch.delenv("AVSR_API_KEY")
    monkeypatch.setenv("AVSR_API_KEY_PARAMETER", "/avsr/api-key")
    monkeypatch.setenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", api.url.rsplit(":", 1)[1])
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    handler.lambda_handler({"s3_bucket": "b", "s3_key": "x.mp4"})
    handler.lambda_handler({"s3_bucket": "b", "s3_key": "y.mp4"})
    gets = [r for r in api.requests if r["method"] == "GET"]
    assert len(gets) == 1, "the key is cached for the life of the execution environment"
    assert gets[0]["path"] == "/systemsmanager/parameters/get"
    assert gets[0]["query"] == {"name": ["/avsr/api-key"], "withDecryption": ["true"]}
    assert gets[0]["headers"]["X-Aws-Parameters-Secrets-Token"] == "session-token"
    assert [r["headers"]["X-API-Key"] for r in api.posts] == ["key-from-ssm"] * 2


def test_s3_test_event_is_ignored(api, handler):
    event = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2026-11-25T08:00:00.000Z",
        "Bucket": "avsr-input",
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3",
    }
    assert handler.lambda_handler(event)["job_ids"] == []
    assert api.posts == []


def test_missing_api_url_fails_loudly(handler, monkeypatch):
    monkeypatch.delenv("AVSR_API_URL", raising=False)
    with pytest.raises(RuntimeError, match="AVSR_API_URL"):
        handler.lambda_handler({"s3_bucket": "b", "s3_key": "x.mp4"})


def test_forwarded_fields_are_fields_the_api_accepts(handler):
    from api.validation import JOB_FIELDS

    assert set(handler.JOB_FIELDS) <= set(JOB_FIELDS), set(handler.JOB_FIELDS) - set(JOB_FIELDS)


def test_handler_uses_the_standard_library_only():
    import ast

    stdlib = set(sys.stdlib_module_names)
    tree = ast.parse(HANDLER.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported - {"__future__"} <= stdlib, imported - stdlib


def test_a_redirect_is_reported_and_never_followed_with_the_key(handler, monkeypatch):
    seen_elsewhere: list[dict] = []

    def server(answer):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                answer(self)

            do_GET = do_POST

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    def record(request):
        seen_elsewhere.append(dict(request.headers))
        request.send_response(202)
        request.send_header("Content-Length", "2")
        request.end_headers()
        request.wfile.write(b"{}")

    elsewhere = server(record)

    def redirect(request):
        request.send_response(302)
        request.send_header("Location", f"http://127.0.0.1:{elsewhere.server_address[1]}/v1/jobs")
        request.send_header("Content-Length", "0")
        request.end_headers()

    api = server(redirect)
    try:
        for name in [n for n in __import__("os").environ if n.startswith("AVSR_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("AVSR_API_URL", f"http://127.0.0.1:{api.server_address[1]}/")
        monkeypatch.setenv("AVSR_API_KEY", "test-key")
        result = handler.lambda_handler({"s3_bucket": "b", "s3_key": "x.mp4"})
        assert result["job_ids"] == [] and result["errors"][0]["status"] == 302
        assert seen_elsewhere == []
    finally:
        api.shutdown()
        elsewhere.shutdown()


@pytest.mark.parametrize("event", [[], "x", None, 7])
def test_an_event_that_is_not_an_object_is_an_error(api, handler, event):
    result = handler.lambda_handler(event)
    assert result["job_ids"] == [] and "JSON object" in result["errors"][0]["error"]
    assert api.posts == []
