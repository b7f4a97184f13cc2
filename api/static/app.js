// The page: upload a video (presigned PUT), submit it, follow the job, then play it with captions.
// Whom to read: a speaker mode, or (mode "point") the face the user clicks in a preview of the video,
// sent as {t, x, y} in the source video's own pixels.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "cancelled"];
let picked = null; // the file waiting in the preview (mode "point")
let hint = null; // {t, x, y}: the clicked point, seconds and source-video pixels

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key, ...extra } : extra;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) {
    let error = { code: "http_" + response.status, message: response.statusText };
    try { error = (await response.json()).error || error; } catch (e) { /* not JSON */ }
    throw Object.assign(new Error(error.message), { code: error.code });
  }
  return response;
}

function setStatus(status, text) {
  $("status").dataset.status = status;
  $("status").className = status;
  $("status").textContent = text;
}

function put(grant, file) {
  // XMLHttpRequest, not fetch: fetch reports no upload progress.
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(grant.method, grant.upload_url);
    for (const [name, value] of Object.entries(grant.headers)) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) {
        $("upload-bar").value = (100 * event.loaded) / event.total;
        const mib = (n) => (n / 1048576).toFixed(1);
        $("upload-text").textContent = `${mib(event.loaded)} / ${mib(event.total)} MiB`;
      }
    };
    xhr.onload = () => {
      if (xhr.status < 300) {
        $("upload-bar").value = 100;
        resolve();
      } else {
        reject(Object.assign(new Error(`the upload URL answered ${xhr.status}`), { code: "upload_failed" }));
      }
    };
    xhr.onerror = () => reject(Object.assign(new Error("the upload did not reach S3"), { code: "upload_failed" }));
    xhr.send(file);
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Several face tracks among the segments: each is labelled with its track.
const labelled = (segments) => new Set(segments.filter((s) => "track" in s).map((s) => s.track)).size > 1;

function trackLabel(segment, label) {
  const span = document.createElement("span");
  span.className = "track";
  span.textContent = label && "track" in segment ? `track-${segment.track} ` : "";
  return span;
}

function showPartial(segments) {
  const label = labelled(segments);
  $("partial").replaceChildren(...segments.map((segment) => {
    const item = document.createElement("li");
    item.append(trackLabel(segment, label), segment.text);
    return item;
  }));
}

async function follow(jobId) {
  let delay = 300;
  for (;;) {
    const job = await (await api("GET", `/v1/jobs/${jobId}`)).json();
    $("job-bar").value = 100 * job.progress;
    const segments = job.segments_total ? ` · segments ${job.segments_done}/${job.segments_total}` : "";
    $("job-text").textContent = `${job.stage} ${(100 * job.progress).toFixed(0)}%${segments}`;
    if (job.partial_segments) showPartial(job.partial_segments);
    if (TERMINAL.includes(job.status)) return job;
    await sleep(delay);
    delay = Math.min(2000, delay * 1.3);
  }
}

async function blobUrl(jobId, format) {
  const response = await api("GET", `/v1/jobs/${jobId}/result?format=${format}`);
  return URL.createObjectURL(await response.blob());
}

function clock(seconds) {
  const minutes = Math.floor(seconds / 60);
  return `${String(minutes).padStart(2, "0")}:${(seconds - 60 * minutes).toFixed(2).padStart(5, "0")}`;
}

function segmentItem(segment, player, label) {
  const item = document.createElement("li");
  Object.assign(item.dataset, { start: segment.start, end: segment.end, id: segment.id });
  item.appendChild(trackLabel(segment, label));
  const parts = [["time", `${clock(segment.start)} – ${clock(segment.end)} `], ["text", segment.text],
                 ["conf", ` (${Math.round(100 * segment.confidence)}%)`]];
  for (const [cls, content] of parts) {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = content;
    item.appendChild(span);
  }
  item.addEventListener("click", () => { player.currentTime = segment.start; player.play().catch(() => {}); });
  return item;
}

async function show(job, file) {
  const player = $("player");
  player.replaceChildren();
  player.src = URL.createObjectURL(file);
  const track = document.createElement("track");
  Object.assign(track, { id: "captions", kind: "captions", label: "Lip reading", srclang: "en", default: true });
  track.src = await blobUrl(job.job_id, "vtt");
  player.appendChild(track);
  track.track.mode = "showing";
  const transcripts = job.result.transcripts || [];
  if (transcripts.length > 1) {
    $("transcript").replaceChildren(...transcripts.map((t) => {
      const line = document.createElement("span");
      line.className = "line";
      line.append(trackLabel(t, true), t.text);
      return line;
    }));
  } else {
    $("transcript").textContent = job.result.text || "(no speech recognised)";
  }
  $("partial").replaceChildren();
  const list = $("segments");
  const label = labelled(job.result.segments);
  list.replaceChildren(...job.result.segments.map((segment) => segmentItem(segment, player, label)));
  player.ontimeupdate = () => {
    for (const item of list.children) {
      const t = player.currentTime;
      item.classList.toggle("active", t >= +item.dataset.start && t < +item.dataset.end);
    }
  };
  for (const format of ["srt", "vtt", "json"]) $(`dl-${format}`).href = await blobUrl(job.job_id, format);
  $("result").hidden = false;
}

