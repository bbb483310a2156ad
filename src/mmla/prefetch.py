"""Clips read ahead of the model: at start-up in a child process, and during the run in chunks that join the batch.

At start-up (`Prefetch`). A fresh `mmla predict` on video spends its first seconds importing torch and transformers
and loading the model, on one core, holding the GIL. Those seconds are free for decoding on another core, but not
in a thread of the same process (a decode thread waits for the GIL between frames). So, before torch is imported,
the parent forks one child that decodes the run's clips, in row order, into the frame cache, and goes on until the
parent's own decode pool first meets a clip that is not there (`Prefetch.hand_over`). The parent finds the child's
clips as cache hits.

The child knows the frame setting before the model is loaded only by guessing it from the model directory's JSON
files (the resolver needs transformers' config classes, which is what is being waited for). A wrong guess costs
time, never results: the cache keys on the setting, so frames of another setting are simply not found.

Nothing is prefetched when it cannot help or could hurt: torch already imported (a library caller: forking a
process with torch's threads is unsafe, and the imports are not ahead anyway), the frame cache off, a data-parallel
rank (each rank decodes only its share), a served model, or no model directory to read.

During the run (`chunks_of`, `Stager`, `Arrivals`). Rows with clips go in chunks: the `Stager` queues the clips of
the next chunks on the decode pool (mmla.decode.DecodePool) while the current one is encoded, and `Arrivals` hands
each prepared chunk to the engine as soon as it is ready, so that its rows join the running batch (mmla.engine).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import video as video_mod
from .data import data_root, load_split
from .resolve import MODEL_FAMILIES
from .runs import PREDICTION_KEYS, read_jsonl
from .tasks import parse_datasets

_VISUAL = ("video", "av")


def guess_frames(cfg) -> video_mod.FrameSetting | None:
    """The frame setting the run will have (inference.default_frames with the user's overrides and the processor's
    patch x merge factor, as inputs.VideoInputs makes it), read from JSON files only; None when unsure."""
    model = Path(cfg.model)
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    mt = config.get("model_type")
    if cfg.modality == "auto" and not ("vision_config" in config or "thinker_config" in config):
        return None
    name = cfg.frames
    if name is None:
        rows = [r for r in MODEL_FAMILIES.values() if mt in r.model_types and r.modality == "video"]
        names = {(r.frames if r.official and cfg.protocol == "official" else None) or "official-infer" for r in rows}
        if len(names) > 1:
            return None
        name = names.pop() if names else "official-infer"
    try:
        setting = video_mod.frame_setting(name, num_frames=cfg.num_frames, fps=cfg.fps, max_pixels=cfg.max_pixels)
    except ValueError:
        return None
    factor = _factor(model)
    return video_mod.frame_setting(setting, factor=factor) if factor else setting


def _factor(model: Path) -> int | None:
    """The video processor's patch_size x merge_size, from the files AutoProcessor reads."""
    for name, key in (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None),
                      ("preprocessor_config.json", None)):
        try:
            d = json.loads((model / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        d = d.get(key, {}) if key else d
        if d.get("patch_size") and d.get("merge_size"):
            return int(d["patch_size"]) * int(d["merge_size"])
    return None


def _clips(cfg) -> list[Path]:
    """The run's clip paths in row order (rows already predicted left out), or [] when anything is unclear."""
    try:
        spec = cfg.datasets if len(cfg.datasets) != 1 else cfg.datasets[0]
        datasets = parse_datasets("video" if spec == "all" else spec)
        done = {(r["dataset"], r["split"], r["id"]) for r in
                read_jsonl(Path(cfg.out) / "predictions.jsonl", PREDICTION_KEYS)[0] if not r.get("clip_error")}
        root = data_root(cfg.data)
        finder = video_mod.ClipFinder(root)
        paths = []
        for ds in datasets:
            examples = load_split(root, ds, cfg.split, skip_bad_rows=True).examples
            for e in examples[: cfg.limit] if cfg.limit else examples:
                if (e.dataset, e.split, e.id) not in done:
                    clip = finder.find(e.dataset, e.id)
                    if clip.path is not None:
                        paths.append(clip.path)
        return paths
    except Exception:  # the parent reads the same data and says what is wrong with it, in one line
        return []


def _work(cfg, setting: video_mod.FrameSetting, count, halt) -> None:
    """The child: decode every clip of the run into the frame cache, quietly (the parent reports errors), until
    the parent's own decode pool starts, the parent is gone, or the clips are done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this child
    parent = os.getppid()
    try:
        from . import decode

        decode.decoder_name(announce=False)  # the parent says which decoder, once
        cache = video_mod.FrameCache()
        for path in _clips(cfg):
            if halt.is_set() or os.getppid() != parent:
                return
            try:
                video_mod.load_frames(path, setting, cache)
            except Exception:  # a bad clip: the parent meets it again and records it per row
                continue
            with count.get_lock():
                count.value += 1
    except Exception:  # whatever goes wrong here, the parent decodes the clips itself
        return


class Prefetch:
    """The child process (or nothing). `stop()` asks it to end after the clip in hand (no cache entry is left half
    written); `hand_over(cache, setting)` lets it go on until the decode pool meets the first clip it has not decoded;
    `close()` waits for it and says how many clips it decoded or found cached."""

    WAIT = 2.0  # seconds a decode worker waits for the child's clip in hand (a long clip is decoded again instead)

    def __init__(self, process=None, count=None, halt=None, setting: video_mod.FrameSetting | None = None):
        self.process, self.count, self.halt, self.setting = process, count, halt, setting
        self.done: int | None = None
        self._yielded = threading.Lock()

    @classmethod
    def start(cls, cfg) -> Prefetch:
        if ("torch" in sys.modules or cfg.no_frame_cache or cfg.modality not in (*_VISUAL, "auto")
                or cfg.backend != "local" or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
                or os.environ.get("MMLA_PREFETCH", "1") == "0" or "fork" not in multiprocessing.get_all_start_methods()):
            return cls()
        setting = guess_frames(cfg)
        if setting is None:
            return cls()
        ctx = multiprocessing.get_context("fork")
        count, halt = ctx.Value("i", 0), ctx.Event()
        process = ctx.Process(target=_work, args=(cfg, setting, count, halt), name="mmla-prefetch", daemon=True)
        process.start()
        return cls(process, count, halt, setting)

    def stop(self) -> None:
        if self.halt is not None:
            self.halt.set()

    def hand_over(self, cache: video_mod.FrameCache, setting: video_mod.FrameSetting | None) -> None:
        """The run starts. While the decode pool finds the child's clips in the cache, the child goes on decoding
        (the model alone would leave a core idle); at the pool's first miss, usually the clip the child has in hand,
        the child stops and that clip is awaited (at most `WAIT` seconds) rather than decoded twice. A wrong guess
        of the frame setting stops the child at once (nothing it decodes would be found)."""
        if self.process is None:
            return
        if setting is None or self.setting is None or setting.decode_key() != self.setting.decode_key():
            self.stop()
            return

        def first_miss() -> None:
            with self._yielded:  # decode workers miss at once: one waits, the others find it done
                cache.before_miss = None
                self.stop()
                if self.process is not None:
                    self.process.join(timeout=self.WAIT)

        cache.before_miss = first_miss

    def close(self) -> int | None:
        if self.process is None:
            return self.done
        self.stop()
        self.process.join(timeout=10)
        if self.process.is_alive():  # a very long clip in hand (the run failed early): its entry is not needed
            self.process.terminate()
            self.process.join()
        self.process, self.done = None, int(self.count.value)
        return self.done


# ---------------------------------------------------------------- during the run: chunks, staged and arriving


def chunks_of(cfg, n: int, video: bool, streaming: bool = False) -> list[list[int]]:
    """Text: one chunk. Video: a first chunk of one batch, so the model starts while the next chunk's clips decode,
    then chunks of four batches. Streaming (rows join a running batch as their chunk is ready): a first chunk of a
    quarter batch, so the model starts after a few clips, then chunks of one batch."""
    if streaming:
        sizes = [max(1, cfg.batch_size // 4)] + [cfg.batch_size] * n
    else:
        sizes = [n] if not video else [cfg.batch_size] + [cfg.batch_size * 4] * n
    chunks, start = [], 0
    for size in sizes:
        if start >= n:
            break
        chunks.append(list(range(start, min(start + size, n))))
        start += size
    return chunks


class Arrivals:
    """The prepared chunks, handed to the engine as each is ready (mmla.engine.Arrivals); chunk k+1 is prepared
    once chunk k is taken, so at most one prepared chunk waits outside the engine."""

    def __init__(self, submit, n: int, arrive):
        self.submit, self.n, self.arrive = submit, n, arrive
        self.k, self.waited = 0, 0.0  # waited: seconds the model stood idle for a chunk (not model time)
        self.pending = submit(0) if n else None

    def take(self, wait: bool):
        if self.k >= self.n:
            return None
        if not wait and not self.pending.done():
            return [], None
        t0 = time.perf_counter()
        p = self.pending.result()
        self.waited += time.perf_counter() - t0
        self.k += 1
        if self.k < self.n:
            self.pending = self.submit(self.k)
        return self.arrive(p)


class Stager:
    """The clips of the chunks ahead: found, and their frames queued on the decode pool (first in, first decoded).
    Only mmla.inference._run's prepare thread uses it."""

    def __init__(self, cfg, todo, load, cache, streaming: bool = False):
        from .decode import DecodePool

        self.todo, self.load, self.cache = todo, load, cache
        self.chunks = chunks_of(cfg, len(todo), True, streaming)
        self.finder = video_mod.ClipFinder(cfg.data)
        self.pool = DecodePool(cfg.decode_workers)
        self.staged: dict[int, list] = {}  # chunk -> its (clip, frames future or None)
        self.stage(0)
        if self.pool.parallel:
            self.stage(1)

    def stage(self, c: int) -> None:
        if c < len(self.chunks) and c not in self.staged:
            clips = [self.finder.find(self.todo[i][0].dataset, self.todo[i][0].id) for i in self.chunks[c]]
            self.staged[c] = [(clip, self.pool.submit(self.load, clip.path, self.cache)
                               if clip.path is not None else None) for clip in clips]

    def take(self, c: int) -> list:
        """Chunk c's clips and frame futures; the pool goes on with chunk c+1 while c is encoded and c-1 runs."""
        self.stage(c)
        if self.pool.parallel:
            self.stage(c + 1)
        return self.staged.pop(c)

    def close(self) -> None:
        self.pool.close()
