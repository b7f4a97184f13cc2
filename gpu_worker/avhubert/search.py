"""Batched beam search reproducing av_hubert's ``SequenceGenerator`` with fairseq ``BeamSearch``.

Same arithmetic as the official generator: cumulative float32 scores, ``2 * beam`` candidates per
step from a top-k over ``beam x vocab`` (only the first beam at step 0), ``<pad>`` never chosen,
``<unk>`` penalty, ``</s>`` blocked before ``min_len`` and forced at the length cap, a hypothesis
is finalised when ``</s>`` is among the top ``beam`` candidates, a sentence is done after ``beam``
finalised hypotheses or at its cap, scores divided by ``length ** len_penalty`` (length counts the
``</s>``), results sorted by score. Greedy decoding is ``beam_size=1``. Also reproduced:
``no_repeat_ngram_size`` (fairseq ``NGramRepeatBlock``, CPU path), ``match_source_len``
(``LengthConstrainedBeamSearch`` with min/max length = the item's frame count, as
``build_generator`` sets it) and forced prefix tokens (``prefix_size``: ``_prefix_tokens``).

The decoder runs incrementally (:class:`~.model.DecoderCache`): one token per hypothesis per step,
self-attention keys/values cached and reordered, encoder-attention keys/values computed once per
source item and shared by its hypotheses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .model import TransformerDecoder

MaxLenFrom = Literal["padded", "item", "frames"]


@dataclass
class GenerationConfig:
    """Generator settings; defaults are av_hubert's ``conf/s2s_decode.yaml`` except the beam.

    ``max_len_from`` chooses the ``src_len`` in ``max_len = min(int(max_len_a * src_len +
    max_len_b), max_len - 1)``:

    - ``"padded"`` (official, default): the audio feature dimension (104) whenever audio is given,
      else the padded length T of the batch: what ``infer_s2s.py`` does, so a short item decoded in
      a batch may get a longer cap than alone;
    - ``"item"``: the value the official generator would use for each item decoded alone (104 with
      audio, the item's own frame count for video only): a batch gives the same results as one item
      at a time, and those equal the official single-item results;
    - ``"frames"``: each item's own frame count for every modality (the length the official formula
      was meant to use).

    ``max_len`` 0 means the decoder's maximum positions (2048 for the released models).
    ``match_source_len``: the official cap is the longest item's frame count (from the padding
    mask; ``max_len_a``/``max_len_b`` and ``max_len_from`` are then unused except that
    ``"item"``/``"frames"`` give each item its own count), ``</s>`` is blocked before and given
    log-probability 0 from each item's own frame count on, and hypotheses ending after it score
    ``-inf``. ``no_repeat_ngram_size`` > 0 bans every token that would repeat an n-gram of the
    hypothesis (the leading ``</s>`` counts as a token, as in fairseq).
    ``incremental=False`` recomputes the whole prefix at every step (reference / benchmark
    baseline; same results).
    """

    beam_size: int = 5
    max_len_a: float = 1.0
    max_len_b: int = 0
    max_len: int = 0
    min_len: int = 1
    len_penalty: float = 1.0
    normalize_scores: bool = True
    unk_penalty: float = 0.0
    temperature: float = 1.0
    no_repeat_ngram_size: int = 0
    match_source_len: bool = False
    max_len_from: MaxLenFrom = "padded"
    incremental: bool = True

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be greater than 0, got {self.temperature}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.no_repeat_ngram_size == 1:
            # fairseq's unigram "n-grams" include the leading </s>, so </s> is banned at every step
            # and the official generator never finishes (it fails its `step < max_len` assertion)
            raise ValueError("no_repeat_ngram_size=1 bans </s> at every step (the official generator fails too)")


@dataclass
class RawHypothesis:
    """A finished hypothesis: ``tokens`` end with ``</s>``; ``positional_scores`` are the per-token
    log-probabilities (natural log, the ``</s>`` included); ``score`` their sum divided by
    ``len(tokens) ** len_penalty`` when scores are normalised."""

    tokens: list[int]
    score: float
    positional_scores: list[float]


def length_caps(src_lens: list[int], cfg: GenerationConfig, decoder_max_positions: int) -> list[int]:
    """Official ``max_len`` for each source length."""
    limit = (cfg.max_len or decoder_max_positions) - 1
    caps = [min(int(cfg.max_len_a * n + cfg.max_len_b), limit) for n in src_lens]
    for cap in caps:
        if cfg.min_len > cap:
            raise ValueError(f"min_len {cfg.min_len} cannot be larger than max_len {cap}")
    return caps


class _Decoding:
    """Decoder calls for the active hypotheses (``bsz * beam`` rows) of the active items."""

    def __init__(
        self, decoder: TransformerDecoder, memory: Tensor, mask: Tensor | None, incremental: bool, beam: int,
        steps: int,
    ) -> None:
        self.decoder = decoder
        self.memory = memory
        self.mask = mask
        self.cache = decoder.init_cache(memory, memory.size(0) * beam, steps) if incremental else None

    def select_items(self, items: Tensor) -> None:
        self.memory = self.memory[items]
        self.mask = None if self.mask is None else self.mask[items]
        if self.cache is not None:
            self.cache.select_items(items)

    def reorder(self, rows: Tensor, same_prefix: Tensor | None = None) -> None:
        if self.cache is not None:
            self.cache.reorder(rows, same_prefix)

    def log_probs(self, tokens: Tensor, temperature: float) -> Tensor:
        logits = self.decoder(tokens, self.memory, self.mask, self.cache)[:, -1, :]
        if temperature != 1.0:
            logits = logits / temperature
        return torch.log_softmax(logits.float(), dim=-1)


def _block_repeated_ngrams(tokens: Tensor, lprobs: Tensor, step: int, n: int) -> None:
    """fairseq ``NGramRepeatBlock._no_repeat_ngram`` on ``tokens[:, :step + 1]`` (``</s>`` first):
    ban every token that would complete an n-gram already in the hypothesis (in place). The
    n-grams fairseq also builds over the ``<pad>`` tail only ban ``<pad>``, which is banned anyway."""
    if step + 2 - n < 0:
        return
    for row, seq in enumerate(tokens[:, : step + 1].tolist()):
        context = seq[step + 2 - n : step + 1]
        banned = {seq[i + n - 1] for i in range(step + 2 - n) if seq[i : i + n - 1] == context}
        if banned:
            lprobs[row, sorted(banned)] = -math.inf


def _force_prefix(
    step: int, lprobs: Tensor, tokens: Tensor, scores: Tensor, prefix: Tensor, rows: Tensor, beam: int, pad: int,
    eos: int,
) -> None:
    """fairseq ``SequenceGenerator._prefix_tokens`` (in place) on the hypothesis ``rows`` (bool):
    only the prefix token keeps its log-probability (``<pad>`` in the prefix: no constraint); a
    prefix ``</s>`` copies the first beam's tokens, scores and log-probabilities to all beams."""
    toks = prefix[:, step].repeat_interleave(beam)
    tok_lprobs = lprobs.gather(-1, toks.unsqueeze(-1))
    mask = toks.ne(pad) & rows
    lprobs[mask] = -math.inf
    lprobs[mask] = lprobs[mask].scatter(-1, toks[mask].unsqueeze(-1), tok_lprobs[mask])
    eos_items = (toks.eq(eos) & rows).view(-1, beam)[:, 0]
    if bool(eos_items.any()):
        for t in (tokens, scores, lprobs):
            view = t.view(-1, beam, t.size(-1))
            view[eos_items] = view[eos_items][:, :1, :]


