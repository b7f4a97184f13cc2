"""Face detection and 68-point landmark tracking with dlib, fast but faithful to the official detector.

The official preparation runs dlib's HOG frontal detector with one upsampling on every full frame (and
the CNN/mmod detector when HOG finds nothing), then the 68-point shape predictor on the last rectangle.
Here each frame is still given a real HOG detection (so "face present" means the same thing), but:

* while a face is tracked, HOG runs only on a small window around the previous landmarks, rescaled
  so the face is about ``roi_face_px`` pixels (cheap; tiny faces get upsampled), and only on every
  ``hog_every``-th frame: a frame between two detected ones gets the predictor on the box interpolated
  between theirs (as accurate as its own HOG box on smooth motion), a frame next to a miss gets its
  own HOG check, so faces appearing or vanishing are still seen frame-exactly;
* without a track, HOG runs on the whole frame downscaled to ``detect_max_side``; only when that keeps
  failing does it escalate (finer scales ×2 each up to ``max_detect_pixels`` — for 640×480 the full
  frame, then the official 2× — then the CNN once per block), on a schedule anchored to absolute frame
  indices (and a last-resort CNN pass over a clip where nothing was found, ``last_resort_detect``);
* the tracker is reset at every multiple of ``block`` frames, so blocks are independent: they run on
  several threads (dlib's HOG releases the GIL, and the 68-point predictor is ``shape_predictor``'s
  GIL-free, bit-exact port of dlib's, since dlib's binding holds the GIL) and a clip cut into chunks
  gives the same landmarks as the whole clip.  When several faces are seen, every one is followed
  through the block (``Track``) and the caller keeps the speaker of the previous block
  (``select_track``); ``TrackLinker`` gives each face a persistent track id across blocks (the face
  tracks of the result).
"""

from __future__ import annotations

import importlib.util
import itertools
import queue
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import dlib
import numpy as np

from cpu_worker.align import to_gray
from cpu_worker.shape_predictor import Rect, ShapePredictor, read_dlib_ints


@dataclass(frozen=True)
class TrackerConfig:
    """Detection / tracking knobs (defaults tuned on 640×480 talking faces)."""

    block: int = 24  # tracker reset period (frames, absolute index multiples)
    hog_every: int = 2  # HOG on frames idx % hog_every == 0; in between, the box is interpolated
    max_faces: int = 4  # faces followed in parallel when several are seen (AVSR_MAX_FACES): the face tracks
    detect_max_side: int = 320  # full-frame HOG image size (longest side)
    roi_face_px: float = 90.0  # face size in the tracking window's detection image
    roi_margin: float = 0.35  # tracking window half-size, in face sizes
    roi_hog_levels: int = 3  # pyramid levels HOG scans in the tracking window (``few_level_detector``)
    finer_hog_levels: int = 5  # ... in a finer whole-frame pass (after the half scale found nothing)
    escalate_every: int = 6  # after this many misses, HOG at finer scales at idx % escalate_every == 0
    max_detect_pixels: int = 1280 * 960  # largest image the escalation feeds to HOG (2× of 640×480)
    use_cnn: bool = True  # CNN (mmod) detector as the last resort
    cnn_phase: int = 12  # CNN tried at most once per block, at idx % block == cnn_phase
    cnn_max_side: int = 320  # CNN input size (longest side; ~0.4 s per call at 320×240)


@dataclass
class DetectionStats:
    """Counters of one tracking run (summed over blocks)."""

    detector_calls: dict[str, int] = field(
        default_factory=lambda: {"roi": 0, "full": 0, "finer": 0, "cnn": 0, "between": 0}
    )
    faces_seen: int = 0

    def merge(self, other: DetectionStats) -> None:
        for k, v in other.detector_calls.items():
            self.detector_calls[k] = self.detector_calls.get(k, 0) + v
        self.faces_seen = max(self.faces_seen, other.faces_seen)


