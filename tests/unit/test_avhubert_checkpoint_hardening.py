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

