"""Audio: the sound of a clip, decoded once and cached, and what each audio-capable model family needs.

Decoding. A clip's first audio stream is decoded with PyAV and resampled (FFmpeg's resampler, through
`av.AudioResampler`) to mono float32 at the rate of the model's feature extractor (16 kHz for Whisper-style
extractors: Qwen2-Audio, Qwen2.5-Omni, Qwen3-Omni), cut at `max_seconds`. transformers' own `load_audio` needs
librosa or torchcodec and decodes a whole file for one track; PyAV is already what the frames are read with.
The waveform is cached on disk under the frame cache's root (`<frame cache>/audio/`), keyed by clip path + size +
mtime + the audio setting, so a second run, a second model, or the ablation's `audio` and `av` runs never decode
again.

Clips without sound. One of the release-like demo clips (and some real-world clips) has no audio track. Policy:
the row runs with silence, and is marked. Its waveform is zeros for the clip's duration (capped by `max_seconds`,
at least `SILENCE_MIN_SECONDS`), and its predictions.jsonl record says `"audio_track": false`; metrics.json counts
such rows (`silent_clips`). Why not a per-row error: the modality ablation compares text, video, audio and av on
the same rows, and a row that disappears from `audio`/`av` only (but not from `video`) would bias that comparison;
a person shown a silent clip still answers from what they see and read. Zeros also keep the processors' and
models' shapes regular (Qwen2.5-Omni, with audio interleaved, fails on a batch where a video without audio comes
before one with audio).

Families. `AUDIO_FAMILIES` is data keyed by the config's model_type (move it into a model-family table as is):
  max_seconds      audio kept per clip (and the features' padded length: rows of one length share a forward)
  pad_seconds      the features' padded length when the encoder wants one fixed length (Qwen2-Audio: 30 s)
  video            whether the model also takes video (av modality)
  interleave       the processor's time-aligned audio-in-video option is used for av (Qwen2.5-Omni:
                   `load_audio_from_video` + `use_audio_in_video`): audio and frame tokens alternate in 2 s chunks
  system           a system prompt for every chat (None: the template's default)
  processor_kwargs how its processor must be called on frames that mmla already sampled and resized
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .video import ClipError, Frames, NpzCache

SILENCE_MIN_SECONDS = 1.0

# The official Qwen2.5-Omni system prompt (its model card: the talker needs it; the thinker accepts any).
OMNI_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
               "auditory and visual inputs, as well as generating text and speech.")

# Qwen video processors take mmla's frames as they are (already sized to multiples of patch x merge).
_QWEN_FRAMES = {"do_resize": False, "cap_pixels_per_frame": False}
AUDIO_FAMILIES: dict[str, dict] = {
    "qwen2_5_omni_thinker": dict(max_seconds=30.0, video=True, interleave=True, system=OMNI_SYSTEM,
                                 processor_kwargs=_QWEN_FRAMES),
    "qwen2_5_omni": dict(max_seconds=30.0, video=True, interleave=True, system=OMNI_SYSTEM,
                         processor_kwargs=_QWEN_FRAMES),
    "qwen3_omni_moe_thinker": dict(max_seconds=30.0, video=True, interleave=True,
                                   processor_kwargs=_QWEN_FRAMES),
    # its Whisper encoder takes exactly 30 s of features (max_source_positions 1500 x 2 strides)
    "qwen2_audio": dict(max_seconds=30.0, pad_seconds=30.0, video=False, interleave=False),
}


def audio_family(config) -> dict:
    return AUDIO_FAMILIES.get(getattr(config, "model_type", None), {})


def takes_audio(processor) -> bool:
    """A processor with a feature extractor for sound (any transformers audio or omni model)."""
    return getattr(processor, "feature_extractor", None) is not None


@dataclass(frozen=True)
class AudioSetting:
    """What of a clip's sound the model hears. Recorded in every run."""

    rate: int = 16000  # samples per second, the feature extractor's
    channels: int = 1  # mono: every transformers audio feature extractor takes one channel
    max_seconds: float = 30.0
    interleave: bool = False  # av: audio and video tokens time-aligned (the processor's audio-in-video option)

    def record(self) -> dict:
        return dataclasses.asdict(self)

    def decode_key(self) -> dict:
        return {"rate": self.rate, "channels": self.channels, "max_seconds": self.max_seconds}

    @property
    def max_samples(self) -> int:
        return int(round(self.max_seconds * self.rate))


