"""The GIL-free 68-point predictor (`cpu_worker.shape_predictor`) gives dlib's landmarks, bit for bit,
reads dlib's model format (checked on small random models written here and loaded by dlib too) and
refuses malformed files with a ValueError."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dlib
import numpy as np
import pytest

from cpu_worker.align import to_gray
from cpu_worker.landmarks import _models_dir, _shape_predictor
from cpu_worker.shape_predictor import ShapePredictor, read_model

RNG_SEED = 7


def _dlib_parts(predictor: dlib.shape_predictor, gray: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    return np.array([(p.x, p.y) for p in predictor(gray, dlib.rectangle(*rect)).parts()], dtype=np.int32)


@pytest.fixture(scope="module")
def dlib_68() -> dlib.shape_predictor:
    return dlib.shape_predictor(str(_models_dir() / "shape_predictor_68_face_landmarks.dat"))


def test_68_point_model_matches_dlib_on_the_reference_clip(frames: np.ndarray, dlib_68: dlib.shape_predictor) -> None:
    ours = _shape_predictor()
    hog = dlib.get_frontal_face_detector()
    rng = np.random.default_rng(RNG_SEED)
    cases = 0
    for frame in frames[::2]:
        gray = np.ascontiguousarray(to_gray(frame))
        found = [(r.left(), r.top(), r.right(), r.bottom()) for r in hog(gray, 1)] or [(250, 150, 400, 300)]
        for left, top, right, bottom in found:
            for _ in range(6):  # the detector's box and jittered ones (the tracker's interpolated boxes)
                j = rng.integers(-20, 21, 4)
                rect = (left + j[0], top + j[1], right + j[2], bottom + j[3])
                np.testing.assert_array_equal(ours(gray, rect), _dlib_parts(dlib_68, gray, rect))
                cases += 1
    gray = np.ascontiguousarray(to_gray(frames[3]))
    # boxes off the frame's edges, tiny and huge ones: pixels outside read as 0, as in dlib
    for rect in [(-80, -60, 90, 110), (560, 400, 720, 560), (0, 0, 639, 479), (300, 200, 303, 203),
                 (-500, -500, 1500, 1500), (320, 240, 320, 240)]:
        np.testing.assert_array_equal(ours(gray, rect), _dlib_parts(dlib_68, gray, rect))
        cases += 1
    assert cases > 150


def test_one_predictor_shared_by_threads_gives_the_sequential_results(frames: np.ndarray) -> None:
    ours = _shape_predictor()
    grays = [np.ascontiguousarray(to_gray(f)) for f in frames[1:20]]
    rect = (250, 150, 400, 300)
    expected = [ours(g, rect) for g in grays]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda g: ours(g, rect), grays * 4))
    for i, lm in enumerate(got):
        np.testing.assert_array_equal(lm, expected[i % len(grays)])


def test_rejects_images_that_are_not_uint8_grey() -> None:
    ours = _shape_predictor()
    with pytest.raises(ValueError, match="uint8 grey"):
        ours(np.zeros((10, 10, 3), np.uint8), (0, 0, 9, 9))
    with pytest.raises(ValueError, match="uint8 grey"):
        ours(np.zeros((10, 10), np.float32), (0, 0, 9, 9))


# -- dlib's serialisation, written independently of the reader ---------------------------------------

def _int(value: int) -> bytes:
    raw = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(raw) | (0x80 if value < 0 else 0)]) + raw


def _float(value: float) -> bytes:
    frac, exp = math.frexp(float(np.float32(value)))
    mantissa, exponent = int(frac * (1 << 24)), exp - 24
    for _ in range(8):  # dlib drops all-zero low bytes of the mantissa
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return _int(mantissa) + _int(exponent)


def _column(values: np.ndarray) -> bytes:
    return _int(-len(values)) + _int(-1) + b"".join(_float(v) for v in values)


def write_random_model(path: Path, seed: int, points: int = 5, cascades: int = 3, trees: int = 4,
                       depth: int = 2, pixels: int = 12, bad_split: bool = False, bad_anchor: bool = False) -> None:
    """A random shape predictor in dlib's format (version 1): the structure of the 68-point model, smaller
    (``bad_split`` / ``bad_anchor``: the last split / anchor points past its array)."""
    rng = np.random.default_rng(seed)
    splits = 2**depth - 1
    out = [_int(1), _column(rng.uniform(0.15, 0.85, 2 * points).astype(np.float32)), _int(cascades)]
    for _ in range(cascades):
        out.append(_int(trees))
        for _ in range(trees):
            out.append(_int(splits))
            for _ in range(splits):
                a, b = rng.integers(0, pixels, 2)
                out += [_int(int(a)), _int(pixels if bad_split else int(b)), _float(rng.normal(0, 25))]
            out.append(_int(splits + 1))
            out += [_column(rng.normal(0, 0.03, 2 * points).astype(np.float32)) for _ in range(splits + 1)]
    out.append(_int(cascades))
    for _ in range(cascades):
        out.append(_int(pixels))
        out += [_int(int(i)) for i in rng.integers(0, points, pixels - 1)] + [_int(points if bad_anchor else 0)]
    out.append(_int(cascades))
    for _ in range(cascades):
        out.append(_int(pixels))
        out += [_float(v) for v in rng.normal(0, 0.15, 2 * pixels)]
    path.write_bytes(b"".join(out))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reads_what_dlib_reads_and_predicts_what_dlib_predicts(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "model.dat"
    write_random_model(path, seed)
    theirs, ours = dlib.shape_predictor(str(path)), ShapePredictor(path)
    assert ours.model.leaves.shape == (3, 4, 4, 10) and ours.model.deltas.shape == (3, 12, 2)
    rng = np.random.default_rng(seed)
    for _ in range(40):
        gray = rng.integers(0, 256, (int(rng.integers(20, 200)), int(rng.integers(20, 200))), dtype=np.uint8)
        left, top = (int(v) for v in rng.integers(-30, 150, 2))
        rect = (left, top, left + int(rng.integers(0, 120)), top + int(rng.integers(0, 120)))
        np.testing.assert_array_equal(ours(gray, rect), _dlib_parts(theirs, gray, rect))


def test_malformed_files_are_refused_with_a_value_error(tmp_path: Path) -> None:
    good = tmp_path / "good.dat"
    write_random_model(good, seed=3)
    data = good.read_bytes()
    read_model(good)
    rng = np.random.default_rng(3)
    cases = {"empty": b"", "version 2": _int(2) + data[2:], "truncated": data[: len(data) // 2],
             "trailing": data + _int(5), "wide integer": data[:2] + bytes([0x08]) + bytes(8) + data[2:]}
    for k in range(20):
        cut = int(rng.integers(1, len(data) - 1))
        cases[f"cut at {cut}"] = data[:cut]
        flipped = bytearray(data)
        flipped[cut] ^= 1 << int(rng.integers(0, 8))
        cases[f"bit flip {k}"] = bytes(flipped)
    refused = 0
    for name, blob in cases.items():
        bad = tmp_path / "bad.dat"
        bad.write_bytes(blob)
        try:
            model = read_model(bad)
        except ValueError:
            refused += 1
            continue
        # a flip that still parses (a changed value) must give a model whose indices stay in range
        assert name.startswith("bit flip"), name
        assert model.split_pixels.max() < model.anchors.shape[1] and model.anchors.max() < 5
    assert refused >= len(cases) - 20


_HEADER = _int(1) + _int(-4) + _int(-1)  # version, a 4-value initial shape
_REST = b"".join(_float(0.5) for _ in range(3))


@pytest.mark.parametrize(("blob", "message"), [
    (_int(1) + _column(np.full(4, 0.5, np.float32)) + _int(1) + _int(1) + _int(-3), "negative count"),
    (_HEADER + _int(1 << 25) + _int(-30) + _REST, "not a finite float32"),  # a mantissa over 24 bits
    (_HEADER + _int(1) + _int(150) + _REST, "not a finite float32"),  # 2^150 overflows float32
    (_HEADER + _int(0) + _int(32000) + _REST, "not a finite float32"),  # dlib's infinity marker
], ids=["negative count", "wide mantissa", "overflow", "inf marker"])
def test_counts_and_floats_out_of_range_are_refused(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "model.dat"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message):
        read_model(path)


@pytest.mark.parametrize("where", ["split", "anchor"])
def test_an_index_out_of_range_is_refused(tmp_path: Path, where: str) -> None:
    """dlib itself would read past its arrays; the reader refuses the file instead."""
    path = tmp_path / "model.dat"
    write_random_model(path, seed=4, **{f"bad_{where}": True})
    with pytest.raises(ValueError, match="out of range"):
        read_model(path)


_CACHE_PROBE = """
import numpy as np
from cpu_worker import shape_predictor as sp
from cpu_worker.landmarks import _models_dir
sp.ShapePredictor(_models_dir() / "shape_predictor_68_face_landmarks.dat")  # compiles or loads them
print(sum(sum(f.stats.cache_hits.values()) for f in (sp._tokens, sp._predict)))
"""


def test_a_second_process_loads_the_compiled_predictor_from_numbas_cache() -> None:
    """The predictor's numba functions are cached on disk (beside the module, else in NUMBA_CACHE_DIR
    or ~/.cache/numba): once this process has them, a new process loads them instead of compiling."""
    import subprocess
    import sys

    _shape_predictor()  # compiled (and cached) or loaded from the cache here
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], cwd=root, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert int(out.split()[-1]) == 2, out  # _tokens and _predict (which calls _similarity inside compiled code)


def test_where_no_cache_folder_is_writable_the_functions_compile_in_memory(monkeypatch) -> None:
    import numba

    from cpu_worker import shape_predictor as sp

    real = numba.njit

    def no_locator(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_locator)

    @sp._compiled(nogil=True)
    def twice(x: float) -> float:
        return 2.0 * x

    assert twice(21.0) == 42.0
    assert type(twice._cache).__name__ == "NullCache"
