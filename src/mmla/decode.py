"""Reading a clip's frames, and the workers that read clips ahead of the model.

Decoders. TorchCodec (`pip install 'mmla[torchcodec]'`; it needs FFmpeg's shared libraries) seeks to each sampled
frame. PyAV (always installed, FFmpeg bundled) reads with `read_frames_pyav`: one FFmpeg thread per clip, it maps
each packet to its display index (the rank of its pts), decodes the sampled frames and the reference frames they
need, lets FFmpeg skip the other non-reference frames (skip_frame NONREF: no frame is predicted from them, so the
sampled pixels are bit-identical), jumps over the packets before an IDR frame when no sampled frame needs them
(H.264/HEVC: nothing after an IDR frame is predicted from before it), and stops once it has every sampled frame;
where one of its assumptions does not hold (a packet without pts, duplicate pts, a packet count other than the
header's frame count, an unexpected frame, a missing frame, any error) it reads with the scan instead. The scan
(`read_frames_scan`, decoder "scan") is the official construction, transformers' `load_video(backend="pyav")`: every
frame from the start, keeping those whose decode index is sampled; the benchmarks' baselines use it. All give the
same frame indices and the same RGB pixels for the official samplers (tests/test_decode.py checks it on the real
clips), so the frame cache does not key on the decoder. `decoder_name()` picks TorchCodec when it imports and its
FFmpeg loads, else PyAV with one line on stderr saying why; $MMLA_VIDEO_DECODER=pyav|torchcodec forces one.

Workers. `DecodePool` runs frame loads on a few threads (decoding and resizing release the GIL), first in first out,
so the clips of the next batches decode while the model runs the current ones. One worker means no thread: each
load runs when it is submitted, in the caller's thread (the serial path).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

DECODERS = ("torchcodec", "pyav")
READERS = (*DECODERS, "scan")  # "scan": the official full PyAV scan, the baselines' reference
MAX_WORKERS = 8  # past this, threads fight over the same cores as the processor and the model

_choice: tuple[str, str | None] | None = None  # (decoder, why not torchcodec), once per process
_choice_lock = threading.Lock()


def _torchcodec_problem() -> str | None:
    """None when TorchCodec imports and its FFmpeg libraries load; else the reason, in one line."""
    try:
        importlib.import_module("torchcodec.decoders")  # loads FFmpeg: raises when it is absent
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


def read_frames(path: str, pick: Callable, decoder: str | None = None, stats: dict | None = None) -> np.ndarray:
    """(len(unique indices), H, W, 3) uint8 RGB frames of the clip. `pick(metadata)` gets an object with
    total_num_frames, fps and duration and returns the sorted unique frame indices to read. decoder: 'torchcodec',
    'pyav' (the fast PyAV reader), 'scan' (the official full PyAV scan) or None (`decoder_name()`). `stats`, when
    given, receives what the PyAV reader did (see `read_frames_pyav`)."""
    decoder = decoder or decoder_name()
    if decoder == "torchcodec":
        return _read_torchcodec(path, pick)
    if decoder == "scan":
        return read_frames_scan(path, pick)
    if decoder != "pyav":
        raise ValueError(f"unknown video decoder '{decoder}' (known: {', '.join(READERS)})")
    return read_frames_pyav(path, pick, stats)


def read_frames_scan(path: str, pick: Callable) -> np.ndarray:
    """The official construction (the MMLA scripts, transformers' read_video_pyav): decode every frame from the
    start in display order and keep those whose enumeration index is sampled."""
    from transformers.video_utils import load_video

    video, _ = load_video(str(path), backend="pyav", sample_indices_fn=pick)
    return np.asarray(video)


class _Fallback(Exception):
    """An assumption of the fast reader does not hold for this clip: the scan reads it."""


def read_frames_pyav(path: str, pick: Callable, stats: dict | None = None) -> np.ndarray:
    """The scan's frames (same indices, same pixels), decoding only what they need; the scan where unsure.
    `stats` gets reader ('fast' or 'scan'), decoded (frames the fast reader decoded; on the scan, those it decoded
    before giving up) and, on the scan, why."""
    stats = {} if stats is None else stats
    stats.clear()
    try:
        video = _read_fast(str(path), pick, stats)
        stats["reader"] = "fast"
        return video
    except Exception as e:  # _Fallback, or any error: the scan gives today's result (its errors included)
        stats["reader"], stats["why"] = "scan", (str(e) if isinstance(e, _Fallback) else f"{type(e).__name__}: {e}")
    return read_frames_scan(path, pick)


def _read_fast(path: str, pick: Callable, stats: dict) -> np.ndarray:
    import av  # no transformers here: a prefetch child decodes while its parent imports it (mmla.prefetch)

    stats["decoded"] = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        # the metadata read_video_pyav gives `pick`, so that the same indices come back
        total, rate = stream.frames, stream.average_rate
        if not total or not rate:
            raise _Fallback("no frame count or frame rate in the header")
        meta = _Meta(int(total), float(rate), float(total / rate))
        indices = np.asarray(pick(metadata=meta))
        if indices.ndim != 1 or len(indices) == 0 or not np.issubdtype(indices.dtype, np.integer):
            raise _Fallback("the sampler gave no integer indices")
        # the scan keeps frame i when 0 <= i <= indices[-1] and i is in indices
        wanted = [int(i) for i in np.unique(indices) if 0 <= i <= indices[-1]]
        if not wanted or wanted[-1] >= total:
            raise _Fallback("a sampled index past the clip's frames")

        container.seek(0)  # as read_video_pyav does before its scan (and fails where it fails)
        packets = [p for p in container.demux(stream) if p.size]  # the last, empty packet is the demuxer's flush
        pts = [p.pts for p in packets]
        if any(t is None for t in pts):
            raise _Fallback("a packet without pts")
        if len(set(pts)) != len(pts):
            raise _Fallback("duplicate pts")
        if len(packets) != total:
            raise _Fallback(f"{len(packets)} packets, the header says {total} frames")
        if not packets[0].is_keyframe or any(p.is_discard or p.is_corrupt for p in packets):
            raise _Fallback("the stream does not start on a keyframe, or has discarded or corrupt packets")
        # the scan's index of a frame is its position in display order: the rank of its pts
        rank = {t: i for i, t in enumerate(sorted(pts))}
        sampled = set(wanted)

        cc = stream.codec_context
        cc.thread_count = 1  # one FFmpeg thread per clip: the decode pool runs several clips at once
        got: dict[int, np.ndarray] = {}
        shown = -1

        def take(frames) -> None:
            nonlocal shown
            for f in frames:
                stats["decoded"] += 1
                r = rank.get(f.pts)
                if r is None or r <= shown:  # not a packet's pts, or out of display order: the ranks would lie
                    raise _Fallback(f"a decoded frame with pts {f.pts} out of the expected order")
                shown = r
                if r in sampled:
                    got[r] = f.to_ndarray(format="rgb24")  # transformers' conversion

        for n, (start, stop) in enumerate(_spans(packets, rank, sampled, _idr(stream, packets))):
            if n:  # a jump to an IDR frame: the buffered frames out first, then a fresh decoder state
                cc.skip_frame = "DEFAULT"
                take(cc.decode(None))
                cc.flush_buffers()
            for p in packets[start: stop + 1]:
                # Non-reference frames are never used to predict another frame: skipping the ones not sampled
                # leaves every sampled frame bit-identical (FFmpeg reads skip_frame per packet; tests count them).
                cc.skip_frame = "DEFAULT" if rank[p.pts] in sampled else "NONREF"
                take(cc.decode(p))
                if len(got) == len(wanted):
                    break
            if len(got) == len(wanted):
                break
        else:  # every sampled packet sent; the reorder buffer may still hold some of their frames
            cc.skip_frame = "DEFAULT"
            take(cc.decode(None))
        if len(got) != len(wanted):
            raise _Fallback(f"{len(got)} of {len(wanted)} sampled frames decoded")
    return np.stack([got[i] for i in wanted])


def _spans(packets, rank: dict, sampled: set, idr: list[bool] | None) -> list[tuple[int, int]]:
    """The runs of packets (decode order, first and last inclusive) to send: from the start to the last sampled packet,
    except that where an IDR frame lies before a sampled packet and after the packets sent so far, those before
    it are skipped and decoding starts there. An IDR frame empties the decoder's references (H.264/HEVC: no
    later frame is predicted from an earlier one), so the frames after it are bit-identical to those of a decode
    from the start."""
    need = [k for k, p in enumerate(packets) if rank[p.pts] in sampled]
    if not idr:
        return [(0, need[-1])]
    spans: list[list[int]] = []
    restart = 0  # the last IDR packet at or before k
    marks = iter(k for k, flag in enumerate(idr) if flag)
    upcoming = next(marks, None)
    for k in need:
        while upcoming is not None and upcoming <= k:
            restart, upcoming = upcoming, next(marks, None)
        if spans and restart <= spans[-1][1]:
            spans[-1][1] = k
        else:
            spans.append([restart, k])
    return [(a, b) for a, b in spans]


def _idr(stream, packets) -> list[bool] | None:
    """Per packet: it starts an IDR frame. None when the stream is not H.264 or HEVC with length-prefixed NAL units
    (MP4, MKV, MOV), or anything is unclear: then nothing is skipped."""
    name = stream.codec_context.name
    extra = stream.codec_context.extradata or b""
    if name == "h264" and len(extra) >= 7 and extra[0] == 1:
        size, idr_types, kind = (extra[4] & 3) + 1, {5}, lambda b: b & 0x1F
    elif name == "hevc" and len(extra) >= 23 and extra[0] == 1:
        size, idr_types, kind = (extra[21] & 3) + 1, {19, 20}, lambda b: (b >> 1) & 0x3F
    else:
        return None
    flags = []
    for p in packets:
        found = False
        if p.is_keyframe:  # only a keyframe can be an IDR frame; its NAL units are read, no other packet's
            data, j = bytes(p), 0
            while j + size < len(data):
                n = int.from_bytes(data[j: j + size], "big")
                if kind(data[j + size]) in idr_types:
                    found = True
                    break
                j += size + n
        flags.append(found)
    return flags


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
