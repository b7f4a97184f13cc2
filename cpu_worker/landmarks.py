"""Face detection and 68-point landmark tracking with dlib, fast but faithful to the official detector.

The official preparation runs dlib's HOG frontal detector with one upsampling on every full frame (and
the CNN/mmod detector when HOG finds nothing), then the 68-point shape predictor on the last rectangle.
Here each frame is still given a real HOG detection (so "face present" means the same thing), but:

* while a face is tracked, HOG runs only on a small window around the previous frame's landmarks,
  rescaled so the face is about ``roi_face_px`` pixels (cheap; tiny faces get upsampled);
* without a track, HOG runs on the whole frame downscaled to ``detect_max_side``; only when that keeps
  failing does it escalate (full resolution, then one upsampling, then the CNN detector), on a
  schedule anchored to absolute frame indices;
* the tracker is reset at every multiple of ``block`` frames, so blocks are independent: they run on
  several threads and a clip cut into chunks gives the same landmarks as the whole clip.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import dlib
import numpy as np


@dataclass(frozen=True)
class TrackerConfig:
    """Detection / tracking knobs (defaults tuned on 640×480 talking faces)."""

    block: int = 24  # tracker reset period (frames, absolute index multiples)
    detect_max_side: int = 320  # full-frame HOG image size (longest side)
    roi_face_px: float = 90.0  # face size in the tracking window's detection image
    roi_margin: float = 0.35  # tracking window half-size, in face sizes
    escalate_every: int = 6  # after this many misses, HOG at finer scales at idx % escalate_every == 0
    max_detect_pixels: int = 1280 * 960  # largest image the escalation feeds to HOG (2× of 640×480)
    use_cnn: bool = True  # CNN (mmod) detector as the last resort
    cnn_phase: int = 12  # CNN tried at most once per block, at idx % block == cnn_phase
    cnn_max_side: int = 320  # CNN input size (longest side; ~0.4 s per call at 320×240)


@dataclass
class DetectionStats:
    """Counters of one tracking run (summed over blocks)."""

    detector_calls: dict[str, int] = field(default_factory=lambda: {"roi": 0, "full": 0, "finer": 0, "cnn": 0})
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


class DlibModels:
    """One set of dlib HOG detector + 68-point predictor.  dlib objects are not safe to share between
    threads (concurrent calls corrupt memory), so each worker checks out its own set."""

    def __init__(self) -> None:
        self.hog = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(_models_dir() / "shape_predictor_68_face_landmarks.dat"))


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


@lru_cache(maxsize=1)
def _cnn() -> tuple[dlib.cnn_face_detection_model_v1, threading.Lock]:
    return dlib.cnn_face_detection_model_v1(str(_models_dir() / "mmod_human_face_detector.dat")), threading.Lock()


def cnn_detect(gray: np.ndarray, upsample: int = 0) -> list[dlib.rectangle]:
    """dlib CNN (mmod) face detector; serialised because the network is not re-entrant."""
    net, lock = _cnn()
    with lock:
        return [d.rect for d in net(gray, upsample)]


def predict_landmarks(predictor: dlib.shape_predictor, gray: np.ndarray, rect: dlib.rectangle) -> np.ndarray:
    """68 landmarks (x, y) as int32 [68,2], like the official ``detect_landmark``."""
    shape = predictor(gray, rect)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.int32)


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


def _to_rect(box: Box) -> dlib.rectangle:
    left, top, right, bottom = (round(v) for v in box)
    return dlib.rectangle(int(left), int(top), int(right) - 1, int(bottom) - 1)


def _resize(gray: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return gray
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
        # smallest face (box side, frame pixels) the downscaled full-frame pass can see
        self.min_full_face = 80.0 / self.full_scale
        self.escalation_scales: list[float] = []
        scale = self.full_scale * 2.0
        while scale <= 2.0 and scale * scale * self.height * self.width <= self.cfg.max_detect_pixels:
            self.escalation_scales.append(scale)
            scale *= 2.0
        self.prev: np.ndarray | None = None  # landmarks of the previous frame when it had a face
        self.last_box: Box | None = None  # last face box seen (for choosing among several faces)
        self.last_size: float | None = None
        self.miss = 0
        self.stats = DetectionStats()

    def reset(self) -> None:
        self.prev = self.last_box = self.last_size = None
        self.miss = 0

    # -- detectors -----------------------------------------------------------------------------------
    def _hog(self, img: np.ndarray, upsample: int, kind: str) -> list[dlib.rectangle]:
        self.stats.detector_calls[kind] += 1
        return list(self.models.hog(img, upsample))

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
        small_face_possible = self.last_size is None or self.last_size < 1.3 * self.min_full_face
        for level, scale in enumerate(self.escalation_scales):
            if not (escalate or (level == 0 and small_face_possible and self.miss == 0)):
                break
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
        boxes: list[Box] = []
        if self.prev is not None:
            boxes = self._detect_roi(gray, self.prev)
        if not boxes:
            boxes = self._detect_full(gray, idx)
            self.stats.faces_seen = max(self.stats.faces_seen, len(boxes))
        if not boxes:
            self.prev = None
            self.miss += 1
            return None
        box = self._choose(boxes)
        lm = predict_landmarks(self.models.predictor, gray, _to_rect(box))
        self.prev, self.last_box, self.miss = lm, box, 0
        self.last_size = max(box[2] - box[0], box[3] - box[1])
        return lm


def track_block(
    grays: list[np.ndarray], start: int, config: TrackerConfig | None = None
) -> tuple[list[np.ndarray | None], DetectionStats]:
    """Landmarks of consecutive grey frames starting at absolute index ``start`` (one fresh tracker,
    reset at every multiple of ``config.block``)."""
    if not grays:
        return [], DetectionStats()
    cfg = config or TrackerConfig()
    with checkout_models() as models:
        tracker = FaceTracker(grays[0].shape[:2], models, cfg)
        stats = tracker.stats
        out: list[np.ndarray | None] = []
        for i, gray in enumerate(grays):
            idx = start + i
            if gray.shape[:2] != (tracker.height, tracker.width):
                tracker = FaceTracker(gray.shape[:2], models, cfg)  # frame size changed: new geometry
                tracker.stats = stats
            elif i and idx % cfg.block == 0:
                tracker.reset()
            out.append(tracker.step(gray, idx))
    return out, stats
