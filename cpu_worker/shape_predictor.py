"""dlib's 68-point shape predictor, read from dlib's own model file and run without the GIL.

The predictor is an ensemble of regression trees (Kazemi & Sullivan, 2014): a cascade of ``C`` forests
of ``T`` trees; each cascade samples ``P`` pixels placed relative to the current shape, each tree
compares pixel pairs down to a leaf, and the leaves' shape increments are added up.  dlib's binding
holds the GIL for the whole call, so threads tracking different blocks ran it one at a time; this
module runs the same arithmetic as ``dlib::shape_predictor::operator()`` (float32 shape updates in
dlib's order, the similarity transform in float64 then cast to float32, the rectangle mapping in
float64, ``floor(x + 0.5)`` to integer pixels) compiled with numba, ``nogil``, so tracking threads use
every core.  The model is parsed from the ``.dat`` file without dlib (its serialisation: integers as a
control byte + little-endian bytes, floats as a (mantissa, exponent) pair of such integers).

``ShapePredictor(path)(gray, (left, top, right, bottom))`` → int32 [68, 2], like dlib's ``parts()``.
One instance is safe to share between threads (its arrays are read-only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

Rect = tuple[int, int, int, int]  # left, top, right, bottom, inclusive (dlib.rectangle)


def _compiled(nogil: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(nogil=nogil)`` with numba's on-disk cache where one can be written (``__pycache__``
    beside this file, else ``NUMBA_CACHE_DIR`` or ``~/.cache/numba``), so a worker starts without
    compiling these functions again (about 3 of the 4.7 s of loading the predictor on a 2-core EPYC).
    Where no cache folder is writable they are compiled in memory at each start, as without it."""

    def wrap(function: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, nogil=nogil)(function)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return numba.njit(nogil=nogil)(function)

    return wrap


@_compiled()
def _tokens(buf: np.ndarray) -> np.ndarray:
    """Every serialised integer of a dlib stream, in order (int32: a predictor's counts, indices,
    mantissas and exponents all fit).  Raises on a malformed byte or a wider integer."""
    count = i = 0
    while i < len(buf):  # first pass: how many (the array is then allocated once, at its size)
        count += 1
        i += 1 + (buf[i] & 0x0F)
    out = np.empty(count, np.int32)
    i = n = 0
    while i < len(buf):
        control = buf[i]
        size = control & 0x0F
        if size == 0 or size > 4 or control & 0x70 or i + size >= len(buf):
            raise ValueError("not a dlib integer of at most 31 bits")
        value = np.int64(0)
        for k in range(size):
            value |= np.int64(buf[i + 1 + k]) << (8 * k)
        if value > 0x7FFFFFFF:
            raise ValueError("not a dlib integer of at most 31 bits")
        out[n] = -value if control & 0x80 else value
        n += 1
        i += 1 + size
    return out[:n]


def read_dlib_ints(data: bytes, count: int) -> tuple[list[int], list[int]]:
    """The first ``count`` integers of a dlib serialisation (the format ``_tokens`` reads, here in
    Python and of any width) and the byte offset of each, then the offset after the last."""
    values, offsets, pos = [], [], 0
    for _ in range(count):
        control = data[pos]
        size = control & 0x0F
        values.append(int.from_bytes(data[pos + 1 : pos + 1 + size], "little") * (-1 if control & 0x80 else 1))
        offsets.append(pos)
        pos += 1 + size
    offsets.append(pos)
    return values, offsets


class _Cursor:
    """Reads the token stream of a shape predictor: counts one by one, regular blocks as arrays."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens, self.pos = tokens, 0

    def take(self, n: int) -> np.ndarray:
        if n < 0:
            raise ValueError("negative count in shape predictor file")
        if self.pos + n > len(self.tokens):
            raise ValueError("truncated shape predictor file")
        out = self.tokens[self.pos : self.pos + n]
        self.pos += n
        return out

    def next(self) -> int:
        return int(self.take(1)[0])

    def expect(self, value: int, what: str) -> None:
        if self.next() != value:
            raise ValueError(f"unexpected {what} in shape predictor file")


def _floats(pairs: np.ndarray) -> np.ndarray:
    """(mantissa, exponent) pairs in the last axis → float32 (exact: dlib writes a float's mantissa in
    at most 24 bits).  dlib's markers for infinities and NaN (huge exponents) are refused."""
    mantissa, exponent = pairs[..., 0], pairs[..., 1]
    if np.abs(mantissa).max(initial=0) >= 1 << 24 or np.abs(exponent).max(initial=0) > 200:
        raise ValueError("not a finite float32 in shape predictor file")
    with np.errstate(over="ignore"):
        values = np.ldexp(mantissa.astype(np.float32), exponent)
    if not np.isfinite(values).all():
        raise ValueError("not a finite float32 in shape predictor file")
    return values


