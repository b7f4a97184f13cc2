"""Safe reader for fairseq / AV-HuBERT ``.pt`` checkpoints (no fairseq, no arbitrary unpickling).

A fairseq checkpoint is a torch zip archive (``<top>/data.pkl`` + ``<top>/data/<key>`` storage
records, any top folder name). Its pickle references a handful of classes (fairseq ``Dictionary``,
``SentencepieceBPE``, ``sentencepiece.SentencePieceProcessor``, ``argparse.Namespace``, omegaconf
containers in some files ...). This
module unpickles it with :class:`RestrictedUnpickler`, which maps exactly those globals onto inert
plain-data stand-ins defined here and refuses every other global with :class:`CheckpointError`
*before* anything is called, so a malicious ``__reduce__`` payload never runs.

What a pickle can reach, and what it may do with it:

* ``find_class`` answers only from ``_ALLOWED_GLOBALS``: the stand-in classes of this module
  (:class:`DictionaryState`, :class:`SentencepieceBPEState`, :class:`SentencePieceModelState`,
  :class:`OmegaConfState`, :class:`NamespaceState` for ``argparse.Namespace`` and
  :class:`OrderedDictState` for ``collections.OrderedDict``), the tensor/bytes rebuild functions of
  this module, ``_StorageType`` markers and immutable builtin types. No real third-party or stdlib
  class is handed out (``typing.Any`` is the only non-builtin class, kept as a type marker).
* BUILD (``__setstate__``) is the one pickle opcode that mutates an existing object, so the unpickler
  (the pure-Python ``pickle._Unpickler`` with its BUILD handler replaced) accepts it only on an
  *instance* of exactly one of the stand-in classes, and calls that class's own ``__setstate__``
  (never an attribute the instance could shadow). The state must be a dict (or ``(dict, slots)``)
  with plain ``str`` keys that are not dunder names. BUILD on a class object, a function, a shared
  allow-list object or any other instance is refused with :class:`CheckpointError` before anything
  is written, so a crafted pickle cannot patch e.g. ``argparse.Namespace.__init__`` process-wide.
* After unpickling, :class:`NamespaceState` and :class:`OrderedDictState` are rebuilt into fresh
  ``argparse.Namespace`` / ``collections.OrderedDict`` instances from their data (the rest of the
  package sees the real types); the other stand-ins stay as inert attribute bags.

Memory: nothing is inflated or allocated beyond what the pickle declares, and that is capped.

* Each storage's persistent id declares its element count; ``numel x element size`` must equal the
  record's uncompressed size in the zip directory (``ZipInfo.file_size``), checked *before* the record
  is read (zipfile never inflates past ``file_size``). The sum over distinct storages must stay within
  ``max_bytes`` (default :data:`MAX_CHECKPOINT_BYTES`, 8 GiB: the Large seq2seq model is ~2 GB
  fp32, ~6 GB with the two fp32 Adam moments of a ``last_optimizer_state``). Every tensor view
  must lie inside its storage.
* Records must be stored or deflated, and claim no more than :data:`MAX_COMPRESSION_RATIO` (deflate
  cannot exceed ~1032:1, so a bigger ratio is a lying header). ``data.pkl`` is limited to
  :data:`MAX_PICKLE_BYTES`. Stored, aligned records (as torch writes them) are memory-mapped
  copy-on-write; others are inflated into one buffer of the declared size.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

MAX_CHECKPOINT_BYTES = 8 << 30
"""Default ``max_bytes`` of :func:`load_checkpoint`: the most tensor storage a checkpoint may declare."""
MAX_PICKLE_BYTES = 256 << 20
"""The largest ``data.pkl`` record read (real fairseq ones are well under 10 MB)."""
MAX_COMPRESSION_RATIO = 1100
"""Uncompressed / compressed size beyond which a record's zip header is refused as a lie."""
_READ_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """The checkpoint is unreadable, unsafe or does not fit the model."""


def _checked_state(owner: object, state: Any) -> dict[str, Any]:
    """The attribute dict a stand-in takes from BUILD: ``state`` or the dict half of a
    ``(dict, slot state)`` pair, with plain non-dunder ``str`` keys only (a dunder key such as
    ``__setstate__`` or ``__class__`` would shadow the stand-in's own behaviour)."""
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
        state = state[0] or {}  # (dict state, slot state) form; slot state is ignored
    if type(state) is not dict:
        raise CheckpointError(f"unexpected pickled state for {type(owner).__name__}: {type(state)}")
    for key in state:
        if type(key) is not str or (key.startswith("__") and key.endswith("__")):
            raise CheckpointError(f"refused pickled attribute {key!r:.80} for {type(owner).__name__}")
    return state