def _models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models (dlib model files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@lru_cache(maxsize=1)
def _shape_predictor() -> ShapePredictor:
    return ShapePredictor(_models_dir() / "shape_predictor_68_face_landmarks.dat")


def few_level_detector(levels: int) -> dlib.fhog_object_detector:
    """dlib's frontal face detector scanning only the first ``levels`` levels of its image pyramid
    (each level 5/6 of the one above; level k finds boxes of about 72 × 1.2^k px), for searches that
    know the face is small:

    * the tracking window is scaled so that the tracked face (``roi_face_px``) is found on the first
      levels (an 86-px box on level 1); deeper ones look for faces 1.4-2× larger than the face two
      frames earlier and cost a third of a window call (``TrackerConfig.roi_hog_levels``);
    * a finer whole-frame pass runs only after the pass at half its scale found nothing, which finds
      every box from 72 px at its own scale, 144 px at the finer one; boxes up to 149 px (level 4)
      cover that, the 8 levels below cost 16 % of the pass (``TrackerConfig.finer_hog_levels``).

    dlib's Python API has no such setting, so the serialised detector's ``max_pyramid_levels`` is
    rewritten; a layout not recognised keeps every level."""
    full = dlib.get_frontal_face_detector()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "detector.svm"
        full.save(str(path))
        data = path.read_bytes()
        # object_detector v2, scan_fhog_pyramid v1, its fields, ..., window w/h, max_pyramid_levels
        values, offsets = read_dlib_ints(data, 9)
        window = [full.detection_window_width, full.detection_window_height]
        if values[:2] != [2, 1] or values[6:8] != window or not 1 <= levels < min(values[8], 128):
            return full
        path.write_bytes(data[: offsets[8]] + bytes([1, levels]) + data[offsets[9] :])
        return dlib.fhog_object_detector(str(path))


class DlibModels:
    """One dlib HOG detector (whole frames), its few-level copies (``few_level_detector``) and the
    68-point predictor (``predictor(gray, rect)`` → int32 [68, 2], like the official
    ``detect_landmark``).  dlib objects are not safe to share between threads (concurrent calls
    corrupt memory), so each worker checks out its own set; the predictor (read-only arrays) is one
    for the process."""

    def __init__(self) -> None:
        self.hog = dlib.get_frontal_face_detector()
        self.predictor = _shape_predictor()
        self._few_level: dict[int, dlib.fhog_object_detector] = {}

    def hog_levels(self, levels: int) -> dlib.fhog_object_detector:
        """The HOG detector scanning ``levels`` pyramid levels (made on first use)."""
        if levels not in self._few_level:
            self._few_level[levels] = few_level_detector(levels)
        return self._few_level[levels]


_free_models: queue.SimpleQueue[DlibModels] = queue.SimpleQueue()


@contextmanager
def checkout_models() -> Iterator[DlibModels]:
    """Borrow a model set (loaded on first need, then reused across calls and threads)."""
    try:
        models = _free_models.get_nowait()
    except queue.Empty:
        models = DlibModels()
    try:
        yield models
    finally:
        _free_models.put(models)


def preload_models(count: int) -> None:
    """Load ``count`` model sets up front (one per worker thread) so the first clip is not slowed down."""
    loaded = []
    for _ in range(count):
        try:
            loaded.append(_free_models.get_nowait())
        except queue.Empty:
            loaded.append(DlibModels())
    for models in loaded:
        _free_models.put(models)


@lru_cache(maxsize=1)
def _cnn() -> tuple[dlib.cnn_face_detection_model_v1, threading.Lock]:
    return dlib.cnn_face_detection_model_v1(str(_models_dir() / "mmod_human_face_detector.dat")), threading.Lock()


# On an image under 16 px on a side dlib's CNN raises, and on some (e.g. 320x3, what a 4000x32 frame
# becomes at `cnn_max_side`) it corrupts its heap and aborts the process. Its window is about 80 px
# (faces of 40 px need an upsampled image), so such an image holds no face it could find: it never
# reaches the network.
CNN_MIN_SIDE = 32


def cnn_detect(gray: np.ndarray, upsample: int = 0) -> list[dlib.rectangle]:
    """dlib CNN (mmod) face detector; serialised because the network is not re-entrant. An image under
    :data:`CNN_MIN_SIDE` px on a side has no face it could find: ``[]``."""
    if min(gray.shape[:2]) < CNN_MIN_SIDE:
        return []
    net, lock = _cnn()
    with lock:
        return [d.rect for d in net(gray, upsample)]


Box = tuple[float, float, float, float]  # left, top, right, bottom in frame pixels


def _to_boxes(rects: list[dlib.rectangle], scale: float, ox: float = 0.0, oy: float = 0.0) -> list[Box]:
    return [
        (
            r.left() / scale + ox,
            r.top() / scale + oy,
            (r.right() + 1) / scale + ox,
            (r.bottom() + 1) / scale + oy,
        )
        for r in rects
    ]


def _to_rect(box: Box) -> Rect:
    left, top, right, bottom = (round(v) for v in box)
    return left, top, right - 1, bottom - 1


def _resize(gray: np.ndarray, scale: float) -> np.ndarray:
    """``gray`` scaled by ``scale``; empty where a side would shrink below one pixel (a 32x200000 frame at
    the detectors' scale: OpenCV refuses an empty size, and such an image holds no face a detector finds)."""
    if scale == 1.0:
        return gray
    height, width = gray.shape[:2]
    if round(width * scale) < 1 or round(height * scale) < 1:  # OpenCV rounds the size the same way
        return gray[:0, :0]
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(gray, None, fx=scale, fy=scale, interpolation=interp)


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


class FaceTracker:
    """Per-block tracker: feed grey frames in order with their absolute index; get landmarks or None."""

    def __init__(self, shape: tuple[int, int], models: DlibModels, config: TrackerConfig | None = None) -> None:
        self.cfg = config or TrackerConfig()
        self.models = models
        self.height, self.width = shape
        self.full_scale = min(1.0, self.cfg.detect_max_side / max(self.height, self.width))
        self.escalation_scales: list[float] = []
        scale = self.full_scale * 2.0
        while scale <= 2.0 and scale * scale * self.height * self.width <= self.cfg.max_detect_pixels:
            self.escalation_scales.append(scale)
            scale *= 2.0
        self.prev: np.ndarray | None = None  # landmarks of the previous frame when it had a face
        self.last_box: Box | None = None  # last face box seen (for choosing among several faces)
        self.last_size: float | None = None
        self.miss = 0
        self.last_miss_idx: int | None = None  # previous key frame, when it had no face
        self.finer_tried = False
        self.first_box: Box | None = None
        self.alternatives: list[Box] = []  # other faces seen when the first face was chosen
        self.stats = DetectionStats()

    def reset(self) -> None:
        self.prev = self.last_box = self.last_size = self.last_miss_idx = None
        self.miss = 0
        self.finer_tried = False

    # -- detectors -----------------------------------------------------------------------------------
    def _hog(self, img: np.ndarray, upsample: int, kind: str) -> list[dlib.rectangle]:
        self.stats.detector_calls[kind] += 1
        levels = {"roi": self.cfg.roi_hog_levels, "finer": self.cfg.finer_hog_levels}.get(kind)
        detector = self.models.hog if levels is None else self.models.hog_levels(levels)
        return list(detector(img, upsample))

    def _detect_roi(self, gray: np.ndarray, prev: np.ndarray) -> list[Box]:
        x0, y0 = prev.min(axis=0)
        x1, y1 = prev.max(axis=0)
        size = float(max(x1 - x0, y1 - y0, 8))
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        half = size * (0.5 + self.cfg.roi_margin)
        left, top = int(max(0, cx - half)), int(max(0, cy - half))
        right, bottom = int(min(self.width, cx + half)), int(min(self.height, cy + half))
        if right - left < 16 or bottom - top < 16:
            return []
        scale = self.cfg.roi_face_px / size
        img = _resize(np.ascontiguousarray(gray[top:bottom, left:right]), scale)
        return _to_boxes(self._hog(img, 0, "roi"), scale, left, top)

    def _detect_full(self, gray: np.ndarray, idx: int) -> list[Box]:
        """Whole-frame HOG at the fast scale; on a miss, escalate through finer scales (×2 each, up to
        ``max_detect_pixels``) on a schedule anchored to absolute frame indices, then the CNN."""
        cfg = self.cfg
        boxes = _to_boxes(self._hog(_resize(gray, self.full_scale), 0, "full"), self.full_scale)
        if boxes:
            return boxes
        escalate = self.miss >= cfg.escalate_every and idx % cfg.escalate_every == 0
        # a face this block has not seen yet, or one too small for the fast pass, may need finer scales
        small_face_possible = self.last_size is None or self.last_size * self.full_scale < 70.0
        # one early look at the next finer scale: on the period's first look when no face was seen yet
        # (a face under ~160 px in 640×480 is too small for the fast pass), else on the second miss in a
        # row; then only on the schedule
        early = small_face_possible and (self.miss > 0 or self.last_size is None) and not self.finer_tried
        for level, scale in enumerate(self.escalation_scales):
            if not (escalate or (level == 0 and early)):
                break
            self.finer_tried = True
            boxes = _to_boxes(self._hog(_resize(gray, scale), 0, "finer"), scale)
            if boxes:
                return boxes
        if cfg.use_cnn and self.miss >= cfg.cnn_phase and idx % cfg.block == cfg.cnn_phase:
            self.stats.detector_calls["cnn"] += 1
            scale = min(1.0, cfg.cnn_max_side / max(self.height, self.width))
            boxes = _to_boxes(cnn_detect(_resize(gray, scale)), scale)
        return boxes

    # -- selection -----------------------------------------------------------------------------------
    def _choose(self, boxes: list[Box]) -> Box:
        if len(boxes) == 1:
            return boxes[0]
        if self.last_box is not None:
            lx, ly = _centre(self.last_box)
            return min(boxes, key=lambda b: (_centre(b)[0] - lx) ** 2 + (_centre(b)[1] - ly) ** 2)
        fx, fy, diag = self.width / 2.0, self.height / 2.0, float(np.hypot(self.width, self.height))

        def score(b: Box) -> float:
            cx, cy = _centre(b)
            area = (b[2] - b[0]) * (b[3] - b[1])
            return area * (1.0 - np.hypot(cx - fx, cy - fy) / diag)

        return max(boxes, key=score)

    # -- main step -----------------------------------------------------------------------------------
    def step(self, gray: np.ndarray, idx: int) -> np.ndarray | None:
        """Landmarks int32 [68,2] for frame ``idx`` (absolute index), or None if no face is found."""
        if self.last_miss_idx is not None:  # frames since the last miss (and the ones skipped after it)
            self.miss += idx - self.last_miss_idx
            self.last_miss_idx = None
        if self.prev is not None:
            # tracked: look only around the previous face; if it is gone, the next key frame searches
            boxes = self._detect_roi(gray, self.prev)
        else:
            boxes = self._detect_full(gray, idx)
            self.stats.faces_seen = max(self.stats.faces_seen, len(boxes))
        if not boxes:
            self.prev = None
            self.last_miss_idx = idx
            return None
        box = self._choose(boxes)
        if self.first_box is None:  # the first face of this period decides which face it follows
            self.first_box, self.alternatives = box, [b for b in boxes if b is not box]
        lm = self.models.predictor(gray, _to_rect(box))
        self.prev, self.last_box, self.miss, self.finer_tried = lm, box, 0, False
        self.last_size = max(box[2] - box[0], box[3] - box[1])
        return lm

    def detect_near(self, gray: np.ndarray, hint: np.ndarray) -> tuple[np.ndarray | None, Box | None]:
        """Stateless check of one frame next to a tracked one: HOG around the neighbour's ``hint``
        landmarks only (the same face, one frame away); the face nearest to the hint is kept."""
        boxes = self._detect_roi(gray, hint)
        if not boxes:
            return None, None
        hx, hy = (hint.min(axis=0) + hint.max(axis=0)) / 2.0
        box = min(boxes, key=lambda b: (_centre(b)[0] - hx) ** 2 + (_centre(b)[1] - hy) ** 2)
        return self.models.predictor(gray, _to_rect(box)), box

    def predict_between(self, gray: np.ndarray, box_a: Box, box_b: Box, w: float) -> np.ndarray:
        """Landmarks from the detector box interpolated between two detected neighbours (no HOG)."""
        self.stats.detector_calls["between"] += 1
        box = tuple(a + w * (b - a) for a, b in zip(box_a, box_b, strict=True))
        return self.models.predictor(gray, _to_rect(box))  # type: ignore[arg-type]


@dataclass
class Track:
    """One face followed through a reset period."""

    landmarks: list[np.ndarray | None]
    first_box: Box | None  # box where the face was first found in the period
    last_box: Box | None  # box where it was last seen


def _track_period(tracker: FaceTracker, grays: list[np.ndarray], start: int) -> list[np.ndarray | None]:
    """One reset period: HOG-tracked key frames (every ``hog_every``-th absolute index, the first and
    the last frame), then the frames in between from the interpolated box of their two detected neighbours, or
    their own HOG check when a neighbour has no face (so faces appearing / vanishing are not missed)."""
    n, k = len(grays), max(1, tracker.cfg.hog_every)
    keys = [i for i in range(n) if (start + i) % k == 0 or i in (0, n - 1)]
    out: list[np.ndarray | None] = [None] * n
    boxes: list[Box | None] = [None] * n
    for i in keys:
        out[i] = tracker.step(grays[i], start + i)
        boxes[i] = tracker.last_box if out[i] is not None else None
    for p, q in itertools.pairwise(keys):
        for i in range(p + 1, q):
            a, b = out[p], out[q]
            if a is not None and b is not None:
                box_a, box_b = boxes[p], boxes[q]
                assert box_a is not None and box_b is not None
                out[i] = tracker.predict_between(grays[i], box_a, box_b, (i - p) / (q - p))
            elif a is not None or b is not None:
                out[i], _ = tracker.detect_near(grays[i], a if a is not None else b)  # type: ignore[arg-type]
    return out


def track_block(
    frames: list[np.ndarray], start: int, config: TrackerConfig | None = None
) -> tuple[list[list[Track]], list[np.ndarray], DetectionStats]:
    """Track faces in consecutive frames (BGR or grey) starting at absolute index ``start``; the tracker
    is reset at every multiple of ``config.block`` (and when the frame size changes).

    Returns, per reset period in order, the candidate tracks — the largest/most central face first,
    then (only when several faces were seen) one track per other face (at most ``max_faces``) — so the
    caller can keep following the same speaker across periods (``select_track``); and the grey frames.
    """
    cfg = config or TrackerConfig()
    grays = [np.ascontiguousarray(to_gray(f)) for f in frames]
    stats = DetectionStats()
    periods: list[list[Track]] = []
    with checkout_models() as models:
        i = 0
        while i < len(grays):
            j = i + 1
            while j < len(grays) and (start + j) % cfg.block != 0 and grays[j].shape[:2] == grays[i].shape[:2]:
                j += 1
            tracker = FaceTracker(grays[i].shape[:2], models, cfg)
            tracker.stats = stats
            lms = _track_period(tracker, grays[i:j], start + i)
            candidates = [Track(lms, tracker.first_box, tracker.last_box)]
            for alt in tracker.alternatives[: cfg.max_faces - 1]:
                forced = FaceTracker(grays[i].shape[:2], models, cfg)
                forced.stats, forced.last_box = stats, alt  # choose the face nearest to ``alt``
                lms = _track_period(forced, grays[i:j], start + i)
                candidates.append(Track(lms, forced.first_box, forced.last_box))
            periods.append(candidates)
            i = j
    return periods, grays, stats


def select_track(candidates: list[Track], previous: Box | None) -> Track:
    """Keep following the speaker: the candidate starting nearest to where the previous period's track
    ended; without a previous track, the default (largest / most central) one."""
    if previous is None or len(candidates) == 1:
        return candidates[0]
    px, py = _centre(previous)
    found = [c for c in candidates if c.first_box is not None]
    if not found:
        return candidates[0]
    return min(found, key=lambda c: (_centre(c.first_box)[0] - px) ** 2 + (_centre(c.first_box)[1] - py) ** 2)  # type: ignore[arg-type]


class TrackLinker:
    """Persistent face-track ids across reset periods: a period's candidate continues the track whose last
    box (in an earlier period) is nearest to where the candidate starts, if their centres are less than half
    a face apart; other candidates open new tracks, at most ``max_tracks`` in all (later faces are not
    followed as tracks)."""

    def __init__(self, max_tracks: int) -> None:
        self.max_tracks = max_tracks
        self.last: dict[int, Box] = {}  # track id -> where it was last seen

    def link(self, candidates: list[Track]) -> dict[int, Track]:
        """The candidates of one period by track id (candidates without a face, or past the cap, left out)."""
        matched = nearest_tracks([cand.first_box for cand in candidates], self.last)
        linked = {tid: candidates[c] for c, tid in matched.items()}
        used = set(matched)
        for c, cand in enumerate(candidates):
            if cand.first_box is None or c in used:
                continue
            if any(_same_face(cand, other) for other in linked.values()):
                continue  # two trackers ended on one face
            if len(self.last) >= self.max_tracks:
                break
            tid = len(self.last)
            self.last[tid] = cand.first_box
            linked[tid] = cand
        for tid, cand in linked.items():
            self.last[tid] = cand.last_box or cand.first_box or self.last[tid]
        return linked


def nearest_tracks(boxes: Sequence[Box | None], last: Mapping[int, Box | None]) -> dict[int, int]:
    """Which track each new face box continues, ``{box index: track id}``: one to one, nearest centres
    first, only where the centres are less than half the new face apart (the rule for linking faces
    across reset periods and across chunk boundaries)."""
    pairs = []
    for c, box in enumerate(boxes):
        if box is None:
            continue
        cx, cy = _centre(box)
        size = max(box[2] - box[0], box[3] - box[1])
        for tid, seen in last.items():
            if seen is not None:
                d = float(np.hypot(_centre(seen)[0] - cx, _centre(seen)[1] - cy))
                if d < 0.5 * size:
                    pairs.append((d, c, tid))
    matched: dict[int, int] = {}
    for _, c, tid in sorted(pairs):
        if c not in matched and tid not in matched.values():
            matched[c] = tid
    return matched


def _same_face(a: Track, b: Track) -> bool:
    if a.first_box is None or b.first_box is None:
        return False
    size = max(a.first_box[2] - a.first_box[0], a.first_box[3] - a.first_box[1])
    (ax, ay), (bx, by) = _centre(a.first_box), _centre(b.first_box)
    return bool(np.hypot(ax - bx, ay - by) < 0.25 * size)


def last_resort_detect(
    grays: list[np.ndarray], config: TrackerConfig | None = None, tries: int = 3, stats: DetectionStats | None = None
) -> tuple[int, np.ndarray] | None:
    """For a clip where the tracker found nothing: the CNN detector on up to ``tries`` evenly spaced
    frames (the official code would run it on every such frame).  Returns (position, landmarks)."""
    cfg = config or TrackerConfig()
    if not cfg.use_cnn or not grays:
        return None
    picks = sorted({round(k * (len(grays) - 1) / max(1, tries - 1)) for k in range(tries)})
    with checkout_models() as models:
        for i in picks:
            if stats is not None:
                stats.detector_calls["cnn"] += 1
            gray = grays[i]
            scale = min(1.0, cfg.cnn_max_side / max(gray.shape[:2]))
            boxes = _to_boxes(cnn_detect(_resize(gray, scale)), scale)
            if boxes:
                box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
                return i, models.predictor(gray, _to_rect(box))
    return None
