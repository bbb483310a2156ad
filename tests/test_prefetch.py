"""Clips decoded while a fresh `mmla predict` imports and loads (mmla.prefetch): the guessed frame setting is the one
the run resolves to, a command with the child gives the same predictions as one without it, and the child goes on
until the decode pool first misses a clip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmla import inference
from mmla import video as V
from mmla.inputs import make_inputs
from mmla.models import load_model
from mmla.prefetch import guess_frames
from mmla.tiny import build_tiny_video_model
from test_decode import _root

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize("arch", ["qwen2-vl", "llava-onevision"])
@pytest.mark.parametrize("overrides", [{}, {"num_frames": 6, "max_pixels": 200 * 300}])
def test_the_guess_is_the_setting_the_run_resolves_to(arch, overrides, tmp_path):
    model_dir = build_tiny_video_model(arch, tmp_path / arch)
    cfg = inference.PredictConfig(model=str(model_dir), datasets=["MELD"], modality="video", **overrides)
    res = inference.resolved(inference.resolve(cfg))
    model, proc = load_model(str(model_dir), dtype="float32", modality="video")
    setting = V.frame_setting(inference.default_frames(res), **overrides)
    made = make_inputs(model, proc, setting, res.family).setting  # what the backend decodes with
    guess = guess_frames(cfg)
    assert guess is not None and guess.decode_key() == made.decode_key()
    # a text model, or a directory without a config, is not guessed (nothing is prefetched)
    assert guess_frames(inference.PredictConfig(model=str(tmp_path), modality="video")) is None


def test_a_fresh_command_decodes_clips_while_it_loads(videos_dir, tmp_path):
    model_dir = build_tiny_video_model("qwen2-vl", tmp_path / "model")
    root = _root(tmp_path / "data", videos_dir, clips=7)  # 2_7 has no clip, 2_8 a corrupt one

    def run(out: Path, *extra: str, **env) -> tuple[list[dict], dict]:
        cmd = [sys.executable, "-m", "mmla.cli", "predict", "--modality", "video", "--model", str(model_dir),
               "--data", str(root), "--datasets", "MELD", "--split", "test", "--batch-size", "2",
               "--max-new-tokens", "4", "--dtype", "float32", "--no-progress", "--out", str(out), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, env={
            **os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "MMLA_FRAME_CACHE": str(tmp_path / "cache"), **env})
        assert done.returncode == 0, done.stderr
        records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        return records, json.loads((out / "env.json").read_text())

    ahead, env = run(tmp_path / "ahead")
    # the child decoded some clips into the (empty) cache before the run started; the run found them there
    assert env["prefetched_clips"] >= 1 and env["frame_cache_hits"] >= 1
    assert env["frame_cache_hits"] + env["frame_cache_misses"] == 7
    plain, env = run(tmp_path / "plain", "--no-frame-cache", MMLA_PREFETCH="0")
    assert env["prefetched_clips"] is None
    by_id = {r["id"]: r for r in ahead}
    assert len(ahead) == 9 and by_id == {r["id"]: r for r in plain}  # the same records, clip errors included
    assert by_id["2_7"]["clip_error"].startswith("missing") and by_id["2_8"]["clip_error"].startswith("unreadable")


def test_the_child_goes_on_until_the_pools_first_miss(videos_dir, tmp_path):
    import multiprocessing

    from mmla.prefetch import Prefetch
    from test_video import REAL

    ctx = multiprocessing.get_context("fork")  # the stand-in child only waits to be told to stop

    def child() -> Prefetch:
        halt = ctx.Event()
        process = ctx.Process(target=halt.wait, daemon=True)
        process.start()
        return Prefetch(process, ctx.Value("i", 0), halt, V.frame_setting("official-infer"))

    cache = V.FrameCache(tmp_path / "cache")
    # another frame setting than the child's guess: the child stops at once, and the pool decodes as before
    wrong = child()
    wrong.hand_over(cache, V.frame_setting("official-infer", num_frames=6))
    assert wrong.halt.is_set() and cache.before_miss is None
    wrong.close()
    # the guessed setting: the child goes on while the pool finds hits; the first miss stops it and waits for it
    right = child()
    right.hand_over(cache, V.frame_setting("official-infer"))
    assert not right.halt.is_set() and cache.before_miss is not None
    frames = V.load_frames(videos_dir / REAL[1], V.frame_setting("official-infer"), cache)
    assert right.halt.is_set() and not right.process.is_alive() and cache.before_miss is None
    assert cache.misses == 1 and frames.array.shape[0] == 4
    assert right.close() == 0
