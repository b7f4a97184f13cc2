"""Target-side text: fairseq ``Dictionary`` + fairseq's ``SentencepieceBPE`` (no fairseq import).

Token ids -> text exactly as av_hubert's ``infer_s2s.py`` does: ``Dictionary.string`` (drop
``</s>``, ``<pad>`` and ``<s>``, print ``<unk>`` for unknown, join pieces with spaces) then
``SentencepieceBPE.decode`` (remove spaces, "▁" -> space, strip). Text -> ids uses the
sentencepiece model (``EncodeAsPieces``) and ``Dictionary.encode_line``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece

from .checkpoint import CheckpointError, DictionaryState, SentencePieceModelState


class TokenizerError(RuntimeError):
    """The dictionary or the sentencepiece model is missing or unusable."""


@dataclass
class Dictionary:
    """fairseq ``Dictionary`` essentials: ``symbols`` and the special indices."""

    symbols: list[str]
    bos_index: int = 0
    pad_index: int = 1
    eos_index: int = 2
    unk_index: int = 3

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_file(cls, path: str | Path) -> Dictionary:
        """Read a fairseq ``dict.*.txt`` (``<symbol> <count> [#fairseq:overwrite]`` per line) after
        the default specials ``<s> <pad> </s> <unk>``."""
        symbols = ["<s>", "<pad>", "</s>", "<unk>"]
        index = {s: i for i, s in enumerate(symbols)}
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            line = line.rstrip()
            if not line:
                continue
            overwrite = line.endswith(" #fairseq:overwrite")
            if overwrite:
                line = line[: -len(" #fairseq:overwrite")]
            word, sep, count = line.rpartition(" ")
            if not sep or not count.lstrip("-").isdigit():
                raise TokenizerError(f"{path}:{number}: expected '<symbol> <count>', got {line!r}")
            if word in index and not overwrite:
                raise TokenizerError(f"{path}:{number}: duplicate symbol {word!r}")
            if word not in index:
                index[word] = len(symbols)
                symbols.append(word)
        return cls(symbols)

    @classmethod
    def from_pickled(cls, state: DictionaryState | dict[str, Any]) -> Dictionary:
        """From the checkpoint's pickled fairseq Dictionary (or the same fields as a plain dict)."""
        fields = state if isinstance(state, dict) else vars(state)
        try:
            return cls(
                list(fields["symbols"]),
                int(fields.get("bos_index", 0)),
                int(fields["pad_index"]),
                int(fields["eos_index"]),
                int(fields["unk_index"]),
            )
        except KeyError as exc:
            raise CheckpointError(f"pickled target dictionary lacks {exc}") from None

    def string(self, ids: Iterable[int]) -> str:
        """``Dictionary.string(ids, extra_symbols_to_ignore={eos, pad})`` (bos is dropped too)."""
        skip = {self.eos_index, self.pad_index, self.bos_index}
        return " ".join("<unk>" if i == self.unk_index else self.symbols[i] for i in ids if i not in skip)

    def encode_pieces(self, pieces: Iterable[str], append_eos: bool = True) -> list[int]:
        """``Dictionary.encode_line`` on already split pieces (unknown pieces -> ``<unk>``)."""
        index = {s: i for i, s in enumerate(self.symbols)}
        ids = [index.get(p, self.unk_index) for p in pieces]
        return [*ids, self.eos_index] if append_eos else ids


def bpe_decode(text: str) -> str:
    """fairseq ``SentencepieceBPE.decode``."""
    return text.replace(" ", "").replace("\u2581", " ").strip()


class Tokenizer:
    """Dictionary + sentencepiece model of a fine-tuned checkpoint."""

    def __init__(self, dictionary: Dictionary, spm: sentencepiece.SentencePieceProcessor) -> None:
        self.dictionary = dictionary
        self.spm = spm

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text as ``infer_s2s.py`` prints it."""
        return bpe_decode(self.dictionary.string(int(i) for i in ids))

    def words(self, ids: Sequence[int], logprobs: Sequence[float]) -> list[tuple[str, list[float]]]:
        """The words of a hypothesis, each with the log-probs of the pieces that spell it.

        A word starts at a piece beginning with ``▁`` (sentencepiece's word boundary), so the words
        joined by spaces are exactly ``decode(ids)``; ``</s>``, ``<pad>`` and ``<s>`` belong to no word.
        """
        d = self.dictionary
        skip = {d.eos_index, d.pad_index, d.bos_index}
        words: list[tuple[list[str], list[float]]] = []
        for token, logprob in zip(ids, logprobs, strict=True):
            if int(token) in skip:
                continue
            piece = "<unk>" if int(token) == d.unk_index else d.symbols[int(token)]
            if piece.startswith("\u2581") or not words:
                words.append(([], []))
            words[-1][0].append(piece)
            words[-1][1].append(float(logprob))
        spelled: list[tuple[str, list[float]]] = []
        carried: list[float] = []  # a bare "▁" piece spells nothing: its log-prob joins the next word
        for pieces, lps in words:
            word = bpe_decode(" ".join(pieces))
            if word:
                spelled.append((word, carried + lps))
                carried = []
            else:
                carried += lps
        if carried and spelled:
            spelled[-1][1].extend(carried)
        return spelled

    def encode(self, text: str, append_eos: bool = True) -> list[int]:
        """Text -> ids as the official label processor does (``EncodeAsPieces`` + ``encode_line``)."""
        return self.dictionary.encode_pieces(self.spm.EncodeAsPieces(text), append_eos)


def _sentencepiece_from_proto(proto: bytes) -> sentencepiece.SentencePieceProcessor:
    spm = sentencepiece.SentencePieceProcessor()
    spm.LoadFromSerializedProto(proto)
    return spm


def build_tokenizer(
    task_state: dict[str, Any] | None, spm_path: str | Path | None = None, dict_path: str | Path | None = None
) -> Tokenizer:
    """Tokenizer from explicit files (they win) or from what the checkpoint's ``task_state`` carries.

    ``task_state['target_dictionary']`` may be the pickled fairseq Dictionary or a plain dict with
    its fields; ``task_state['s2s_tokenizer']`` a pickled ``SentencepieceBPE`` or a plain dict
    ``{'sp': <serialized model proto bytes>}``. Raises :class:`TokenizerError` naming what is
    missing.
    """
    task_state = task_state or {}
    if dict_path is not None:
        if not Path(dict_path).is_file():
            raise TokenizerError(f"dictionary file not found: {dict_path}")
        dictionary = Dictionary.from_file(dict_path)
    elif task_state.get("target_dictionary") is not None:
        dictionary = Dictionary.from_pickled(task_state["target_dictionary"])
    else:
        raise TokenizerError(
            "no target dictionary: the checkpoint carries none; pass dict_path (the dict.wrd.txt file)"
        )

    if spm_path is not None:
        if not Path(spm_path).is_file():
            raise TokenizerError(f"sentencepiece model file not found: {spm_path}")
        spm = sentencepiece.SentencePieceProcessor()
        spm.Load(str(spm_path))
    else:
        bpe = task_state.get("s2s_tokenizer")
        sp = bpe.get("sp") if isinstance(bpe, dict) else getattr(bpe, "sp", None)
        proto = sp.proto if isinstance(sp, SentencePieceModelState) else sp
        if not isinstance(proto, bytes):
            raise TokenizerError(
                "no sentencepiece model: the checkpoint carries none; pass spm_path (the .model file)"
            )
        spm = _sentencepiece_from_proto(proto)
    return Tokenizer(dictionary, spm)

