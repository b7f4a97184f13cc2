"""Hand-crafted hostile checkpoints against gpu_worker.avhubert.checkpoint (issue 12).

The pickles are assembled opcode by opcode (protocol 2) so they say exactly what an attacker would
write, then wrapped in a torch-style zip archive (``<top>/data.pkl`` + ``<top>/data/<key>``).
"""

from __future__ import annotations

import argparse
import collections
import pickle
import struct
import typing
import zipfile
from pathlib import Path

import pytest
import torch

from gpu_worker.avhubert import CheckpointError, load_checkpoint
from gpu_worker.avhubert import checkpoint as ckpt

# ---------------------------------------------------------------- pickle assembly


def _str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _checkpoint_pickle(entry: bytes) -> bytes:
    """``{'model': {}, 'x': <entry>}`` where ``entry`` leaves exactly one object on the stack."""
    return (
        pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK
        + _str("model") + pickle.EMPTY_DICT
        + _str("x") + entry
        + pickle.SETITEMS + pickle.STOP
    )


def _slot_build(target: bytes, attr: str, value: bytes) -> bytes:
    """``target`` followed by BUILD with state ``(None, {attr: value})``: pickle's default BUILD
    applies the second (slot state) dict with ``setattr(target, attr, value)``."""
    return target + pickle.NONE + pickle.EMPTY_DICT + _str(attr) + value + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD


def _dict_build(target: bytes, attr: str, value: bytes) -> bytes:
    """``target`` followed by BUILD with state ``{attr: value}`` (written into ``target.__dict__``)."""
    return target + pickle.EMPTY_DICT + _str(attr) + value + pickle.SETITEM + pickle.BUILD


