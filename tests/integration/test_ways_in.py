"""The ways in without S3 or curl, against the real stack: uploads (presigned PUT into the work
bucket), URL inputs (a real HTTP server), the Python client and the `avsr` command line, remote
and local (`avsr transcribe` gives what the service gives for the same clip)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from avsr_client import AvsrError, Client, JobFailed
from tasks.subtitles import segments_to_srt
from tests.conftest import ROOT

from .conftest import API_KEY, CHECKPOINT, INPUT_BUCKET

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from deploy.local.sample_media import write_face_video

    path = tmp_path_factory.mktemp("clips") / "talk.mp4"
    write_face_video(path, seconds=5.0, with_audio=True, seed=5)  # 125 frames: two chunks in the test stack
    return path


@pytest.fixture(scope="module")
def client(stack) -> Client:
    return Client(stack.config.api_url, API_KEY)


@pytest.fixture(scope="module")
def s3_result(api, s3, clip) -> dict:
    """The same clip submitted the old way (an object in S3): what every other way in must give."""
    s3.upload_file(str(clip), INPUT_BUCKET, "ways-in/talk.mp4")
    job = api.wait(api.submit({"s3_bucket": INPUT_BUCKET, "s3_key": "ways-in/talk.mp4", "beam_size": 2}))
    assert job["status"] == "succeeded", job
    return job["result"]


def same_transcript(a: dict, b: dict) -> None:
    strip = ("id", "start", "end", "text")
    assert [{k: s[k] for k in strip} for s in a["segments"]] == [{k: s[k] for k in strip} for s in b["segments"]]
    assert [s["confidence"] for s in a["segments"]] == pytest.approx([s["confidence"] for s in b["segments"]],
                                                                    abs=1e-4)
    assert (a["text"], a["num_frames"], a["modality"]) == (b["text"], b["num_frames"], b["modality"])


def test_client_upload_gives_the_s3_result(client, clip, s3_result, s3, stack):
    updates = []
    result = client.transcribe_file(clip, beam_size=2, timeout=300, on_update=updates.append)
    same_transcript(result, s3_result)
    assert updates[-1]["status"] == "succeeded" and updates[-1]["progress"] == 1.0
    job_id = updates[-1]["job_id"]
    assert client.result(job_id, format="srt") == requests.get(
        f"{stack.config.api_url}/v1/jobs/{job_id}/result?format=srt", headers={"X-API-Key": API_KEY}).text
    assert "-->" in client.result(job_id, format="vtt")


def test_upload_over_the_cap_is_413(client, stack):
    limit = 2 * 1024**3  # the stack's AVSR_MAX_INPUT_BYTES (default)
    response = requests.post(f"{stack.config.api_url}/v1/uploads", headers={"X-API-Key": API_KEY},
                             json={"size": limit + 1, "content_type": "video/mp4"}, timeout=10)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "input_too_large"


@pytest.mark.parametrize(("body", "code"), [
    ({}, "missing_field"), ({"size": "12"}, "invalid_field"), ({"size": 0}, "invalid_field"),
    ({"size": 10, "content_type": "text/html"}, "invalid_field"), ({"size": 10, "name": "x"}, "unknown_field"),
    # what would go into the signature and the PUT's header: lone surrogates, line breaks, no subtype
    ({"size": 10, "content_type": "video/\ud800"}, "invalid_field"),
    ({"size": 10, "content_type": "video/mp4\r\nX-Injected: 1"}, "invalid_field"),
    ({"size": 10, "content_type": "video/"}, "invalid_field"), ({"size": 10, "content_type": "video/" + "a" * 95},
                                                                "invalid_field"),
])
def test_bad_upload_requests(stack, body, code):
    response = requests.post(f"{stack.config.api_url}/v1/uploads", headers={"X-API-Key": API_KEY}, json=body,
                             timeout=10)
    assert (response.status_code, response.json()["error"]["code"]) == (400, code)


def test_upload_needs_the_key(stack):
    response = requests.post(f"{stack.config.api_url}/v1/uploads", json={"size": 10}, timeout=10)
    assert response.status_code == 401


def test_presigned_url_takes_only_the_declared_size(client, stack, s3):
    grant = client._request("POST", "/v1/uploads", json={"size": 10, "content_type": "video/mp4"}).json()
    too_long = requests.put(grant["upload_url"], data=b"x" * 11, headers=grant["headers"], timeout=10)
    assert too_long.status_code in (400, 403), too_long.text
    exact = requests.put(grant["upload_url"], data=b"x" * 10, headers=grant["headers"], timeout=10)
    assert exact.status_code == 200, exact.text
    listed = s3.list_objects_v2(Bucket="avsr-test-work", Prefix="uploads/").get("Contents", [])
    key = next(o["Key"] for o in listed if o["Key"].endswith(f"/{grant['upload_id']}/video"))  # under its tenant
    head = s3.head_object(Bucket="avsr-test-work", Key=key)
    assert head["ContentLength"] == 10


def test_upload_that_is_not_a_video_fails_bad_media(client, tmp_path):
    junk = tmp_path / "notes.mp4"
    junk.write_bytes(b"this is not a video at all\n" * 100)
    job = client.submit(upload_id=client.upload(junk))
    done = client.wait(job["job_id"], timeout=120)
    assert (done["status"], done["error"]["code"]) == ("failed", "bad_media")
    with pytest.raises(JobFailed) as info:
        client.transcribe_file(junk, timeout=120)
    assert info.value.code == "bad_media"


def test_upload_never_sent_fails_input_not_found(client):
    grant = client._request("POST", "/v1/uploads", json={"size": 10}).json()
    done = client.wait(client.submit(upload_id=grant["upload_id"])["job_id"], timeout=120)
    assert (done["status"], done["error"]["code"]) == ("failed", "input_not_found")


# --- URL inputs ---------------------------------------------------------------------------------

class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def file_server(clip):
    (clip.parent / "page.html").write_text("<html>not a video</html>")
    handler = functools.partial(_Files, directory=str(clip.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_url_input_gives_the_s3_result(client, file_server, s3_result, s3, clip):
    job = client.submit(url=f"{file_server}/talk.mp4", beam_size=2)
    done = client.wait(job["job_id"], timeout=300)
    assert done["status"] == "succeeded", done
    same_transcript(done["result"], s3_result)
    # fetched once into the job's work prefix, where every chunk task reads it
    head = s3.head_object(Bucket="avsr-test-work", Key=f"jobs/{job['job_id']}/input.video")
    assert head["ContentLength"] == clip.stat().st_size


@pytest.mark.parametrize(("path", "code"), [("/page.html", "url_not_video"), ("/missing.mp4", "url_fetch_failed")])
def test_bad_url_inputs_fail_with_their_code(client, file_server, path, code):
    done = client.wait(client.submit(url=file_server + path)["job_id"], timeout=120)
    assert (done["status"], done["error"]["code"]) == ("failed", code)


# --- the command line -----------------------------------------------------------------------------

def avsr(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avsr_client.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_cli_remote_submit_wait_result(stack, clip, s3_result):
    env = {"AVSR_URL": stack.config.api_url, "AVSR_API_KEY": API_KEY}
    submitted = avsr("submit", str(clip), "--beam", "2", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    waited = avsr("wait", job_id, env=env)
    assert waited.returncode == 0, waited.stderr
    same_transcript(json.loads(waited.stdout)["result"], s3_result)
    assert "succeeded" in waited.stderr  # the progress line
    srt = avsr("result", job_id, "--format", "srt", env=env)
    assert srt.returncode == 0 and srt.stdout == Client(stack.config.api_url, API_KEY).result(job_id, "srt")
    status = avsr("--url", stack.config.api_url, "--api-key", API_KEY, "status", job_id)
    assert json.loads(status.stdout)["job_id"] == job_id


def test_cli_prints_the_api_error_and_fails(stack):
    env = {"AVSR_URL": stack.config.api_url, "AVSR_API_KEY": API_KEY}
    missing = avsr("status", "f" * 32, env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("error: job_not_found:")
    unauthorized = avsr("--api-key", "wrong", "status", "f" * 32, env={"AVSR_URL": stack.config.api_url})
    assert unauthorized.returncode == 1 and unauthorized.stderr.startswith("error: unauthorized:")
    with pytest.raises(AvsrError) as info:
        Client(stack.config.api_url, API_KEY).submit(url="ftp://example.org/a.mp4")
    assert (info.value.code, info.value.status) == ("url_not_allowed", 400)


def test_cli_local_transcribe_matches_the_service(clip, s3_result):
    # the stack's segmentation settings (tests/integration/conftest.py), no Redis or S3 needed
    env = {"AVSR_CHUNK_FRAMES": "100", "AVSR_MAX_SEGMENT_S": "4", "AVSR_REDIS_URL": "redis://127.0.0.1:1/0",
           "AVSR_S3_ENDPOINT_URL": "http://127.0.0.1:1"}
    local = avsr("transcribe", str(clip), "--format", "json", "--beam", "2", "--device", "cpu",
                 "--model", str(CHECKPOINT), env=env)
    assert local.returncode == 0, local.stderr
    same_transcript(json.loads(local.stdout), s3_result)
    assert "decoding" in local.stderr  # the progress bar
    srt = avsr("transcribe", str(clip), "--format", "srt", "--beam", "2", "--device", "cpu", "--quiet",
               env={**env, "AVHUBERT_MODEL_PATH": str(CHECKPOINT)})
    assert srt.returncode == 0 and srt.stderr == ""
    assert srt.stdout == segments_to_srt(s3_result["segments"])
