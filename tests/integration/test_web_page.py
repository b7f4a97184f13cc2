"""The web page in a real browser (the system Chromium, headless, via selenium) against the real
stack: upload a generated clip through the page, wait for its captions, and check that the
caption track and the segment list are the job's result. In CI a missing browser is a failure."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import requests
import webvtt

from tests.conftest import ROOT

from .conftest import API_KEY, _unavailable

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("AVSR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AVSR_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT = ROOT / "docs" / "web-page.png"


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _unavailable(f"no Chromium at {CHROMIUM} with {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="avsr-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1000,1150", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_headers(stack):
    response = requests.get(stack.config.api_url + "/", timeout=10)
    assert response.status_code == 200 and "text/html" in response.headers["Content-Type"]
    csp = response.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'self'") and "'unsafe-inline'" not in csp
    assert "<script>" not in response.text and API_KEY not in response.text  # no inline scripts, no secrets
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    docs = requests.get(stack.config.api_url + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    bundle = requests.get(stack.config.api_url + "/docs/assets/swagger-ui-bundle.js", timeout=10)
    assert bundle.status_code == 200 and len(bundle.content) > 100_000


def test_upload_through_the_page_shows_the_captions(browser, stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from deploy.local.sample_media import write_face_video

    clip = tmp_path / "my_talk.mp4"
    write_face_video(clip, seconds=3.0, with_audio=True, seed=9)
    browser.get(stack.config.api_url + "/")
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "file").send_keys(str(clip))
    WebDriverWait(browser, 240, poll_frequency=0.5).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("data-status") in ("succeeded", "failed"))
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-status") == "succeeded", status.text
    job_id = browser.find_element(By.ID, "job-id").text
    job = requests.get(f"{stack.config.api_url}/v1/jobs/{job_id}", headers={"X-API-Key": API_KEY}, timeout=10).json()
    segments = job["result"]["segments"]
    assert job["status"] == "succeeded" and segments
    # The caption track the player loaded (the result's VTT, fetched with the key) holds the segments.
    cues = WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const t = document.getElementById('captions');"
        "return t && t.readyState === 2 ? Array.from(t.track.cues, c => [c.startTime, c.endTime, c.text]) : null;"))
    vtt = requests.get(f"{stack.config.api_url}/v1/jobs/{job_id}/result?format=vtt", headers={"X-API-Key": API_KEY},
                       timeout=10).text
    expected = [(c.start_time.in_milliseconds() / 1000, c.end_time.in_milliseconds() / 1000, c.text)
                for c in webvtt.from_string(vtt)]
    assert [(round(a, 3), round(b, 3), text) for a, b, text in cues] == [(round(a, 3), round(b, 3), t)
                                                                        for a, b, t in expected]
    # (long words are broken over lines: compare the text without its whitespace)
    assert "".join("".join(text.split()) for _, _, text in cues) == "".join("".join(s["text"].split())
                                                                            for s in segments)
    spoken = [s for s in segments if s["text"]]
    assert cues[0][0] == spoken[0]["start"] and round(cues[-1][1], 3) == spoken[-1]["end"]
    # The segment list: every segment with its times, text and confidence; a click seeks the video.
    items = browser.find_elements(By.CSS_SELECTOR, "#segments li")
    assert [(float(i.get_attribute("data-start")), float(i.get_attribute("data-end")),
             i.find_element(By.CLASS_NAME, "text").text) for i in items] == [
        (s["start"], s["end"], s["text"]) for s in segments]
    assert [i.find_element(By.CLASS_NAME, "conf").text for i in items] == [
        f"({round(100 * s['confidence'])}%)" for s in segments]
    items[-1].click()
    WebDriverWait(browser, 10).until(lambda d: abs(
        d.execute_script("return document.getElementById('player').currentTime") - segments[-1]["start"]) < 0.5)
    assert browser.find_element(By.ID, "transcript").text == (job["result"]["text"] or "(no speech recognised)")
    for fmt in ("srt", "vtt", "json"):
        assert browser.find_element(By.ID, f"dl-{fmt}").get_attribute("href").startswith("blob:")
    assert float(browser.find_element(By.ID, "job-bar").get_attribute("value")) == 100.0
    if os.environ.get("AVSR_WRITE_SCREENSHOT"):
        browser.save_screenshot(str(SCREENSHOT))


RECORD_POSTS = """
window.sentBodies = [];
const original = window.fetch;
window.fetch = (path, init) => {
  if (init && init.body) window.sentBodies.push([String(path), JSON.parse(init.body)]);
  return original(path, init);
};"""


def _submitted(browser, stack, monkeypatch) -> tuple[dict, dict]:
    """The body the page POSTed to /v1/jobs and the request stored with that job (then cancelled)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tasks import jobs
    from tasks.settings import get_settings

    job_id = WebDriverWait(browser, 60).until(lambda d: (t := d.find_element(By.ID, "job-id").text) != "–" and t)
    (body,) = [b for path, b in browser.execute_script("return window.sentBodies") if path == "/v1/jobs"]
    monkeypatch.setenv("AVSR_REDIS_URL", stack.config.redis_url)
    get_settings.cache_clear()
    try:
        stored = jobs.get(job_id)["request"]
    finally:
        get_settings.cache_clear()
    requests.delete(f"{stack.config.api_url}/v1/jobs/{job_id}", headers={"X-API-Key": API_KEY}, timeout=10)
    WebDriverWait(browser, 120, poll_frequency=0.5).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("data-status") in ("succeeded", "failed"))
    return body, stored