function speaker() {
  return $("speaker").value === "point" ? hint : $("speaker").value;
}

async function transcribe(file) {
  $("pick").hidden = true;
  $("partial").replaceChildren();
  $("job").hidden = false;
  $("result").hidden = true;
  $("file-name").textContent = file.name;
  $("job-id").textContent = "–";
  $("upload-bar").value = 0;
  $("job-bar").value = 0;
  $("upload-text").textContent = "";
  $("job-text").textContent = "";
  try {
    setStatus("uploading", "uploading…");
    const type = file.type.startsWith("video/") ? file.type : "application/octet-stream";
    const grant = await (await api("POST", "/v1/uploads", { filename: file.name, size: file.size,
                                                             content_type: type })).json();
    await put(grant, file);
    const job = await (await api("POST", "/v1/jobs", { upload_id: grant.upload_id, speaker: speaker() })).json();
    $("job-id").textContent = job.job_id;
    setStatus("running", "transcribing…");
    const done = await follow(job.job_id);
    if (done.status !== "succeeded") {
      const error = done.error || { code: "job_cancelled", message: "the job was cancelled" };
      setStatus("failed", `${error.code}: ${error.message}`);
      return;
    }
    await show(done, file);
    setStatus("succeeded", "done");
  } catch (error) {
    setStatus("failed", `${error.code || "error"}: ${error.message}`);
  }
}

// --- "the face I click": a preview of the picked file, seeked with a slider, clicked on a face ----------

function frameBox(video) {
  // Where the frame is drawn in the element: scaled to fit (object-fit: contain) and centred.
  const box = video.getBoundingClientRect();
  const scale = Math.min(box.width / video.videoWidth, box.height / video.videoHeight);
  return { box, scale, left: (box.width - scale * video.videoWidth) / 2,
           top: (box.height - scale * video.videoHeight) / 2 };
}

function sourcePixel(video, clientX, clientY) {
  // A click (CSS pixels of the viewport) → the pixel of the source video under it; null on a bar.
  const { box, scale, left, top } = frameBox(video);
  const x = (clientX - box.left - left) / scale;
  const y = (clientY - box.top - top) / scale;
  if (!(x >= 0 && y >= 0 && x < video.videoWidth && y < video.videoHeight)) return null;
  return { x: Math.floor(x), y: Math.floor(y) };
}

function showHint() {
  const preview = $("preview");
  const marker = $("marker");
  marker.hidden = !hint || Math.abs(preview.currentTime - hint.t) > 0.02; // only on the clicked frame
  $("clear-hint").hidden = !hint;
  $("hint-note").textContent = hint ? `reading: face at (${hint.x}, ${hint.y}), ${hint.t.toFixed(2)} s`
    : "Click on the face to read.";
  $("start").disabled = $("speaker").value === "point" && !hint;
  if (!marker.hidden) {
    const { scale, left, top } = frameBox(preview);
    marker.style.left = `${preview.offsetLeft + left + (hint.x + 0.5) * scale}px`;
    marker.style.top = `${preview.offsetTop + top + (hint.y + 0.5) * scale}px`;
  }
}

function choose(file) {
  if ($("speaker").value !== "point") {
    transcribe(file);
    return;
  }
  picked = file;
  hint = null;
  $("preview").src = URL.createObjectURL(file);
  $("pick").hidden = false;
  showHint();
}

$("preview").addEventListener("loadedmetadata", () => {
  $("seek").max = $("preview").duration;
  $("seek").value = 0;
});
$("preview").addEventListener("seeked", () => {
  $("seek-text").textContent = `${$("preview").currentTime.toFixed(2)} s`;
  showHint();
});
$("seek").addEventListener("input", () => { $("preview").currentTime = +$("seek").value; });
$("preview").addEventListener("click", (event) => {
  const preview = $("preview");
  const at = preview.videoWidth ? sourcePixel(preview, event.clientX, event.clientY) : null;
  if (!at) return;
  hint = { t: Math.round(1000 * preview.currentTime) / 1000, x: at.x, y: at.y };
  showHint();
});
$("clear-hint").addEventListener("click", () => { hint = null; showHint(); });
$("speaker").addEventListener("change", showHint);
$("start").addEventListener("click", () => { if (picked) transcribe(picked); });
window.addEventListener("resize", showHint);

$("file").addEventListener("change", () => { if ($("file").files.length) choose($("file").files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) choose(event.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("file").click(); });
