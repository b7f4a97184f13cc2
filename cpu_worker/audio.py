"""Audio features exactly as the official AV-HuBERT dataset computes them, plus a silence helper.

``audio_features``: 16 kHz mono int16 → ``python_speech_features.logfbank`` on the raw sample values
(defaults: 25 ms window, 10 ms hop, 26 filters, nfft 512, pre-emphasis 0.97) computed in float64 and
cast to float32, then stacked by 4 (zero rows appended to a multiple of 4; row t = frames 4t..4t+3),
giving float32 [T,104] at 25 Hz — the *unnormalised* array of ``AVHubertDataset.load_feature``.

``logfbank`` itself frames the signal through index arrays: for a 10-minute clip it peaks 783 MB
above where it started (its int64 index tiles, the frames, a window of ones and their product) and
takes 1.3-2.4 s on a 2-core EPYC. Here the frames are a strided view of the padded signal, the power
spectrum is taken in blocks of frames, and the rest is the library's own code: the same bits (a
test), 332 MB and 0.35-0.8 s.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from python_speech_features.base import get_filterbanks
from python_speech_features.sigproc import powspec, preemphasis
from scipy.signal import resample_poly

from tasks.records import FPS

SAMPLE_RATE = 16000
STACK_ORDER = 4
FEATURE_DIM = 26 * STACK_ORDER
# python_speech_features.logfbank's defaults at 16 kHz
_FRAME, _HOP, _NFFT, _FILTERS, _PREEMPH = 400, 160, 512, 26, 0.97
_SPECTRUM_ROWS = 4096  # frames per FFT block (bounds its complex temporaries to about 17 MB)


def to_int16_16k(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono int16 at 16 kHz.  Float input is taken as [-1, 1]; [N,C] input is averaged over channels."""
    x = np.asarray(wave)
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] <= 8 else x.mean(axis=0)
    if x.ndim != 1:
        raise ValueError(f"expected a mono waveform, got shape {np.shape(wave)}")
    if np.issubdtype(x.dtype, np.floating):
        x = x * 32768.0
    if sample_rate != SAMPLE_RATE:
        g = math.gcd(int(sample_rate), SAMPLE_RATE)
        x = resample_poly(x.astype(np.float64), SAMPLE_RATE // g, int(sample_rate) // g)
    if x.dtype != np.int16:
        x = np.clip(np.rint(x), -32768, 32767).astype(np.int16)
    return x


def stack_features(feats: np.ndarray, stack_order: int = STACK_ORDER) -> np.ndarray:
    """Official ``stacker``: pad with zero rows to a multiple of ``stack_order`` and concatenate."""
    n, dim = feats.shape
    if n % stack_order:
        feats = np.concatenate([feats, np.zeros((stack_order - n % stack_order, dim), feats.dtype)])
    return feats.reshape(-1, stack_order * dim)


def log_filterbank(wave_int16: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """26-band log filterbank at 100 Hz (float32 [N,26]), official recipe (float64 then cast)."""
    wave = to_int16_16k(wave_int16, sample_rate)
    if wave.size == 0:
        return np.zeros((0, 26), np.float32)
    return _logfbank(wave).astype(np.float32)


def _logfbank(wave: np.ndarray) -> np.ndarray:
    """``python_speech_features.logfbank(wave, 16000)`` (float64 [N,26]) with the same operations in
    the same order, its frames a strided view instead of a gathered copy (its window is all ones) and
    its power spectrum (independent per frame) taken a block of frames at a time."""
    signal = preemphasis(wave, _PREEMPH)
    count = 1 if len(signal) <= _FRAME else 1 + math.ceil((len(signal) - _FRAME) / _HOP)
    padded = np.concatenate((signal, np.zeros((count - 1) * _HOP + _FRAME - len(signal))))
    frames = np.lib.stride_tricks.sliding_window_view(padded, _FRAME)[::_HOP]
    spectrum = np.empty((count, _NFFT // 2 + 1))  # row by row the library's power spectrum
    for start in range(0, count, _SPECTRUM_ROWS):
        spectrum[start : start + _SPECTRUM_ROWS] = powspec(frames[start : start + _SPECTRUM_ROWS], _NFFT)
    feat = np.dot(spectrum, _filterbank().T)
    return np.log(np.where(feat == 0, np.finfo(float).eps, feat))


@functools.cache
def _filterbank() -> np.ndarray:
    bank: np.ndarray = get_filterbanks(_FILTERS, _NFFT, SAMPLE_RATE, 0, SAMPLE_RATE / 2)
    bank.flags.writeable = False
    return bank


def audio_features(wave_int16: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Stacked log filterbanks float32 [T,104] at 25 Hz (unnormalised, as the official dataset)."""
    return stack_features(log_filterbank(wave_int16, sample_rate))


def frame_energy_db(
    wave_int16: np.ndarray, sample_rate: int = SAMPLE_RATE, fps: float = FPS, floor_db: float = -100.0
) -> np.ndarray:
    """RMS energy per video frame (1/fps windows, last one partial) in dB full scale, float32 [T].

    0 dB is a full-scale square wave; digital silence gives ``floor_db``.  For silence splitting.
    """
    x = to_int16_16k(wave_int16, sample_rate).astype(np.float64) / 32768.0
    hop = SAMPLE_RATE / fps
    n = math.ceil(x.size / hop - 1e-9) if x.size else 0
    out = np.empty(n, np.float32)
    for t in range(n):
        seg = x[round(t * hop) : round((t + 1) * hop)]
        rms = math.sqrt(float(np.mean(seg * seg))) if seg.size else 0.0
        out[t] = max(floor_db, 20.0 * math.log10(rms)) if rms > 0 else floor_db
    return out
