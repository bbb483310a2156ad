"""The decoders (TorchCodec, the fast PyAV reader and the official PyAV scan give the same frames), the decode pool
(the same predictions as the serial path, resume included) and the frame cache filled by two processes at once: real
clips, a tiny Qwen2-VL."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmla import decode
from mmla import video as V
from mmla.inference import PredictConfig, predict
from mmla.tiny import build_tiny_video_model
from test_video import REAL, write_clip, write_corrupt

SRC = Path(__file__).resolve().parents[1] / "src"


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


# ---------------------------------------------------------------- decoders


def test_torchcodec_and_pyav_give_the_same_frames(videos_dir, monkeypatch):
    problem = decode._torchcodec_problem()
    if problem is None:  # both decoders here: the same indices and pixels for the official samplers
        for setting in (V.FRAME_SETTINGS["official-infer"], V.FRAME_SETTINGS["official-train"]):
            for name in REAL:
                a = V.decode_frames(videos_dir / name, setting, decoder="torchcodec")
                b = V.decode_frames(videos_dir / name, setting, decoder="pyav")
                assert a.indices == b.indices and (a.total_frames, a.duration) == (b.total_frames, b.duration)
                assert a.array.shape == b.array.shape and np.array_equal(a.array, b.array), (name, setting.name)
        return
    # PyAV alone: the process says so in one line and decodes with PyAV
    code = ("from mmla import decode, video as V; import sys; "
            "fr = V.decode_frames(sys.argv[1], V.FRAME_SETTINGS['official-infer']); "
            "print(decode.decoder_name(), fr.indices)")
    done = subprocess.run([sys.executable, "-c", code, str(videos_dir / REAL[1])], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "pyav [0, 48, 96, 145]"
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("video decoder: PyAV (") and problem in lines[0], lines
    # asking for TorchCodec where it cannot run is a one-line error naming why
    monkeypatch.setenv("MMLA_VIDEO_DECODER", "torchcodec")
    monkeypatch.setattr(decode, "_choice", None)
    with pytest.raises(ValueError, match=r"^\$MMLA_VIDEO_DECODER=torchcodec, but torchcodec"):
        decode.decoder_name()


def _picker(setting: V.FrameSetting | None = None, fixed=None):
    """pick() as video.decode_frames builds it (or fixed indices, a function of the frame count); it records the
    metadata it was given, so that both readers can be seen to hand the sampler the same clip."""
    seen = []

    def pick(metadata, **_):
        seen.append((metadata.total_num_frames, metadata.fps, metadata.duration))
        total = int(metadata.total_num_frames)
        if fixed is not None:
            return np.asarray(fixed(total))
        return np.unique(V.sample_indices(setting, total, metadata.duration, metadata.fps))

    pick.seen = seen
    return pick


def _cases():
    """Every official sampler (linspace, segments, fps-gap, fps), 1 frame, every frame, the last frames."""
    cases = [(name, dict(setting=s)) for name, s in V.FRAME_SETTINGS.items()]
    cases += [("1 frame", dict(setting=V.frame_setting("official-infer", num_frames=1))),
              ("every frame", dict(fixed=lambda t: np.arange(t))),
              ("the last frame", dict(fixed=lambda t: np.array([t - 1]))),
              ("near the end", dict(fixed=lambda t: np.array([t - 5, t - 2, t - 1]))),
              ("either side of an IDR frame", dict(fixed=lambda t: np.array([t * 5 // 6, t - 6, t - 1])))]
    return cases


def test_fast_pyav_reader_gives_the_scans_frames(videos_dir):
    for name in REAL:
        path = str(videos_dir / name)
        for case, kw in _cases():
            fast_pick, scan_pick, stats = _picker(**kw), _picker(**kw), {}
            fast = decode.read_frames(path, fast_pick, "pyav", stats)
            scan = decode.read_frames(path, scan_pick, "scan")
            assert fast_pick.seen == scan_pick.seen, (name, case)  # the same metadata, hence the same indices
            assert stats["reader"] == "fast", (name, case, stats)
            assert fast.dtype == np.uint8 and fast.shape == scan.shape and np.array_equal(fast, scan), (name, case)
    # through decode_frames: the same indices, metadata and resized frames
    for name in REAL:
        for setting in (V.FRAME_SETTINGS["official-infer"],):
            a = V.decode_frames(videos_dir / name, setting, decoder="pyav")
            b = V.decode_frames(videos_dir / name, setting, decoder="scan")
            assert (a.indices, a.total_frames, a.video_fps, a.duration) == (
                b.indices, b.total_frames, b.video_fps, b.duration), (name, setting.name)
            assert np.array_equal(a.array, b.array), (name, setting.name)


def test_fast_pyav_reader_decodes_fewer_frames(videos_dir):
    for name in REAL:
        stats = {}
        pick = _picker(V.FRAME_SETTINGS["official-infer"])
        decode.read_frames(str(videos_dir / name), pick, "pyav", stats)
        total = pick.seen[0][0]
        # the scan decodes every frame up to the last sampled one, here the clip's last: all of them
        assert stats["reader"] == "fast" and 4 <= stats["decoded"] < total, (name, stats, total)
    # REAL[0] has IDR frames at display 80 and 90: a sampled frame after one is decoded from it, not from the
    # start (the frames equal the scan's: test_fast_pyav_reader_gives_the_scans_frames asks for these too)
    for fixed, at_most in (([95], 6), ([91, 94, 95], 6), ([85, 95], 6 + 11)):
        stats = {}
        decode.read_frames(str(videos_dir / REAL[0]), _picker(fixed=lambda t: np.array(fixed)), "pyav", stats)
        assert stats["reader"] == "fast" and stats["decoded"] <= at_most, (fixed, stats)
    # every frame asked: the fast reader decodes them all (skip_frame is switched back per packet)
    stats = {}
    decode.read_frames(str(videos_dir / REAL[2]), _picker(fixed=lambda t: np.arange(t)), "pyav", stats)
    assert stats == {"reader": "fast", "decoded": 219}


def write_duplicate_pts(path, n=8, w=64, h=48):
    """An mp4 (mpeg4) whose frames 2 and 3 carry the same pts: display order is not the pts ranks."""
    from fractions import Fraction

    import av

    enc = av.CodecContext.create("mpeg4", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base, enc.framerate = w, h, "yuv420p", Fraction(1, 4), Fraction(4)
    packets = []
    for i in range(n):
        f = av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 29 % 255, np.uint8), format="rgb24")
        f = f.reformat(format="yuv420p")
        f.pts = i
        packets += enc.encode(f)
    packets += enc.encode(None)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for k, p in enumerate(packets):
            p.stream, p.time_base, p.dts = s, Fraction(1, 4), k
            p.pts = k + (k == 2)
            c.mux(p)
    return path


def test_fast_pyav_reader_falls_back_to_the_scan(videos_dir, tmp_path):
    clip = str(write_duplicate_pts(tmp_path / "dup.mp4"))
    for kw in (dict(fixed=lambda t: np.arange(t)), dict(fixed=lambda t: np.array([1, 3, 5]))):
        stats = {}
        fast = decode.read_frames(clip, _picker(**kw), "pyav", stats)
        scan = decode.read_frames(clip, _picker(**kw), "scan")
        assert stats["reader"] == "scan" and stats["why"] == "duplicate pts"
        assert fast.shape == scan.shape and np.array_equal(fast, scan)
    # an index past the clip: the scan returns the frames it has, and so does the reader
    stats = {}
    fast = decode.read_frames(str(videos_dir / REAL[1]), _picker(fixed=lambda t: np.array([0, 50, t + 3])), "pyav",
                              stats)
    scan = decode.read_frames(str(videos_dir / REAL[1]), _picker(fixed=lambda t: np.array([0, 50, t + 3])), "scan")
    assert stats["reader"] == "scan" and stats["why"] == "a sampled index past the clip's frames"
    assert fast.shape[0] == 2 and np.array_equal(fast, scan)
    # a corrupt clip: the scan's own error
    bad = str(write_corrupt(tmp_path / "bad.mp4"))
    errors = []
    for reader in ("pyav", "scan"):
        with pytest.raises(Exception) as e:
            decode.read_frames(bad, _picker(V.FRAME_SETTINGS["official-infer"]), reader)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]
    with pytest.raises(ValueError, match="unknown video decoder 'decord'"):
        decode.read_frames(clip, _picker(V.FRAME_SETTINGS["official-infer"]), "decord")


def test_pool_sizes_and_errors():
    assert 1 <= decode.default_workers() <= decode.MAX_WORKERS
    with pytest.raises(ValueError, match="--decode-workers"):
        decode.DecodePool(0)
    with decode.DecodePool(1) as serial, decode.DecodePool(3) as pool:
        assert not serial.parallel and pool.parallel
        assert [f.result() for f in [pool.submit(pow, 2, k) for k in range(6)]] == [1, 2, 4, 8, 16, 32]
        failed = serial.submit(V.load_frames, "/nonexistent.mp4", V.FRAME_SETTINGS["official-infer"])
        with pytest.raises(V.ClipError, match="^missing"):
            failed.result()


# ---------------------------------------------------------------- the pool in mmla predict


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return build_tiny_video_model("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


def _root(r: Path, videos_dir: Path, clips: int = 9) -> Path:
    """MELD test: `clips` rows whose clips are copies of the 3 real clips, then one row with no clip (2_{clips})
    and one with a corrupt clip (2_{clips+1})."""
    v = r / "MELD" / "video"
    v.mkdir(parents=True)
    rows = [(f"2_{i}", f"Line number {i}.", "neutral") for i in range(clips + 2)]
    (r / "MELD" / "test.tsv").write_text("id\ttext\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    for i in range(clips):
        shutil.copy(videos_dir / REAL[i % 3], v / f"MELD_2_{i}.mp4")
    write_corrupt(v / f"MELD_2_{clips + 1}.mp4")
    return r


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_pool_predicts_as_the_serial_path_resume_included(tiny_vl, videos_dir, tmp_path, capsys):
    root = _root(tmp_path / "data", videos_dir)
    base = dict(model=str(tiny_vl), data=str(root), datasets=["MELD"], max_new_tokens=6, batch_size=1,
                device="cpu", dtype="float32")  # batch 1: chunks of 1, 4, 4, 2 rows, so the pool runs ahead

    def run(out, workers, cache, **kw):
        return predict(PredictConfig(**{**base, "out": str(out), "decode_workers": workers, **kw}), progress=False,
                       frame_cache=V.FrameCache(cache))

    serial = run(tmp_path / "serial", 1, tmp_path / "fc-serial")
    pooled = run(tmp_path / "pool", 3, tmp_path / "fc-pool")
    a, b = _records(tmp_path / "serial"), _records(tmp_path / "pool")
    assert len(a) == 11 and a == b  # the same records, in the same order
    assert serial == pooled
    by_id = {r["id"]: r for r in b}
    assert by_id["2_9"]["clip_error"].startswith("missing") and by_id["2_10"]["clip_error"].startswith("unreadable")
    assert all(by_id[f"2_{i}"]["output"] and "clip_error" not in by_id[f"2_{i}"] for i in range(9))
    env = json.loads((tmp_path / "pool" / "env.json").read_text())
    assert env["decode_workers"] == 3 and env["video_decoder"] in decode.DECODERS
    assert env["frame_cache_misses"] == 9 and env["frame_cache_hits"] == 0
    assert json.loads((tmp_path / "serial" / "env.json").read_text())["decode_workers"] == 1

    # resume under the pool: the first 5 rows, then the whole split into the same run directory
    run(tmp_path / "resumed", 3, tmp_path / "fc-resume", limit=5)
    capsys.readouterr()
    run(tmp_path / "resumed", 3, tmp_path / "fc-resume")
    assert "resuming: 5 of 11 done, 6 to go" in capsys.readouterr().err
    c = _records(tmp_path / "resumed")
    assert len(c) == 11 and {r["id"]: r for r in c} == {r["id"]: r for r in a}
    assert json.loads((tmp_path / "resumed" / "env.json").read_text())["frame_cache_misses"] == 4  # rows 5-8
    with pytest.raises(ValueError, match="--decode-workers"):
        run(tmp_path / "bad", 0, tmp_path / "fc-bad")


# ---------------------------------------------------------------- one cache, two processes


FILL = """
import sys, time
from pathlib import Path
from mmla import decode, video as V
go, cache, clips = Path(sys.argv[1]), V.FrameCache(sys.argv[2]), sys.argv[3:]
while not go.exists():
    time.sleep(0.005)
with decode.DecodePool(2) as pool:
    jobs = [pool.submit(V.load_frames, c, s, cache) for s in (V.FRAME_SETTINGS["official-infer"],
            V.frame_setting("official-infer", num_frames=2)) for c in clips]
    print(sum(1 for j in jobs if j.result().array.ndim == 4))
"""


def test_two_processes_fill_one_frame_cache(videos_dir, tmp_path):
    clips = [str(shutil.copy(videos_dir / n, tmp_path / n)) for n in REAL] + [str(write_clip(tmp_path / "s.mp4"))]
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", FILL, str(go), str(cache), *clips], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1.0)  # both are waiting at the start line
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert [o[0].strip() for o in outs] == ["8", "8"]
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".npz")]  # no torn temporaries
    entries = list(cache.rglob("*.npz"))
    assert len(entries) == 8
    fresh = V.FrameCache(cache)
    for s in (V.FRAME_SETTINGS["official-infer"], V.frame_setting("official-infer", num_frames=2)):
        for c in clips:
            hit = fresh.get(Path(c), s)
            ref = V.decode_frames(c, s)
            assert hit is not None and hit.indices == ref.indices and np.array_equal(hit.array, ref.array)
