"""Reading a clip's frames, and the workers that read clips ahead of the model.

Decoders. TorchCodec (`pip install 'mmla[torchcodec]'`; it needs FFmpeg's shared libraries) seeks to each sampled
frame; PyAV (always installed, FFmpeg bundled) decodes the clip from its start to the last sampled frame. Both give
the same frame indices and the same RGB pixels for the official samplers (tests/test_decode.py checks it on the real
clips), so the frame cache does not key on the decoder. `decoder_name()` picks TorchCodec when it imports and its
FFmpeg loads, else PyAV with one line on stderr saying why; $MMLA_VIDEO_DECODER=pyav|torchcodec forces one.

Workers. `DecodePool` runs frame loads on a few threads (decoding and resizing release the GIL), first in first out,
so the clips of the next batches decode while the model runs the current ones. One worker means no thread: each
load runs when it is submitted, in the caller's thread (the serial path).
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

DECODERS = ("torchcodec", "pyav")
MAX_WORKERS = 8  # past this, threads fight over the same cores as the processor and the model

_choice: tuple[str, str | None] | None = None  # (decoder, why not torchcodec), once per process
_choice_lock = threading.Lock()


def _torchcodec_problem() -> str | None:
    """None when TorchCodec imports and its FFmpeg libraries load; else the reason, in one line."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads FFmpeg: raises when it is absent)
    except ImportError:
        return "torchcodec is not installed"
    except Exception as e:  # RuntimeError/OSError: no usable FFmpeg libraries
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return f"torchcodec cannot load FFmpeg ({first.strip()[:160]})"
    return None


def decoder_name(announce: bool = True) -> str:
    """The decoder this process uses: 'torchcodec' or 'pyav'. The fallback is said once, in one line."""
    global _choice
    with _choice_lock:
        if _choice is None:
            forced = os.environ.get("MMLA_VIDEO_DECODER", "").strip().lower()
            if forced and forced not in DECODERS:
                raise ValueError(f"$MMLA_VIDEO_DECODER must be one of {', '.join(DECODERS)}, got '{forced}'")
            problem = _torchcodec_problem() if forced != "pyav" else "pyav asked by $MMLA_VIDEO_DECODER"
            if forced == "torchcodec" and problem:
                raise ValueError(f"$MMLA_VIDEO_DECODER=torchcodec, but {problem}")
            _choice = ("pyav", problem) if problem else ("torchcodec", None)
            if problem and announce and not forced:
                print(f"video decoder: PyAV ({problem}; pip install 'mmla[torchcodec]' and FFmpeg for the faster "
                      f"one)", file=sys.stderr)
        return _choice[0]


def read_frames(path: str, pick: Callable, decoder: str | None = None) -> np.ndarray:
    """(len(unique indices), H, W, 3) uint8 RGB frames of the clip. `pick(metadata)` gets an object with
    total_num_frames, fps and duration and returns the sorted unique frame indices to read."""
    decoder = decoder or decoder_name()
    if decoder == "torchcodec":
        return _read_torchcodec(path, pick)
    from transformers.video_utils import load_video

    video, _ = load_video(str(path), backend="pyav", sample_indices_fn=pick)
    return np.asarray(video)


class _Meta:
    def __init__(self, total: int, fps: float, duration: float):
        self.total_num_frames, self.fps, self.duration = total, fps, duration


def _read_torchcodec(path: str, pick: Callable) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    # exact seek mode scans the container's index, so frame i is the i-th decoded frame, as PyAV counts them;
    # one FFmpeg thread per clip: the pool decodes several clips at once
    dec = VideoDecoder(str(path), seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
    m = dec.metadata
    total = int(m.num_frames or 0)
    fps = float(m.average_fps or 0.0)
    meta = _Meta(total, fps, float(m.duration_seconds or (total / fps if fps else 0.0)))
    idx = [int(i) for i in pick(meta)]
    if not idx:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return dec.get_frames_at(indices=idx).data.numpy()


def default_workers() -> int:
    """The cores this process may use, shared among the data-parallel ranks of this machine, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(MAX_WORKERS, cores // max(1, local)))


class DecodePool:
    """Frame loads on `workers` threads, in submission order. workers=None: `default_workers()`."""

    def __init__(self, workers: int | None = None):
        if workers is not None and int(workers) < 1:
            raise ValueError(f"--decode-workers must be a positive integer, got {workers}")
        self.workers = int(workers) if workers is not None else default_workers()
        self._ex = ThreadPoolExecutor(self.workers, thread_name_prefix="mmla-decode") if self.workers > 1 else None

    @property
    def parallel(self) -> bool:
        return self._ex is not None

    def submit(self, fn: Callable, *args) -> Future:
        if self._ex is not None:
            return self._ex.submit(fn, *args)
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:  # the caller sees it at .result(), as from a worker
            f.set_exception(e)
        return f

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