class _PickledState:
    """Base of the stand-ins: accepts pickle's ``NEWOBJ``/``BUILD`` and keeps the state as data."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(_checked_state(self, state))


class DictionaryState(_PickledState):
    """Stand-in for ``fairseq.data.dictionary.Dictionary``.

    Attributes as pickled: ``symbols``, ``count``, ``indices``, ``bos_index``, ``pad_index``,
    ``eos_index``, ``unk_index``, ``nspecial`` and the ``*_word`` strings.
    """

    symbols: list[str]


class SentencepieceBPEState(_PickledState):
    """Stand-in for ``fairseq.data.encoders.sentencepiece_bpe.SentencepieceBPE`` (attribute ``sp``)."""

    sp: SentencePieceModelState


@dataclass
class SentencePieceModelState:
    """Stand-in for ``sentencepiece.SentencePieceProcessor``; keeps the serialized model proto
    (pickled either as the bare bytes or as a dict with ``model_proto`` and encoder options)."""

    proto: bytes = b""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            state = state.get("model_proto")
        if not isinstance(state, bytes | bytearray):
            raise CheckpointError("pickled SentencePieceProcessor state carries no serialized model proto")
        self.proto = bytes(state)


class NamespaceState(_PickledState):
    """Stand-in for ``argparse.Namespace`` (old-style fairseq ``args``); rebuilt into a fresh
    ``argparse.Namespace`` once the pickle is read."""


class OrderedDictState(collections.OrderedDict[Any, Any]):
    """Stand-in for ``collections.OrderedDict`` (torch ``state_dict()`` results, pickled with
    ``BUILD({'_metadata': ...})``); rebuilt into a plain ``OrderedDict`` once the pickle is read."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(_checked_state(self, state))


class OmegaConfState(_PickledState):
    """Stand-in for omegaconf containers, nodes and metadata (``DictConfig``, ``ListConfig``,
    ``AnyNode`` ...): keeps the pickled ``__dict__``; :func:`plain_data` turns containers into dicts
    and lists (``_content``) and nodes into their value (``_val``)."""


_OMEGACONF_CLASSES = {
    "omegaconf.dictconfig": ("DictConfig",),
    "omegaconf.listconfig": ("ListConfig",),
    "omegaconf.base": ("ContainerMetadata", "Metadata"),
    "omegaconf.nodes": (
        "AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode", "ValueNode",
    ),
}