def test_the_speaker_selector_sends_the_mode(browser, stack, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from deploy.local.sample_media import write_face_video

    clip = tmp_path / "two.mp4"
    write_face_video(clip, seconds=1.0, with_audio=True, seed=4)
    browser.get(stack.config.api_url + "/")
    browser.execute_script(RECORD_POSTS)
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    assert Select(browser.find_element(By.ID, "speaker")).first_selected_option.get_attribute("value") == "largest"
    Select(browser.find_element(By.ID, "speaker")).select_by_value("all")
    browser.find_element(By.ID, "file").send_keys(str(clip))  # a mode: the job starts at once, as before
    body, stored = _submitted(browser, stack, monkeypatch)
    assert body["speaker"] == "all" and stored["speaker"] == "all"
    assert not browser.find_element(By.ID, "pick").is_displayed()


def test_a_click_on_the_video_sends_the_source_pixel_and_time(browser, stack, tmp_path, monkeypatch):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from deploy.local.sample_media import write_face_video

    width, height = 640, 480
    clip = tmp_path / "pointed.mp4"
    write_face_video(clip, seconds=2.0, size=(width, height), with_audio=True, seed=5)
    browser.get(stack.config.api_url + "/")
    browser.execute_script(RECORD_POSTS)
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    Select(browser.find_element(By.ID, "speaker")).select_by_value("point")
    browser.find_element(By.ID, "file").send_keys(str(clip))
    preview = browser.find_element(By.ID, "preview")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const v = document.getElementById('preview'); return v.readyState >= 2 && v.videoWidth > 0"))
    assert browser.find_element(By.ID, "start").get_attribute("disabled") is not None  # no face picked yet
    # seek to 1 s with the keyboard: 25 steps of 0.04 s
    browser.find_element(By.ID, "seek").send_keys(*[Keys.ARROW_RIGHT] * 25)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "seek-text").text == "1.00 s")
    browser.execute_script("arguments[0].scrollIntoView()", preview)
    rect = browser.execute_script("const r = arguments[0].getBoundingClientRect();"
                                  "return [r.left, r.top, r.width, r.height]", preview)
    left, top, box_w, box_h = rect
    # object-fit: contain: the 640x480 frame fills the box's height or width, centred, bars on the sides
    scale = min(box_w / width, box_h / height)
    pad_x, pad_y = (box_w - scale * width) / 2, (box_h - scale * height) / 2
    assert pad_x > 20 or pad_y > 20, "the test expects a letterboxed frame"

    def click(client_x: int, client_y: int) -> None:
        actions = ActionChains(browser)
        actions.w3c_actions.pointer_action.move_to_location(client_x, client_y).click()
        actions.perform()

    note = browser.find_element(By.ID, "hint-note")
    click(int(left + pad_x / 2) if pad_x > 20 else int(left + box_w / 2),  # on a bar: nothing picked
          int(top + box_h / 2) if pad_x > 20 else int(top + pad_y / 2))
    assert note.text == "Click on the face to read."
    client_x, client_y = int(left + pad_x + 0.7 * scale * width), int(top + pad_y + 0.3 * scale * height)
    click(client_x, client_y)
    x, y = int((client_x - left - pad_x) // scale), int((client_y - top - pad_y) // scale)
    assert 0.65 * width < x < 0.75 * width and 0.25 * height < y < 0.35 * height
    assert note.text == f"reading: face at ({x}, {y}), 1.00 s"
    marker = browser.find_element(By.ID, "marker")
    assert marker.is_displayed()
    spot = browser.execute_script("const r = arguments[0].getBoundingClientRect();"
                                  "return [r.left + r.width / 2, r.top + r.height / 2]", marker)
    assert abs(spot[0] - client_x) <= scale + 1 and abs(spot[1] - client_y) <= scale + 1  # where it was clicked
    browser.find_element(By.ID, "clear-hint").click()
    assert note.text == "Click on the face to read." and not marker.is_displayed()
    assert browser.find_element(By.ID, "start").get_attribute("disabled") is not None
    click(client_x, client_y)
    browser.find_element(By.ID, "start").click()
    body, stored = _submitted(browser, stack, monkeypatch)
    assert body["speaker"] == {"t": 1.0, "x": x, "y": y}
    assert stored["speaker"] == {"t": 1.0, "x": float(x), "y": float(y)}


# The job as a two-face job would show it (the workers of this stack read one face): the page's GETs of
# the job are answered here, its upload and submission go to the stack.
FAKE_STATUS = """
const segments = [
  {id: 0, start: 0.0, end: 0.6, text: "hello there", confidence: 0.9, words: [], track: 1},
  {id: 1, start: 0.4, end: 1.0, text: "good day", confidence: 0.8, words: [], track: 2}];
const running = {status: "running", stage: "inference", progress: 0.5, segments_done: 1, segments_total: 2,
                 partial_segments: segments.map(({words, ...s}) => s)};
const done = {status: "succeeded", stage: "finalize", progress: 1, segments_done: 2, segments_total: 2,
              result: {text: "hello there good day", confidence: 0.85, segments, num_frames: 25,
                       transcripts: [{track: 1, text: "hello there", confidence: 0.9},
                                     {track: 2, text: "good day", confidence: 0.8}]}};
const vtt = "WEBVTT\\n\\n0\\n00:00:00.000 --> 00:00:00.600\\n<v track-1>hello there\\n";
const original = window.fetch;
window.finish = false;
window.fetch = (path, init) => {
  const match = String(path).match(/^\\/v1\\/jobs\\/([0-9a-f]{32})(\\/result\\?format=(\\w+))?$/);
  if (!match || (init && init.method !== "GET")) return original(path, init);
  const body = match[3] ? (match[3] === "json" ? JSON.stringify(done.result) : vtt)
                        : JSON.stringify({...(window.finish ? done : running), job_id: match[1], links: {}});
  return Promise.resolve(new Response(body, {status: 200}));
};"""


def test_partial_segments_and_tracks_are_shown(browser, stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from deploy.local.sample_media import write_face_video

    clip = tmp_path / "faces.mp4"
    write_face_video(clip, seconds=1.0, with_audio=True, seed=6)
    browser.get(stack.config.api_url + "/")
    browser.execute_script(FAKE_STATUS)
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "file").send_keys(str(clip))
    partial = WebDriverWait(browser, 60).until(
        lambda d: [li.text for li in d.find_elements(By.CSS_SELECTOR, "#partial li")] or None)
    assert partial == ["track-1 hello there", "track-2 good day"]
    job_id = browser.find_element(By.ID, "job-id").text
    requests.delete(f"{stack.config.api_url}/v1/jobs/{job_id}", headers={"X-API-Key": API_KEY}, timeout=10)
    browser.execute_script("window.finish = true")
    WebDriverWait(browser, 60, poll_frequency=0.5).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("data-status") in ("succeeded", "failed"))
    assert browser.find_element(By.ID, "status").get_attribute("data-status") == "succeeded"
    assert not browser.find_elements(By.CSS_SELECTOR, "#partial li")  # the result replaces them
    items = browser.find_elements(By.CSS_SELECTOR, "#segments li")
    assert [i.find_element(By.CLASS_NAME, "track").text for i in items] == ["track-1", "track-2"]
    assert [i.find_element(By.CLASS_NAME, "text").text for i in items] == ["hello there", "good day"]
    lines = browser.find_elements(By.CSS_SELECTOR, "#transcript .line")
    assert [line.text for line in lines] == ["track-1 hello there", "track-2 good day"]