@dataclass(frozen=True)
class ShapePredictorModel:
    """The arrays of a dlib shape predictor (C cascades, T trees, S splits, P feature pixels, N points)."""

    initial_shape: np.ndarray  # float32 [2N]: mean shape in the unit square, x0 y0 x1 y1 ...
    split_pixels: np.ndarray  # int32 [C, T, S, 2]: the two feature pixels each split compares
    thresholds: np.ndarray  # float32 [C, T, S]: go left when pixel a - pixel b > threshold
    leaves: np.ndarray  # float32 [C, T, S + 1, 2N]: shape increments
    anchors: np.ndarray  # int32 [C, P]: the landmark each feature pixel is placed from
    deltas: np.ndarray  # float32 [C, P, 2]: its offset from that landmark, in mean-shape space


def read_model(path: str | Path) -> ShapePredictorModel:
    """Parse dlib's ``shape_predictor`` serialisation (version 1) without dlib."""
    cur = _Cursor(_tokens(np.fromfile(path, dtype=np.uint8)))
    cur.expect(1, "version")

    def column() -> int:  # matrix<float,0,1> header: -rows, -1
        rows = -cur.next()
        cur.expect(-1, "matrix shape")
        return rows

    dims = column()
    initial = _floats(cur.take(2 * dims).reshape(dims, 2))
    cascades, trees = cur.next(), None
    split_rows, leaf_rows = [], []
    for _ in range(cascades):
        n_trees = cur.next()
        trees = trees or n_trees
        if n_trees != trees:
            raise ValueError("irregular forests in shape predictor file")
        for _ in range(n_trees):
            splits = cur.next()
            split_rows.append(cur.take(4 * splits).reshape(splits, 4))
            cur.expect(splits + 1, "leaf count")
            leaf = cur.take((splits + 1) * (2 + 2 * dims)).reshape(splits + 1, 2 + 2 * dims)
            if (leaf[:, 0] != -dims).any() or (leaf[:, 1] != -1).any():
                raise ValueError("unexpected leaf shape in shape predictor file")
            leaf_rows.append(leaf[:, 2:])
    if trees is None:
        raise ValueError("empty shape predictor")
    splits_arr = np.stack(split_rows).reshape(cascades, trees, -1, 4)
    leaves = _floats(np.stack(leaf_rows).reshape(cascades, trees, splits_arr.shape[2] + 1, dims, 2))
    cur.expect(cascades, "anchor count")
    anchors = []
    for _ in range(cascades):
        anchors.append(cur.take(cur.next()))
    cur.expect(cascades, "delta count")
    deltas = []
    for _ in range(cascades):
        deltas.append(_floats(cur.take(4 * cur.next()).reshape(-1, 2, 2)))
    if cur.pos != len(cur.tokens):
        raise ValueError("trailing data in shape predictor file")
    model = ShapePredictorModel(
        initial_shape=initial,
        split_pixels=np.ascontiguousarray(splits_arr[..., :2], dtype=np.int32),
        thresholds=_floats(splits_arr[..., 2:]),
        leaves=leaves,
        anchors=np.stack(anchors).astype(np.int32),
        deltas=np.stack(deltas),
    )
    n_pixels = model.anchors.shape[1]
    if model.split_pixels.min() < 0 or model.split_pixels.max() >= n_pixels or model.anchors.max() >= dims // 2:
        raise ValueError("index out of range in shape predictor file")
    for array in vars(model).values():
        array.setflags(write=False)
    return model