def plain_data(obj: Any) -> Any:
    """Recursively replace omegaconf stand-ins by plain dicts, lists and values."""
    if isinstance(obj, OmegaConfState):
        state = vars(obj)
        if "_content" in state:
            return plain_data(state["_content"])
        return plain_data(state.get("_val"))
    if isinstance(obj, dict):
        return type(obj)((k, plain_data(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(plain_data(v) for v in obj)
    return obj


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it to store ``bytes`` (latin-1 only)."""
    if not isinstance(text, str) or encoding.lower() not in ("latin1", "latin-1"):
        raise CheckpointError(f"refused _codecs.encode call with encoding {encoding!r}")
    return text.encode("latin1")


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> torch.Tensor:
    """Replacement for ``torch._utils._rebuild_tensor_v2`` on our flat storage tensors."""
    if not isinstance(storage, torch.Tensor):
        raise CheckpointError("tensor rebuild without a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise CheckpointError(f"malformed tensor view: offset {offset!r:.40}, size {size!r:.80}, stride {stride!r:.80}")
    if all(size):
        end = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        if end > storage.numel():
            raise CheckpointError(
                f"tensor view (offset {offset}, size {size}, stride {stride}) reaches element {end}, "
                f"outside its storage of {storage.numel()} elements"
            )
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDictState,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("fairseq.data.dictionary", "Dictionary"): DictionaryState,
    ("fairseq.data.encoders.sentencepiece_bpe", "SentencepieceBPE"): SentencepieceBPEState,
    ("sentencepiece", "SentencePieceProcessor"): SentencePieceModelState,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "long"): int,
    ("argparse", "Namespace"): NamespaceState,
    # inert builtin types (also the ref/key/element types in omegaconf metadata)
    **{(mod, t.__name__): t for mod in ("builtins", "__builtin__")
       for t in (set, frozenset, int, float, bool, str, dict, list, tuple, object)},
    ("__builtin__", "unicode"): str,  # protocol 2 name of str
    ("typing", "Any"): Any,  # a type marker in omegaconf metadata; BUILD on it is refused
    **{(mod, name): OmegaConfState for mod, names in _OMEGACONF_CLASSES.items() for name in names},
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


# the only classes whose instances accept BUILD (exact type match, subclasses excluded)
_STAND_INS = frozenset(
    {DictionaryState, SentencepieceBPEState, SentencePieceModelState, OmegaConfState, NamespaceState, OrderedDictState}
)
_GLOBAL_NAMES = {id(value): f"{module}.{name}" for (module, name), value in reversed(_ALLOWED_GLOBALS.items())}


def _describe(obj: Any) -> str:
    """Name an object for an error message, by its pickle global name where it has one."""
    name = _GLOBAL_NAMES.get(id(obj))
    if isinstance(obj, type):
        return f"class {name or f'{obj.__module__}.{obj.__qualname__}'}"
    if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | types.MethodType):
        return f"function {name or getattr(obj, '__qualname__', '?')}"
    cls = type(obj)
    return f"instance of {cls.__module__}.{cls.__qualname__}" + (f" (global {name})" if name else "")


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler for torch zip checkpoints that only knows the globals listed in ``_ALLOWED_GLOBALS``
    and only lets BUILD set the state of stand-in instances (see the module docstring).

    It is the pure-Python unpickler because the C one offers no hook on BUILD; a fairseq
    checkpoint's pickle is small (hundreds of KB: tensor data lives in separate records)."""

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(
        self, data: bytes, archive: zipfile.ZipFile, prefix: str, file_map: np.ndarray, max_bytes: int
    ) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._archive = archive
        self._prefix = prefix
        self._file_map = file_map
        self._max_bytes = max_bytes
        self._declared = 0  # bytes of all distinct storages declared so far
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"checkpoint references the global '{module}.{name}', which is not allowed "
                "(only tensors, builtin containers and the fairseq config/data classes are)"
            ) from None

    def load_build(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]  # pickle._Unpickler's own stack
        state = stack.pop()
        inst = stack[-1]
        cls = type(inst)
        if cls not in _STAND_INS:
            raise CheckpointError(
                f"refused BUILD (__setstate__) on {_describe(inst)}: "
                "only instances of this module's stand-in classes accept pickled state"
            )
        cls.__setstate__(inst, state)

    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id in checkpoint: {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type in checkpoint: {storage_type!r:.80}")
        name = f"{self._prefix}data/{key}"
        if type(numel) is not int or numel < 0:
            raise CheckpointError(f"storage record {name} has a malformed element count {numel!r:.40}")
        if key in self._storages:
            storage = self._storages[key]
            if storage.dtype != storage_type.dtype or storage.numel() != numel:
                raise CheckpointError(f"storage record {name} is declared again with another type or size")
            return storage
        itemsize = torch.empty(0, dtype=storage_type.dtype).element_size()
        self._declared += numel * itemsize
        if self._declared > self._max_bytes:
            raise CheckpointError(
                f"storage record {name} ({numel} x {itemsize} bytes) takes the checkpoint's declared tensor "
                f"storage to {self._declared} bytes, over the limit max_bytes={self._max_bytes}"
            )
        self._storages[key] = self._read_storage(name, storage_type.dtype, numel, itemsize)
        return self._storages[key]

    def _read_storage(self, name: str, dtype: torch.dtype, numel: int, itemsize: int) -> torch.Tensor:
        """Flat tensor over a storage record of exactly ``numel`` elements: memory-mapped
        (copy-on-write) when the record is stored uncompressed and aligned, as torch writes them,
        else inflated into a buffer of the declared size. Sizes are checked before reading."""
        nbytes = numel * itemsize
        declared = f"the checkpoint declares {nbytes} ({numel} x {itemsize}-byte elements)"
        info = _record_info(self._archive, "storage record", name, declared, exact=nbytes)
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        header = bytes(self._file_map[info.header_offset : info.header_offset + 30])
        if info.compress_type == zipfile.ZIP_STORED and header[:4] == b"PK\x03\x04":
            start = info.header_offset + 30 + int.from_bytes(header[26:28], "little")
            start += int.from_bytes(header[28:30], "little")
            if start + nbytes > len(self._file_map):
                raise CheckpointError(f"storage record {name} runs past the end of the file")
            if start % itemsize == 0:
                return torch.from_numpy(self._file_map[start : start + nbytes]).view(dtype)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0  # type: ignore[arg-type]  # ndarray is a buffer
        with self._archive.open(info) as record:
            while done < nbytes and (count := record.readinto(view[done : done + _READ_CHUNK])):  # type: ignore[attr-defined]
                done += count
        if done != nbytes:
            raise CheckpointError(f"storage record {name} is truncated: {done} of {nbytes} bytes")
        return buffer.view(dtype)


def _record_info(
    archive: zipfile.ZipFile, kind: str, name: str, expected: str, *, exact: int = -1, limit: int = -1
) -> zipfile.ZipInfo:
    """The zip directory entry of record ``name``, refused before anything is read when its
    uncompressed size differs from ``exact`` or exceeds ``limit`` (``expected`` says which, for the
    message), or its compression is unknown or claims an impossible ratio."""
    record = f"{kind} {name}"
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"checkpoint archive lacks the {record}") from None
    if (exact >= 0 and info.file_size != exact) or (limit >= 0 and info.file_size > limit):
        raise CheckpointError(f"{record} holds {info.file_size} bytes but {expected}")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(f"{record} uses the unsupported zip compression method {info.compress_type}")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise CheckpointError(
            f"{record} claims {info.file_size} bytes from {info.compress_size} compressed, a compression ratio "
            f"over MAX_COMPRESSION_RATIO={MAX_COMPRESSION_RATIO}"
        )
    return info


def _rebuild_containers(obj: Any, memo: dict[int, Any]) -> Any:
    """Replace :class:`NamespaceState` / :class:`OrderedDictState` by fresh ``argparse.Namespace`` /
    ``collections.OrderedDict`` built from their data, recursing through dicts, lists, tuples and
    stand-in attributes (dicts, lists and stand-ins are edited in place; shared objects stay shared)."""
    if isinstance(obj, str | bytes | int | float | torch.Tensor) or obj is None:
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    cls = type(obj)
    result: Any
    if cls is NamespaceState:
        memo[id(obj)] = result = argparse.Namespace()
        for key, value in vars(obj).items():
            setattr(result, key, _rebuild_containers(value, memo))
    elif cls is OrderedDictState:
        memo[id(obj)] = result = collections.OrderedDict()
        for key, value in obj.items():
            result[key] = _rebuild_containers(value, memo)
        for key, value in vars(obj).items():  # e.g. _metadata, checked by _checked_state
            setattr(result, key, _rebuild_containers(value, memo))
    elif cls is dict or cls is list:
        memo[id(obj)] = result = obj
        for key, value in obj.items() if cls is dict else enumerate(obj):
            obj[key] = _rebuild_containers(value, memo)
    elif cls is tuple:
        memo[id(obj)] = obj  # a cycle through a tuple keeps the original tuple
        result = tuple(_rebuild_containers(value, memo) for value in obj)
        memo[id(obj)] = result
    elif cls in _STAND_INS:
        memo[id(obj)] = result = obj
        for key, value in vars(obj).items():
            setattr(obj, key, _rebuild_containers(value, memo))
    else:
        result = obj
    return result


def load_checkpoint(path: str | Path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Read a fairseq checkpoint into plain data without executing any code from it.

    Returns the top-level dict (``args``, ``cfg``, ``model``, ``task_state`` ...), tensors on CPU
    in their stored dtype and ``cfg`` as plain nested dicts (omegaconf containers converted).
    ``max_bytes`` (default :data:`MAX_CHECKPOINT_BYTES`) bounds the total tensor storage the
    checkpoint may declare. Raises :class:`CheckpointError` for non-zip (legacy) files, big-endian
    archives, any pickle global outside the allow-list, BUILD on anything but a stand-in, and storage
    records whose sizes disagree with the pickle or exceed the limits (see the module docstring).
    """
    max_bytes = MAX_CHECKPOINT_BYTES if max_bytes is None else max_bytes
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch zip checkpoint (legacy pre-zip files are unsupported)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected exactly one <top>/data.pkl record, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            info = _record_info(archive, "record", f"{prefix}byteorder", "at most 16 are read", limit=16)
            if archive.read(info) != b"little":
                raise CheckpointError(f"{path}: big-endian checkpoints are unsupported")
        limit = MAX_PICKLE_BYTES
        info = _record_info(archive, "record", pickles[0], f"at most MAX_PICKLE_BYTES={limit} are read", limit=limit)
        file_map = np.memmap(path, dtype=np.uint8, mode="c")
        unpickler = RestrictedUnpickler(archive.read(info), archive, prefix, file_map, max_bytes)
        try:
            state = _rebuild_containers(unpickler.load(), {})
        except CheckpointError:
            raise
        except Exception as exc:  # malformed pickle stream (or nested too deep: RecursionError)
            raise CheckpointError(f"{path}: cannot read checkpoint pickle: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no top-level 'model' entry)")
    if state.get("cfg") is not None:
        state["cfg"] = plain_data(state["cfg"])
    return state