def audio_setting(processor, family: dict, max_seconds: float | None = None, interleave: bool | None = None,
                  modality: str = "av") -> AudioSetting:
    """The setting for a model: its feature extractor's rate, the family's defaults, then overrides."""
    fe = getattr(processor, "feature_extractor", None)
    rate = int(getattr(fe, "sampling_rate", 16000) or 16000)
    secs = float(max_seconds if max_seconds is not None else family.get("max_seconds", 30.0))
    if secs <= 0:
        raise ValueError(f"--max-audio-seconds must be positive, got {max_seconds}")
    inter = family.get("interleave", False) if interleave is None else bool(interleave)
    return AudioSetting(rate=rate, max_seconds=secs, interleave=bool(inter) and modality == "av")


@dataclass
class Audio:
    wave: np.ndarray  # (samples,) float32 mono at the setting's rate
    rate: int
    duration: float  # seconds of the clip (its container's), for the silence of a clip without sound
    has_track: bool  # False: the clip has no audio stream; `wave` is silence
    cached: bool = False


@dataclass
class AvClip:
    """What one av row hears and sees."""

    frames: Frames
    audio: Audio


# ---------------------------------------------------------------- decoding


def _duration(container) -> float:
    if container.duration:
        return float(container.duration) / 1_000_000  # av.time_base
    for s in container.streams:
        if s.duration and s.time_base:
            return float(s.duration * s.time_base)
    return 0.0


def decode_audio(path: str | os.PathLike, setting: AudioSetting) -> Audio:
    """The clip's first audio stream as mono float32 at `setting.rate`, at most `max_seconds` long; silence for a
    clip without an audio stream. Raises ClipError with the reason for a missing or unreadable clip."""
    import av

    path = Path(path)
    if not path.is_file():
        raise ClipError(f"missing: {path}")
    chunks, n, limit = [], 0, setting.max_samples
    try:
        with av.open(str(path)) as c:
            duration = _duration(c)
            if not c.streams.audio:
                n_sil = int(round(min(max(duration, SILENCE_MIN_SECONDS), setting.max_seconds) * setting.rate))
                return Audio(np.zeros(n_sil, np.float32), setting.rate, duration, has_track=False)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=setting.rate)

            def take(frames):
                nonlocal n
                for f in frames:
                    a = f.to_ndarray().reshape(-1)
                    chunks.append(a)
                    n += len(a)

            for frame in c.decode(audio=0):
                take(resampler.resample(frame))
                if n >= limit:
                    break
            else:
                take(resampler.resample(None))  # flush the resampler's buffered tail
    except Exception as e:  # corrupt container, unsupported codec, truncated stream
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ClipError(f"unreadable audio: {type(e).__name__}: {msg}"[:300]) from None
    wave = np.concatenate(chunks)[:limit].astype(np.float32) if chunks else np.zeros(0, np.float32)
    if len(wave) == 0:  # a track with no decodable sample: silence, as for a clip without a track
        n_sil = int(round(min(max(duration, SILENCE_MIN_SECONDS), setting.max_seconds) * setting.rate))
        return Audio(np.zeros(n_sil, np.float32), setting.rate, duration, has_track=False)
    return Audio(np.ascontiguousarray(wave), setting.rate, duration, has_track=True)


# ---------------------------------------------------------------- cache


class AudioCache(NpzCache):
    """Decoded waveforms, keyed by clip and audio setting (mmla.video.NpzCache)."""

    what = "audio cache"

    @classmethod
    def beside(cls, frame_cache) -> AudioCache:
        """The audio cache that goes with a frame cache (a folder inside it, on or off with it)."""
        return cls(Path(frame_cache.root) / "audio", enabled=frame_cache.enabled)

    def get(self, clip: Path, setting: AudioSetting) -> Audio | None:
        hit = self.read(clip, setting, "wave")
        if hit is None:
            return None
        wave, meta = hit
        return Audio(wave, meta["rate"], meta["duration"], meta["has_track"], cached=True)

    def put(self, clip: Path, setting: AudioSetting, a: Audio) -> None:
        self.write(clip, setting, "wave", a.wave, {"rate": a.rate, "duration": a.duration, "has_track": a.has_track})


def load_audio(path: str | os.PathLike, setting: AudioSetting, cache: AudioCache | None = None) -> Audio:
    """The waveform from the cache, else decoded (and cached). Raises ClipError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(f"missing: {path}")
    return cache.through(path, setting, decode_audio) if cache is not None else decode_audio(path, setting)