@_compiled(nogil=True)
def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, float]:
    """The rotation+scale part ``[[a, -b], [b, a]]`` of the least-squares similarity src → dst
    (Umeyama, as dlib's ``find_similarity_transform``, in float64; the closed form in 2-D)."""
    n = src.shape[0] // 2
    mfx = mfy = mtx = mty = 0.0
    for i in range(n):
        mfx += src[2 * i]
        mfy += src[2 * i + 1]
        mtx += dst[2 * i]
        mty += dst[2 * i + 1]
    mfx, mfy, mtx, mty = mfx / n, mfy / n, mtx / n, mty / n
    norm = dot = cross = 0.0
    for i in range(n):
        fx, fy = src[2 * i] - mfx, src[2 * i + 1] - mfy
        tx, ty = dst[2 * i] - mtx, dst[2 * i + 1] - mty
        norm += fx * fx + fy * fy
        dot += fx * tx + fy * ty
        cross += fx * ty - fy * tx
    if norm == 0.0:
        return 1.0, 0.0
    return dot / norm, cross / norm


@_compiled(nogil=True)
def _predict(
    img: np.ndarray,
    left: int,
    top: int,
    right: int,
    bottom: int,
    initial: np.ndarray,
    split_pixels: np.ndarray,
    thresholds: np.ndarray,
    leaves: np.ndarray,
    anchors: np.ndarray,
    deltas: np.ndarray,
) -> np.ndarray:
    height, width = img.shape
    n_cascades, n_trees, n_splits = thresholds.shape
    n_pixels = anchors.shape[1]
    shape = initial.copy()
    pixels = np.empty(n_pixels, np.float32)
    leaf_of = np.empty(n_trees, np.int64)
    # the unit square → the rectangle (dlib's unnormalizing_tform: corners tl, tr, br)
    sx, sy = float(right - left), float(bottom - top)
    ox, oy = float(left), float(top)
    for c in range(n_cascades):
        a64, b64 = _similarity(initial, shape)
        a, b = np.float32(a64), np.float32(b64)
        for p in range(n_pixels):
            k = anchors[c, p]
            dx, dy = deltas[c, p, 0], deltas[c, p, 1]
            x = (a * dx - b * dy) + shape[2 * k]
            y = (b * dx + a * dy) + shape[2 * k + 1]
            px = np.floor(sx * np.float64(x) + ox + 0.5)
            py = np.floor(sy * np.float64(y) + oy + 0.5)
            if 0.0 <= px < width and 0.0 <= py < height:
                pixels[p] = np.float32(img[int(py), int(px)])
            else:
                pixels[p] = np.float32(0.0)
        for t in range(n_trees):  # walk every tree first: the leaf reads below can then overlap
            i = 0
            while i < n_splits:
                if pixels[split_pixels[c, t, i, 0]] - pixels[split_pixels[c, t, i, 1]] > thresholds[c, t, i]:
                    i = 2 * i + 1
                else:
                    i = 2 * i + 2
            leaf_of[t] = i - n_splits
        for t in range(n_trees):  # in tree order, in float32: dlib's sum, bit for bit
            leaf = leaves[c, t, leaf_of[t]]
            for j in range(shape.shape[0]):
                shape[j] += leaf[j]
    out = np.empty((shape.shape[0] // 2, 2), np.int32)
    for i in range(out.shape[0]):
        out[i, 0] = int(np.floor(sx * np.float64(shape[2 * i]) + ox + 0.5))
        out[i, 1] = int(np.floor(sy * np.float64(shape[2 * i + 1]) + oy + 0.5))
    return out


class ShapePredictor:
    """``predictor(gray, rect)`` → int32 [N, 2] landmarks; gray is a uint8 [H, W] image, rect
    (left, top, right, bottom) inclusive like ``dlib.rectangle``.  Releases the GIL while it runs."""

    def __init__(self, path: str | Path) -> None:
        self.model = read_model(path)
        self(np.zeros((8, 8), np.uint8), (0, 0, 7, 7))  # compiled (or read from the cache) now, not in a task

    def __call__(self, gray: np.ndarray, rect: Rect) -> np.ndarray:
        if gray.dtype != np.uint8 or gray.ndim != 2:
            raise ValueError("the shape predictor takes a uint8 grey image")
        m = self.model
        left, top, right, bottom = (int(v) for v in rect)
        return _predict(np.ascontiguousarray(gray), left, top, right, bottom, m.initial_shape,
                        m.split_pixels, m.thresholds, m.leaves, m.anchors, m.deltas)