def _write_archive(path: Path, data_pkl: bytes, records: dict[str, tuple[bytes, int]] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("top/data.pkl", data_pkl)
        archive.writestr("top/byteorder", b"little")
        for key, (payload, compression) in (records or {}).items():
            archive.writestr(zipfile.ZipInfo(f"top/data/{key}"), payload, compress_type=compression)
    return path


def _class_state(cls: type) -> dict:
    return dict(vars(cls))


@pytest.fixture
def restore_targets():
    """Undo whatever a crafted pickle managed to do to the targets, so a failing test does not
    poison the rest of the session."""
    classes = [argparse.Namespace, typing.Any, ckpt.DictionaryState]
    saved = {cls: _class_state(cls) for cls in classes}
    func = ckpt._ALLOWED_GLOBALS[("torch._utils", "_rebuild_tensor_v2")]
    func_state = (func.__defaults__, dict(func.__dict__))
    storage = ckpt._ALLOWED_GLOBALS[("torch", "FloatStorage")]
    storage_state = dict(vars(storage)) if hasattr(storage, "__dict__") else None
    yield saved
    for cls, state in saved.items():
        for name in set(vars(cls)) - set(state):
            delattr(cls, name)
        for name, value in state.items():
            if name not in ("__dict__", "__weakref__", "__doc__") and vars(cls).get(name) is not value:
                setattr(cls, name, value)
    func.__defaults__ = func_state[0]
    func.__dict__.clear()
    func.__dict__.update(func_state[1])
    if storage_state is not None:
        vars(storage).clear()
        vars(storage).update(storage_state)


# ---------------------------------------------------------------- BUILD / __setstate__


BUILD_ATTACKS = {
    # class objects: setattr on the class itself changes it for the whole process
    "namespace_class_init": (
        lambda: _slot_build(_global("argparse", "Namespace"), "__init__", _global("builtins", "str")),
        r"class argparse\.Namespace",
    ),
    "typing_any_class": (
        lambda: _slot_build(_global("typing", "Any"), "__init__", _global("builtins", "str")),
        r"class typing\.Any",
    ),
    "standin_class": (
        lambda: _slot_build(
            _global("fairseq.data.dictionary", "Dictionary"), "__setstate__", _global("builtins", "str")
        ),
        r"class fairseq\.data\.dictionary\.Dictionary",
    ),
    "ordereddict_class": (
        lambda: _slot_build(_global("collections", "OrderedDict"), "fromkeys", _global("builtins", "str")),
        r"class collections\.OrderedDict",
    ),
    # a module function: its defaults are process-wide
    "function_defaults": (
        lambda: _slot_build(
            _global("torch._utils", "_rebuild_tensor_v2"), "__defaults__",
            pickle.EMPTY_TUPLE,
        ),
        r"function .*_rebuild_tensor",
    ),
    # a shared allow-list object: BUILD writes straight into its __dict__ (bypassing frozen=True)
    "storage_type_instance": (
        lambda: _dict_build(_global("torch", "FloatStorage"), "dtype", _str("float64")),
        r"instance of .*_StorageType",
    ),
    # a plain container built by the pickle
    "set_instance": (
        lambda: _slot_build(
            _global("builtins", "set") + pickle.EMPTY_LIST + pickle.TUPLE1 + pickle.REDUCE,
            "x", _int(1),
        ),
        r"instance of builtins\.set",
    ),
}


@pytest.mark.parametrize("attack", BUILD_ATTACKS)
def test_build_on_anything_but_a_standin_is_refused(tmp_path: Path, restore_targets, attack: str) -> None:
    payload, refused = BUILD_ATTACKS[attack]
    path = _write_archive(tmp_path / "evil.pt", _checkpoint_pickle(payload()))
    rebuild = ckpt._ALLOWED_GLOBALS[("torch._utils", "_rebuild_tensor_v2")]
    defaults = rebuild.__defaults__
    with pytest.raises(CheckpointError, match=rf"refused BUILD .*{refused}"):
        load_checkpoint(path)
    for cls, state in restore_targets.items():
        assert _class_state(cls) == state, cls
    assert argparse.Namespace.__init__ is restore_targets[argparse.Namespace]["__init__"]
    assert argparse.Namespace(a=1).a == 1
    assert rebuild.__defaults__ == defaults and not rebuild.__dict__
    assert ckpt._ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype == torch.float32


def test_namespace_is_rebuilt_from_data_and_standin_state_is_checked(tmp_path: Path) -> None:
    # argparse.Namespace as protocol 2 writes it: NEWOBJ then BUILD with the instance dict
    namespace = (
        _global("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
        + pickle.EMPTY_DICT + _str("arch") + _str("av_hubert") + pickle.SETITEM + pickle.BUILD
    )
    state = load_checkpoint(_write_archive(tmp_path / "ns.pt", _checkpoint_pickle(namespace)))
    assert type(state["x"]) is argparse.Namespace and vars(state["x"]) == {"arch": "av_hubert"}
    # a dunder key in a stand-in's state would shadow its methods (e.g. a later __setstate__)
    dunder = (
        _global("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
        + pickle.EMPTY_DICT + _str("__setstate__") + _global("builtins", "str") + pickle.SETITEM + pickle.BUILD
    )
    with pytest.raises(CheckpointError, match="__setstate__"):
        load_checkpoint(_write_archive(tmp_path / "dunder.pt", _checkpoint_pickle(dunder)))


def test_ordered_dict_state_is_kept_as_plain_data(tmp_path: Path) -> None:
    """torch's state_dict() is an OrderedDict pickled with BUILD({'_metadata': ...})."""
    original = collections.OrderedDict(a=1)
    original._metadata = {"": {"version": 1}}
    path = tmp_path / "od.pt"
    torch.save({"model": original}, path, pickle_protocol=2)
    model = load_checkpoint(path)["model"]
    assert type(model) is collections.OrderedDict and model == {"a": 1}
    assert model._metadata == {"": {"version": 1}}


# ---------------------------------------------------------------- storage record sizes


def _tensor_pickle(numel: int, size: tuple[int, ...], key: str = "0", storage: str = "FloatStorage") -> bytes:
    """``{'model': {'w': _rebuild_tensor_v2(<storage key: numel elements>, 0, size, contiguous stride)}}``."""
    strides, step = [], 1
    for dim in reversed(size):
        strides.insert(0, step)
        step *= dim
    persid = (
        pickle.MARK + _str("storage") + _global("torch", storage) + _str(key) + _str("cpu")
        + pickle.LONG1 + bytes([8]) + numel.to_bytes(8, "little", signed=True)
        + pickle.TUPLE + pickle.BINPERSID
    )
    tensor = (
        _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + persid + _int(0)
        + pickle.MARK + b"".join(_int(d) for d in size) + pickle.TUPLE
        + pickle.MARK + b"".join(_int(s) for s in strides) + pickle.TUPLE
        + pickle.NEWFALSE + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
        + pickle.TUPLE + pickle.REDUCE
    )
    return (
        pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _str("model") + pickle.EMPTY_DICT
        + _str("w") + tensor + pickle.SETITEM + pickle.SETITEM + pickle.STOP
    )


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the archive records the loader opens (reads), in order."""
    names: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        names.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return names


def test_crafted_pickle_tensor_round_trip(tmp_path: Path) -> None:
    """The hand-assembled tensor pickle below is what torch writes: it loads when sizes agree."""
    data = torch.arange(6, dtype=torch.float32)
    path = _write_archive(
        tmp_path / "ok.pt", _tensor_pickle(6, (2, 3)), {"0": (data.numpy().tobytes(), zipfile.ZIP_DEFLATED)}
    )
    assert torch.equal(load_checkpoint(path)["model"]["w"], data.view(2, 3))


def test_deflated_record_larger_than_declared_is_refused_unread(tmp_path: Path, opened: list[str]) -> None:
    """64 MiB of deflated zeros (64 KB on disk) behind a storage declared as 4 floats."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("top/data.pkl", _tensor_pickle(4, (4,)))
        info = zipfile.ZipInfo("top/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as record:
            for _ in range(64):
                record.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    opened.clear()
    with pytest.raises(CheckpointError, match=r"storage record top/data/0 holds 67108864 bytes.* declares 16"):
        load_checkpoint(path)
    assert "top/data/0" not in opened


def test_stored_record_larger_than_declared_is_refused(tmp_path: Path) -> None:
    path = _write_archive(tmp_path / "big.pt", _tensor_pickle(4, (4,)), {"0": (bytes(64), zipfile.ZIP_STORED)})
    with pytest.raises(CheckpointError, match=r"top/data/0 holds 64 bytes.* declares 16"):
        load_checkpoint(path)


def test_declared_sizes_are_capped(tmp_path: Path, opened: list[str]) -> None:
    """A pickle declaring a huge storage (2**40 floats) is refused by the limit, nothing is read."""
    path = _write_archive(tmp_path / "huge.pt", _tensor_pickle(1 << 40, (4,)), {"0": (bytes(16), zipfile.ZIP_STORED)})
    opened.clear()
    with pytest.raises(CheckpointError, match=r"storage record top/data/0 .*max_bytes=8589934592"):
        load_checkpoint(path)
    assert "top/data/0" not in opened
    assert ckpt.MAX_CHECKPOINT_BYTES == 8 << 30
    ok = _write_archive(tmp_path / "ok.pt", _tensor_pickle(4, (4,)), {"0": (bytes(16), zipfile.ZIP_STORED)})
    assert load_checkpoint(ok, max_bytes=16)["model"]["w"].shape == (4,)
    with pytest.raises(CheckpointError, match=r"max_bytes=15"):
        load_checkpoint(ok, max_bytes=15)


def test_tensor_view_outside_its_storage_is_refused(tmp_path: Path) -> None:
    path = _write_archive(tmp_path / "view.pt", _tensor_pickle(4, (1000,)), {"0": (bytes(16), zipfile.ZIP_STORED)})
    with pytest.raises(CheckpointError, match=r"tensor view .*outside its storage of 4 elements"):
        load_checkpoint(path)


def test_impossible_compression_ratio_is_refused_unread(tmp_path: Path, opened: list[str]) -> None:
    """Deflate cannot exceed about 1032:1, so a header claiming more (MAX_COMPRESSION_RATIO) lies;
    here the bound is lowered to 100 to trip it with an honest 4 MiB of deflated zeros."""
    records = {"0": (bytes(4 << 20), zipfile.ZIP_DEFLATED)}
    path = _write_archive(tmp_path / "lie.pt", _tensor_pickle(1 << 20, (4,)), records)
    opened.clear()
    with pytest.raises(CheckpointError, match=r"top/data/0 .*compression ratio"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "MAX_COMPRESSION_RATIO", 100)
        load_checkpoint(path)
    assert "top/data/0" not in opened


def test_oversized_pickle_record_is_refused_unread(tmp_path: Path, opened: list[str], monkeypatch) -> None:
    path = _write_archive(tmp_path / "pkl.pt", _checkpoint_pickle(_int(1)))
    monkeypatch.setattr(ckpt, "MAX_PICKLE_BYTES", 16)
    opened.clear()
    with pytest.raises(CheckpointError, match=r"top/data\.pkl holds \d+ bytes"):
        load_checkpoint(path)
    assert "top/data.pkl" not in opened
