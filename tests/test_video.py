"""Clips, frame settings, decoding, the frame cache and `mmla check-data`: real demo clips and synthetic ones."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmla import video as V

REAL = ("llava_next_demo_xU25MMA2N4aVtYay.mp4", "videollama2_sample_demo_3.mp4", "videollama2_sample_demo_9.mp4")


def write_clip(path, n=8, w=64, h=48, fps=4, seed=0):
    """A small synthetic mp4 (mpeg4) written with PyAV; each frame differs."""
    import av

    rng = np.random.default_rng(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            arr = np.full((h, w, 3), (i * 29) % 255, np.uint8)
            arr[: h // 2, : w // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return Path(path)


def write_corrupt(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
    return Path(path)


# ---------------------------------------------------------------- settings


def test_named_settings_and_overrides():
    inf = V.frame_setting("official-infer")
    assert (inf.num_frames, inf.fps, inf.max_pixels) == (4, 1.0, 360 * 420)
    tr = V.frame_setting("official-train")
    assert (tr.num_frames, tr.fps, tr.min_frames, tr.max_frames, tr.even, tr.max_side) == (None, 2.0, 4, 50, True, 128)
    assert V.frame_setting("official-infer", num_frames=8).num_frames == 8
    fps = V.frame_setting("official-infer", fps=2)
    assert fps.num_frames is None and fps.fps == 2.0  # fps alone switches to fps sampling
    assert V.frame_setting("official-infer", max_pixels=1000).max_pixels == 1000
    assert V.frame_setting("official-infer").record()["name"] == "official-infer"
    with pytest.raises(ValueError, match="unknown frame setting"):
        V.frame_setting("nope")
    with pytest.raises(ValueError, match="num-frames"):
        V.frame_setting("official-infer", num_frames=0)


def test_sample_indices():
    inf, tr = V.FRAME_SETTINGS["official-infer"], V.FRAME_SETTINGS["official-train"]
    assert V.sample_indices(inf, 146, 6.09).tolist() == np.linspace(0, 145, 4).astype(int).tolist() == [0, 48, 96, 145]
    assert V.sample_indices(inf, 2, 0.1).tolist() == [0, 0, 0, 1]  # short clips repeat frames
    assert len(V.sample_indices(tr, 96, 3.2)) == 6  # floor(3.2 s x 2 fps)
    assert len(V.sample_indices(tr, 300, 1.0)) == 4  # at least 4
    assert len(V.sample_indices(tr, 3000, 100.0)) == 50  # at most 50
    assert len(V.sample_indices(tr, 150, 5.5)) == 10  # 11 rounded down to even
    with pytest.raises(V.ClipError):
        V.sample_indices(inf, 0, 0.0)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    for h, w in rng.integers(20, 2000, size=(300, 2)):
        for lo, hi in ((56 * 56, 360 * 420), (56 * 56, 12845056)):
            assert V.smart_resize(int(h), int(w), 28, lo, hi) == smart_resize(int(h), int(w), 28, lo, hi)


# ---------------------------------------------------------------- decoding + cache


def test_decode_real_clips_as_the_official_script(videos_dir):
    """4 frames at linspace(0, total-1, 4), resized (PIL bicubic) to the 151,200 px smart_resize size."""
    from PIL import Image
    from transformers.video_utils import load_video

    s = V.FRAME_SETTINGS["official-infer"]
    for name in REAL:
        fr = V.decode_frames(videos_dir / name, s)
        ref, meta = load_video(str(videos_dir / name), backend="pyav", num_frames=None,
                               sample_indices_fn=lambda metadata, **_: np.linspace(
                                   0, metadata.total_num_frames - 1, 4).astype(int))
        h, w = V.smart_resize(ref.shape[1], ref.shape[2], 28, 56 * 56, 360 * 420)
        ref = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in ref])
        assert fr.array.dtype == np.uint8 and fr.array.shape == ref.shape
        assert np.array_equal(fr.array, ref)
        assert fr.indices == np.linspace(0, meta.total_num_frames - 1, 4).astype(int).tolist()
        assert fr.array.shape[1] * fr.array.shape[2] <= 360 * 420 and fr.array.shape[1] % 28 == 0
    tr = V.decode_frames(videos_dir / REAL[1], V.FRAME_SETTINGS["official-train"])
    assert len(tr.indices) == 12 and max(tr.array.shape[1:3]) <= 140  # 6.09 s x 2 fps; 128 px then multiples of 28


def test_frame_cache(tmp_path, videos_dir):
    clip = shutil.copy(videos_dir / REAL[1], tmp_path / "c.mp4")
    cache = V.FrameCache(tmp_path / "cache")
    s = V.FRAME_SETTINGS["official-infer"]
    a = V.load_frames(clip, s, cache)
    b = V.load_frames(clip, s, cache)
    assert not a.cached and b.cached and (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(a.array, b.array) and a.indices == b.indices
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1
    # another setting, or a changed file (size/mtime), is another key
    V.load_frames(clip, V.frame_setting("official-infer", num_frames=2), cache)
    assert cache.misses == 2
    os.utime(clip, ns=(1, 1))
    assert not V.load_frames(clip, s, cache).cached
    # a torn cache file is decoded again
    for f in (tmp_path / "cache").rglob("*.npz"):
        f.write_bytes(b"torn")
    assert not V.load_frames(clip, s, cache).cached
    assert V.load_frames(clip, s, V.FrameCache(tmp_path / "off", enabled=False)).cached is False
    assert not (tmp_path / "off").exists()


def test_synthetic_missing_and_corrupt_clips(tmp_path):
    syn = write_clip(tmp_path / "s.mp4", n=8)
    fr = V.decode_frames(syn, V.FRAME_SETTINGS["official-infer"])
    assert fr.array.shape == (4, 56, 56, 3) and fr.indices == [0, 2, 4, 7] and fr.total_frames == 8
    assert len({fr.array[i].tobytes() for i in range(4)}) == 4
    with pytest.raises(V.ClipError, match="^unreadable"):
        V.load_frames(write_corrupt(tmp_path / "bad.mp4"), V.FRAME_SETTINGS["official-infer"])
    with pytest.raises(V.ClipError, match="^missing"):
        V.load_frames(tmp_path / "none.mp4", V.FRAME_SETTINGS["official-infer"])
    assert V.probe_clip(syn) is None and V.probe_clip(tmp_path / "bad.mp4").startswith("unreadable")
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- finding clips


def test_clip_names_spelling_variants():
    assert V.clip_names("MUStARD", "1_60") == ["MUStARD_1_60.mp4", "MUSTARD_1_60.mp4"]
    assert V.clip_names("MELD-DA", "3_4") == ["MELD-DA_3_4.mp4", "MELD_3_4.mp4"]
    assert V.clip_names("IEMOCAP-DA", "Ses01F_x") == ["IEMOCAP-DA_Ses01F_x.mp4", "IEMOCAP_Ses01F_x.mp4"]
    assert V.clip_names("Ch-sims", "csbgs2_0001") == ["Ch-sims_csbgs2_0001.mp4", "Ch-sims_csbdgs2_0001.mp4"]
    assert V.clip_names("Ch-sims", "csbdgs2_0001")[1] == "Ch-sims_csbgs2_0001.mp4"


def test_clip_finder(tmp_path):
    syn = write_clip(tmp_path / "src.mp4")
    for rel in ("MUStARD/video/MUSTARD_1_60.mp4", "MELD-DA/video/MELD_3_4.mp4", "Ch-sims/video/Ch-sims_csbdgs2_7.mp4",
                "MELD/video/MELD_1_1.mp4", "MELD/video/meld_2_2.MP4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(syn, tmp_path / rel)
    f = V.ClipFinder(tmp_path)
    assert f.find("MELD", "1_1").path.name == "MELD_1_1.mp4" and not f.find("MELD", "1_1").variant
    for ds, i, name in (("MUStARD", "1_60", "MUSTARD_1_60.mp4"), ("MELD-DA", "3_4", "MELD_3_4.mp4"),
                        ("Ch-sims", "csbgs2_7", "Ch-sims_csbdgs2_7.mp4"), ("MELD", "2_2", "meld_2_2.MP4")):
        c = f.find(ds, i)
        assert c.path is not None and c.path.name == name and c.variant, (ds, i)
    miss = f.find("MELD", "9_9")
    assert miss.path is None and miss.error.startswith("missing: none of MELD_9_9.mp4, MELD-DA_9_9.mp4")
    assert f.find("UR-FUNNY", "1").error.startswith("missing: no folder")
    # ids never reach outside the data root, also through a symlink
    outside = tmp_path.parent / f"{tmp_path.name}-outside.mp4"
    shutil.copy(syn, outside)
    (tmp_path / "MELD/video/MELD_link.mp4").symlink_to(outside)
    assert f.find("MELD", "link").error.startswith("refused")
    assert f.find("MELD", "x/../../../../etc/passwd").error.startswith("refused")


# ---------------------------------------------------------------- check-data


def _fake_root(tmp_path, videos_dir):
    root = tmp_path / "data"
    (root / "MELD" / "video").mkdir(parents=True)
    rows = [("1_1", "Hi there.", "joy"), ("1_2", "No way!", "surprise"), ("1_3", "Fine.", "neutral"),
            ("1_4", "Gone.", "sadness"), ("1_5", "Broken.", "anger")]
    (root / "MELD" / "test.tsv").write_text("id\ttext\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    shutil.copy(videos_dir / REAL[1], root / "MELD/video/MELD_1_1.mp4")
    shutil.copy(videos_dir / REAL[2], root / "MELD/video/MELD-DA_1_2.mp4")  # a spelling variant
    write_clip(root / "MELD/video/MELD_1_3.mp4")
    write_corrupt(root / "MELD/video/MELD_1_5.mp4")  # 1_4 has no clip
    return root


def test_check_data_cli(tmp_path, videos_dir):
    root = _fake_root(tmp_path, videos_dir)
    cmd = [sys.executable, "-m", "mmla.cli", "check-data", "--data", str(root), "--datasets", "MELD"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert r.returncode == 1, r.stderr
    assert "MELD test 1_4: missing: none of MELD_1_4.mp4" in r.stdout
    assert "MELD test 1_5: unreadable" in r.stdout
    assert "2 clip(s) missing or unreadable" in r.stdout
    rep = V.check_data(root, ["MELD"])
    e = rep["datasets"]["MELD"]
    assert (e["ids"], e["found"], e["variant_spelling"], len(e["missing"]), len(e["unreadable"])) == (5, 3, 1, 1, 1)
    full = V.check_data(root, ["MELD"], check="full", cache=V.FrameCache(tmp_path / "cache"))
    assert full["problems"] == 2 and len(list((tmp_path / "cache").rglob("*.npz"))) == 3  # fills the cache
    assert V.check_data(root, ["MELD"], check="exists")["problems"] == 1
    assert V.check_data(root, ["MOSI"])["datasets"]["MOSI"]["note"].startswith("no videos")
    with pytest.raises(ValueError, match="data root not found"):
        V.check_data(tmp_path / "nowhere", ["MELD"])


def test_official_samplers_of_the_other_paper_models():
    """VideoLLaMA2's segment centres and ms-swift's MiniCPM-V loader, on frame counts where rounding matters."""
    assert V.segment_indices(100, 8).tolist() == [6, 19, 31, 43, 56, 68, 80, 93]  # seg 12.375: round(6.1875) ...
    # seg 1: every centre is k + 0.5; np.round alone would round half to even (0, 2, 2, 4, ...), the +1e-6 lifts it
    assert V.segment_indices(9, 8).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert V.fps_gap_indices(90, 29.97).tolist() == [0, 30, 60]  # every round(fps)-th frame
    many = V.fps_gap_indices(30 * 100, 30.0)  # 100 s at 30 fps: 100 candidates, 64 kept
    assert len(many) == 64 and many[0] == 30 * int(100 / 64 / 2) and many[-1] == 30 * int(63 * 100 / 64 + 100 / 128)
    s = V.FRAME_SETTINGS["videollama2-infer"]
    assert V.sample_indices(s, 100, 4.0).tolist() == V.segment_indices(100, 8).tolist()
    assert V.sample_indices(V.FRAME_SETTINGS["minicpm-infer"], 90, 3.0, 29.97).tolist() == [0, 30, 60]
