"""S3 helpers that need no server: natural order, error classification."""

from __future__ import annotations

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from tasks import storage
from tasks.storage import classify, natural_key


def test_natural_order_puts_frame_2_before_frame_10():
    keys = ["clip/frame_10.jpg", "clip/frame_2.jpg", "clip/frame_1.jpg", "clip/Frame_11.jpg", "clip/frame_100.jpg"]
    assert sorted(keys, key=natural_key) == [
        "clip/frame_1.jpg", "clip/frame_2.jpg", "clip/frame_10.jpg", "clip/Frame_11.jpg", "clip/frame_100.jpg"]


@pytest.mark.parametrize("keys", [
    ["f/0\u00b21.jpg", "f/0\u00b22.jpg", "f/1.jpg"],  # '²' is isdigit() but not a number int() reads
    ["f/\u0663.jpg", "f/2.jpg", "f/10.jpg"],  # Arabic-Indic three is a decimal digit: 3
    ["f/" + "9" * 900 + ".jpg", "f/1.jpg", "f/a.jpg", "f/.jpg"],
])
def test_natural_order_takes_any_key_name(keys):
    ordered = sorted(keys, key=natural_key)
    assert sorted(ordered, key=natural_key) == ordered
    assert natural_key("f/\u0663.jpg") == ["f/", 3, ".jpg"]
    assert natural_key("f/0\u00b21.jpg") == ["f/", 0, "\u00b2", 1, ".jpg"]


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(("code", "status", "expected", "retryable"), [
    ("NoSuchKey", 404, "input_not_found", False),
    ("NoSuchBucket", 404, "input_not_found", False),
    ("AccessDenied", 403, "access_denied", False),
    ("SlowDown", 503, "transient_error", True),
    ("InternalError", 500, "transient_error", True),
    ("InvalidRange", 416, "s3_error", False),
])
def test_s3_errors_are_classified(code, status, expected, retryable):
    error = classify(_client_error(code, status), "s3://b/k")
    assert (error.code, error.retryable) == (expected, retryable)


@pytest.mark.parametrize(("error", "reason"), [
    (EndpointConnectionError(endpoint_url="http://10.0.0.5:8333/b/k"), "could not connect"),
    (ConnectionClosedError(endpoint_url="http://10.0.0.5:8333/b/k"), "could not connect"),
    (ConnectTimeoutError(endpoint_url="http://10.0.0.5:8333/b/k"), "timed out"),
    (ReadTimeoutError(endpoint_url="http://10.0.0.5:8333/b/k"), "timed out"),
    (ConnectionResetError(104, "Connection reset by peer"), "could not connect"),
])
def test_network_errors_are_retryable_and_do_not_show_the_endpoint(error, reason):
    """botocore's messages name the S3 endpoint (an address of the service's network): a job's error says why only."""
    classified = classify(error, "s3://b/k")
    assert classified.retryable and classified.code == "transient_error"
    assert classified.message == f"S3 unreachable for s3://b/k: {reason}"


def test_unknown_errors_propagate():
    with pytest.raises(ZeroDivisionError):
        classify(ZeroDivisionError("boom"), "s3://b/k")


def test_arrays_round_trip_as_an_uncompressed_npz(monkeypatch):
    """`put_arrays` writes what `np.load` reads (and `get_arrays` returns), every member stored as is
    (deflate cost the CPU worker a tenth of its time on a long clip)."""
    import io
    import zipfile

    import numpy as np

    stored: dict[str, bytes] = {}
    monkeypatch.setattr(storage, "put_bytes", lambda bucket, key, data, *a, **k: stored.update({key: data}))
    monkeypatch.setattr(storage, "get_bytes", lambda bucket, key: stored[key])
    arrays = {"rois": np.arange(3 * 96 * 96, dtype=np.uint8).reshape(3, 96, 96),
              "landmarks": np.random.default_rng(0).random((3, 68, 2), dtype=np.float32),
              "empty": np.zeros((0, 2), dtype=np.int64), "fps": np.float64(25.0), "stats_json": np.str_('{"a": 1}')}
    storage.put_arrays("bucket", "k.npz", **arrays)
    with zipfile.ZipFile(io.BytesIO(stored["k.npz"])) as archive:
        assert {i.filename: i.compress_type for i in archive.infolist()} == {
            f"{name}.npy": zipfile.ZIP_STORED for name in arrays}
    loaded = storage.get_arrays("bucket", "k.npz")
    assert loaded.keys() == arrays.keys()
    for name, array in arrays.items():
        assert loaded[name].dtype == np.asarray(array).dtype and np.array_equal(loaded[name], array), name