def _beam_step(
    step: int, lprobs: Tensor, scores: Tensor, src_lengths: Tensor | None = None, eos: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """fairseq ``BeamSearch.step``: ``lprobs`` ``[bsz, beam, V]``, cumulative ``scores``
    ``[bsz, beam, step]`` -> candidate (scores, token ids, beam ids), each ``[bsz, 2*beam]``.
    With ``src_lengths`` ``[bsz]`` it is ``LengthConstrainedBeamSearch(min_len_a=1, min_len_b=0,
    max_len_a=1, max_len_b=0)`` (``match_source_len``)."""
    if src_lengths is not None:
        lprobs[step < src_lengths, :, eos] = -math.inf
        lprobs[step >= src_lengths, :, eos] = 0
    bsz, beam, vocab = lprobs.shape
    # all beams are identical at step 0: only the first one is expanded
    lprobs = lprobs[:, ::beam, :].contiguous() if step == 0 else lprobs + scores[:, :, step - 1].unsqueeze(-1)
    flat = lprobs.view(bsz, -1)
    top_scores, top_indices = torch.topk(flat, k=min(beam * 2, flat.size(1) - 1))
    return top_scores, top_indices.fmod(vocab), torch.div(top_indices, vocab, rounding_mode="trunc")


@torch.inference_mode()
def beam_search(
    decoder: TransformerDecoder,
    encoder_out: Tensor,
    encoder_padding_mask: Tensor | None,
    max_lens: list[int],
    cfg: GenerationConfig,
    eos: int,
    pad: int,
    unk: int,
    src_lengths: list[int] | None = None,
    prefix_tokens: Tensor | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[list[RawHypothesis]]:
    """Decode every item of ``encoder_out`` ``[B, S, D]``; item ``b`` stops at ``max_lens[b]``
    tokens before the forced ``</s>``. Returns per item up to ``beam`` hypotheses, best first.

    ``src_lengths`` (each item's frame count) is required with ``cfg.match_source_len``;
    ``prefix_tokens`` ``[B, P]`` forces the first ``P`` tokens (official ``prefix_size``: the
    target's first tokens; ``<pad>`` entries are free). ``on_step`` is called before each decoder
    step (the engine adjusts its CPU threads there)."""
    device = encoder_out.device
    bsz = encoder_out.size(0)
    vocab = decoder.embed_tokens.num_embeddings
    beam = min(cfg.beam_size, vocab - 1)
    decoding = _Decoding(decoder, encoder_out, encoder_padding_mask, cfg.incremental, beam, max(max_lens) + 1)

    cap = torch.tensor(max_lens, device=device)  # per active item
    src_len = None
    if cfg.match_source_len:
        if src_lengths is None:
            raise ValueError("match_source_len needs src_lengths")
        src_len = torch.tensor(src_lengths, device=device)
    prefix = None if prefix_tokens is None else prefix_tokens.to(device=device, dtype=torch.long)
    longest = max(max_lens)
    scores = torch.zeros(bsz * beam, longest + 1, device=device)
    tokens = torch.full((bsz * beam, longest + 2), pad, dtype=torch.long, device=device)
    tokens[:, 0] = eos
    cands_to_ignore = torch.zeros(bsz, beam, dtype=torch.bool, device=device)
    finalized: list[list[RawHypothesis]] = [[] for _ in range(bsz)]
    active_items = list(range(bsz))  # original index of each active item
    cand_size = 2 * beam
    bbsz_offsets = (torch.arange(bsz, device=device) * beam).unsqueeze(1)
    cand_offsets = torch.arange(cand_size, device=device)
    reorder: Tensor | None = None
    same_prefix: Tensor | None = None
    kept_items: Tensor | None = None

    for step in range(longest + 1):
        if on_step is not None:
            on_step()
        if reorder is not None:
            if kept_items is not None:
                decoding.select_items(kept_items)
            decoding.reorder(reorder, same_prefix)
        lprobs = decoding.log_probs(tokens[:, : step + 1], cfg.temperature)
        lprobs[lprobs != lprobs] = -math.inf
        lprobs[:, pad] = -math.inf
        lprobs[:, unk] -= cfg.unk_penalty
        at_cap = (step >= cap).repeat_interleave(beam)
        if bool(at_cap.any()):  # force </s> at the length cap
            eos_lprobs = lprobs[at_cap, eos]
            lprobs[at_cap] = -math.inf
            lprobs[at_cap, eos] = eos_lprobs
        below_cap = (step < cap).repeat_interleave(beam)
        if prefix is not None and step < prefix.size(1) and bool(below_cap.any()):
            _force_prefix(step, lprobs, tokens, scores, prefix, below_cap, beam, pad, eos)
        elif step < cfg.min_len:  # (not applied while a prefix is forced, as in fairseq)
            lprobs[:, eos] = -math.inf
        if cfg.no_repeat_ngram_size > 0:
            _block_repeated_ngrams(tokens, lprobs, step, cfg.no_repeat_ngram_size)

        n = len(active_items)
        cand_scores, cand_indices, cand_beams = _beam_step(
            step, lprobs.view(n, beam, -1), scores.view(n, beam, -1)[:, :, :step], src_len, eos
        )
        cand_bbsz_idx = cand_beams + bbsz_offsets
        eos_mask = cand_indices.eq(eos) & cand_scores.ne(-math.inf)
        eos_mask[:, :beam][cands_to_ignore] = False
        eos_rows = torch.masked_select(cand_bbsz_idx[:, :beam], eos_mask[:, :beam])

        done: list[int] = []
        if eos_rows.numel() > 0:
            eos_scores = torch.masked_select(cand_scores[:, :beam], eos_mask[:, :beam])
            done = _finalize(step, eos_rows, eos_scores, tokens, scores, finalized, active_items,
                             cap, beam, eos, cfg, src_len)
        if len(done) == n:
            break

        kept_items = None
        if done:
            keep = torch.ones(n, dtype=torch.bool, device=device)
            keep[done] = False
            kept_items = torch.arange(n, device=device).masked_select(keep)
            active_items = [active_items[i] for i in kept_items.tolist()]
            n = len(active_items)
            eos_mask = eos_mask[kept_items]
            cand_beams = cand_beams[kept_items]
            bbsz_offsets = bbsz_offsets[:n]
            cand_bbsz_idx = cand_beams + bbsz_offsets
            cand_scores = cand_scores[kept_items]
            cand_indices = cand_indices[kept_items]
            cands_to_ignore = cands_to_ignore[kept_items]
            cap = cap[kept_items]
            src_len = None if src_len is None else src_len[kept_items]
            prefix = None if prefix is None else prefix[kept_items]
            scores = scores.view(-1, beam * scores.size(1))[kept_items].view(n * beam, -1)
            tokens = tokens.view(-1, beam * tokens.size(1))[kept_items].view(n * beam, -1)

        # keep the best `beam` candidates that did not just end (finished ones sort last)
        eos_mask[:, :beam] = ~((~cands_to_ignore) & (~eos_mask[:, :beam]))
        active_mask = eos_mask.long() * cand_size + cand_offsets[: eos_mask.size(1)]
        new_ignore, active_hypos = torch.topk(active_mask, k=beam, dim=1, largest=False)
        cands_to_ignore = new_ignore.ge(cand_size)[:, :beam]
        active_rows = torch.gather(cand_bbsz_idx, 1, active_hypos).view(-1)

        same_prefix = None
        if kept_items is None:  # per row: leading steps whose cached keys/values stay valid
            differs = tokens[active_rows, : step + 1].ne(tokens[:, : step + 1])
            same_prefix = torch.where(differs.any(1), differs.int().argmax(1), step + 1)
        tokens[:, : step + 1] = tokens[active_rows, : step + 1]
        tokens.view(n, beam, -1)[:, :, step + 1] = torch.gather(cand_indices, 1, active_hypos)
        if step > 0:
            scores[:, :step] = scores[active_rows, :step]
        scores.view(n, beam, -1)[:, :, step] = torch.gather(cand_scores, 1, active_hypos)
        reorder = active_rows
        if kept_items is not None:  # rows index the pre-removal batch, as the caches do
            reorder = _rows_before_removal(active_rows, kept_items, beam)

    for item, hyps in enumerate(finalized):
        order = torch.sort(torch.tensor([h.score for h in hyps]), descending=True).indices
        finalized[item] = [hyps[i] for i in order.tolist()]
    return finalized


def _rows_before_removal(rows: Tensor, kept_items: Tensor, beam: int) -> Tensor:
    """Map hypothesis rows of the shrunk batch to rows of the batch before items were removed."""
    return rows + (kept_items - torch.arange(kept_items.numel(), device=rows.device)).repeat_interleave(
        beam
    ) * beam


def _finalize(
    step: int,
    rows: Tensor,
    eos_scores: Tensor,
    tokens: Tensor,
    scores: Tensor,
    finalized: list[list[RawHypothesis]],
    active_items: list[int],
    cap: Tensor,
    beam: int,
    eos: int,
    cfg: GenerationConfig,
    src_len: Tensor | None = None,
) -> list[int]:
    """Store the hypotheses ending at ``rows``; return the active indices of finished items."""
    seqs = tokens[rows, 1 : step + 2].clone()
    seqs[:, step] = eos
    pos_scores = scores[rows, : step + 1].clone()
    pos_scores[:, step] = eos_scores
    pos_scores[:, 1:] = pos_scores[:, 1:] - pos_scores[:, :-1]
    if cfg.normalize_scores:
        eos_scores = eos_scores / (step + 1) ** cfg.len_penalty
    if src_len is not None:  # match_source_len: hypotheses longer than the source score -inf
        too_long = step > src_len[torch.div(rows, beam, rounding_mode="floor")]
        eos_scores = eos_scores.masked_fill(too_long, -math.inf)

    touched: dict[int, None] = {}
    for i, row in enumerate(rows.tolist()):
        active = row // beam
        touched[active] = None
        item = active_items[active]
        if len(finalized[item]) < beam:
            finalized[item].append(
                RawHypothesis(seqs[i].tolist(), float(eos_scores[i]), pos_scores[i].tolist())
            )
    caps = cap.tolist()
    return [a for a in touched if len(finalized[active_items[a]]) == beam or step == caps[a]]
