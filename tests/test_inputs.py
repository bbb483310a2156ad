"""The modality seam with tiny random-init video-LLMs loaded through transformers' Auto classes: inputs as the
processor builds them, batched continuous greedy == model.generate one at a time, scoring == full forwards, and
`mmla predict` on video (run directory, resume, missing/corrupt clips, spelling variants)."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from mmla import engine
from mmla import video as V
from mmla.inference import PredictConfig, predict
from mmla.inputs import VideoInputs, make_inputs
from mmla.models import load_model
from mmla.prompts import Decoding, candidates, render
from mmla.resolve import MODEL_FAMILIES, clean_output
from mmla.tiny import TINY_VIDEO_ARCHS, build_tiny_video_model
from test_video import REAL, write_clip, write_corrupt


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return build_tiny_video_model("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def loaded(tiny_vl):
    model, proc = load_model(str(tiny_vl), device="cpu", modality="video")
    return model, proc, make_inputs(model, proc, V.FRAME_SETTINGS["official-infer"])


@pytest.fixture(scope="module")
def frames(videos_dir, tmp_path_factory, loaded):
    """Frames of the 3 real clips and two synthetic clips (different sizes, so batches are left-padded)."""
    inputs = loaded[2]
    d = tmp_path_factory.mktemp("syn")
    syn = [write_clip(d / "a.mp4", n=12, w=96, h=64), write_clip(d / "b.mp4", n=8, w=64, h=48, seed=1)]
    return [V.load_frames(p, inputs.setting) for p in [videos_dir / n for n in REAL] + syn]


@pytest.fixture
def root(tmp_path, videos_dir):
    """A fake release: MELD test (2 real clips, one under a variant name, 1 synthetic, 1 missing, 1 corrupt),
    MUStARD test with MUSTARD_ names."""
    r = tmp_path / "data"
    v = r / "MELD" / "video"
    test = [("1_1", "Hi there.", "joy"), ("1_2", "No way!", "surprise"), ("1_3", "Fine.", "neutral"),
            ("1_4", "Gone.", "sadness"), ("1_5", "Broken.", "anger")]
    v.mkdir(parents=True)
    (r / "MELD" / "test.tsv").write_text("id\ttext\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in test))
    shutil.copy(videos_dir / REAL[1], v / "MELD_1_1.mp4")
    shutil.copy(videos_dir / REAL[2], v / "MELD-DA_1_2.mp4")
    write_clip(v / "MELD_1_3.mp4", seed=3)
    write_corrupt(v / "MELD_1_5.mp4")
    (r / "MUStARD" / "video").mkdir(parents=True)
    (r / "MUStARD" / "test.tsv").write_text("id\ttext\tlabel\n1_60\tOh, sure.\tsarcastic\n2_10\tThanks.\tsincere\n")
    write_clip(r / "MUStARD/video/MUSTARD_1_60.mp4", seed=5)
    shutil.copy(videos_dir / REAL[0], r / "MUStARD/video/MUStARD_2_10.mp4")
    return r


def _reference_generate(model, inputs, row, **kw):
    """transformers' generate on one row, as the official one-at-a-time loop runs it."""
    ids = torch.tensor([row.ids])
    extra = {k: torch.tensor([v]) for k, v in row.tokens.items()}
    with torch.inference_mode():
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           **inputs.forward_kwargs({**row.media, **extra}), **kw)
    return inputs.tokenizer.decode(g[0, ids.shape[1]:], skip_special_tokens=True)


def test_inputs_are_what_the_processor_builds(loaded, frames):
    model, proc, inputs = loaded
    assert isinstance(inputs, VideoInputs) and inputs.rope_dims == 3
    prompts = [render("MELD", "infer_script", "Hi there.", "test", "video"),
               render("MELD", "llamafactory_video", "Hi there.", "dev", "video")]
    assert prompts[1].startswith("<video>")
    texts = inputs.chat(prompts, "official")
    for t in texts:  # the tag becomes the vision tokens, never text
        assert t.count("<|video_pad|>") == 1 and "<video>" not in t
        assert "<|vision_start|><|video_pad|><|vision_end|>You are presented" in t
    rows = inputs.encode(texts, frames[:2])
    ref = proc(text=texts, videos=[f.array for f in frames[:2]], padding=True, return_tensors="pt",
               add_special_tokens=False, videos_kwargs=dict(do_resize=False, cap_pixels_per_frame=False))
    ids, _ = engine._left_pad([r.ids for r in rows], inputs.pad_id, "cpu")
    assert torch.equal(ref["input_ids"], ids)
    media = inputs.media_kwargs(rows, "cpu")
    for k in ("pixel_values_videos", "video_grid_thw"):
        assert torch.equal(ref[k], media[k]), k
    tokens = inputs.token_kwargs(ids, [r.tokens for r in rows], ids.shape[1], "cpu")
    assert torch.equal(ref["mm_token_type_ids"], tokens["mm_token_type_ids"])
    with pytest.raises(ValueError, match="one <video> tag"):
        inputs.messages("<video><video>x", "clean")


@pytest.mark.parametrize("penalty", [None, 1.05])
def test_batched_greedy_equals_generate_one_at_a_time(loaded, frames, penalty):
    model, proc, inputs = loaded
    texts = inputs.chat([render("MELD", "infer_script", t, "test", "video")
                         for t in ("Hi.", "What is going on here, seriously?", "Okay then.", "No!")], "official")
    rows = inputs.encode(texts, frames[1:])
    assert len({len(r.ids) for r in rows}) == 4  # left padding is exercised
    ref = [_reference_generate(model, inputs, r, max_new_tokens=10, repetition_penalty=penalty) for r in rows]
    for batch_size in (2, 4):  # batch 2 on 4 rows: rows leave at EOS and the next ones join the running batch
        got = engine.generate(model, inputs, rows, batch_size=batch_size,
                              decoding=Decoding(max_new_tokens=10, repetition_penalty=penalty))
        assert got == ref


def test_score_equals_full_forward(loaded, frames):
    model, proc, inputs = loaded
    cands = candidates("MELD-DA", "clean", "test", "video")  # statement-opinion / statement-non-opinion: 2nd pass
    texts = inputs.chat([render("MELD-DA", "clean", t, "test", "video") for t in ("Yes.", "Where to?")], "clean")
    fr = frames[3:]
    res = engine.score(model, inputs, inputs.score_rows(texts, [cands] * 2, fr), batch_size=2)
    for t, f, got in zip(texts, fr, res):
        head, _ = inputs.score_rows([t], [cands], [f])[0]
        ref = []
        for c in cands:
            full = inputs.encode([t + c], [f])[0]
            n = len(full.ids) - len(head.ids)
            ids = torch.tensor([full.ids])
            extra = {k: torch.tensor([v]) for k, v in full.tokens.items()}
            with torch.inference_mode():
                lp = model(input_ids=ids, **inputs.forward_kwargs({**full.media, **extra})).logits[0].float()
            lp = lp.log_softmax(-1)
            L = len(full.ids)
            ref.append(sum(lp[L - n - 1 + j, full.ids[L - n + j]].item() for j in range(n)))
        assert np.allclose(got.scores, ref, atol=1e-4) and got.best == int(np.argmax(ref))


# ---------------------------------------------------------------- mmla predict on video


def _cfg(model, root, out, **kw):
    base = dict(model=str(model), data=str(root), datasets=["MELD"], max_new_tokens=6, batch_size=2,
                device="cpu", out=str(out))
    return PredictConfig(**{**base, **kw})


def _lines(p):
    return [json.loads(line) for line in p.read_text().splitlines()]


def test_predict_video_end_to_end(tiny_vl, root, tmp_path, capsys):
    cache = lambda: V.FrameCache(tmp_path / "frame-cache")  # noqa: E731  a fresh object: per-call hit counts
    out = tmp_path / "run"
    res = predict(_cfg(tiny_vl, root, out), progress=False, frame_cache=cache())  # modality: auto -> video
    recs = {r["id"]: r for r in _lines(out / "predictions.jsonl")}
    assert set(recs) == {"1_1", "1_2", "1_3", "1_4", "1_5"}
    assert recs["1_1"]["video"] == "MELD/video/MELD_1_1.mp4" and recs["1_2"]["video"] == "MELD/video/MELD-DA_1_2.mp4"
    assert recs["1_4"]["clip_error"].startswith("missing") and recs["1_4"]["output"] == ""
    assert recs["1_4"]["video"] is None
    assert recs["1_5"]["clip_error"].startswith("unreadable") and recs["1_5"]["output"] == ""
    assert all("clip_error" not in recs[i] and recs[i]["output"] for i in ("1_1", "1_2", "1_3"))
    assert recs["1_1"]["prompt"].startswith("You are presented with a video in which the speaker says: Hi there.. ")
    assert res["missing_clips"] == 2 and res["missing_clips_per_dataset"] == {"MELD": 2}
    assert res["per_dataset"]["MELD"]["n"] == 5
    metrics = json.loads((out / "metrics.json").read_text())
    env = json.loads((out / "env.json").read_text())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert metrics["missing_clips"] == env["missing_clips"] == 2
    assert env["frame_setting"]["name"] == cfg["frame_setting"]["name"] == "official-infer"
    assert cfg["frame_setting"]["num_frames"] == 4 and cfg["modality"] == "video" and cfg["max_new_tokens"] == 6
    assert env["frame_cache_misses"] == 3
    assert env["decoding"]["repetition_penalty"] is None  # the tiny model's generation config has none

    # resume: finished samples are kept, the two bad clips are tried again; a fixed clip is picked up
    write_clip(root / "MELD/video/MELD_1_4.mp4", seed=4)
    capsys.readouterr()
    res2 = predict(_cfg(tiny_vl, root, out), progress=False, frame_cache=cache())
    assert "resuming: 3 of 5 done, 2 to go (2 missing clips retried)" in capsys.readouterr().err
    recs2 = {r["id"]: r for r in _lines(out / "predictions.jsonl")}
    assert len(_lines(out / "predictions.jsonl")) == 5
    assert all(recs2[i] == recs[i] for i in ("1_1", "1_2", "1_3"))
    assert recs2["1_4"]["output"] and res2["missing_clips"] == 1
    assert json.loads((out / "env.json").read_text())["frame_cache_misses"] == 1  # only the new clip was decoded

    # another run reads every frame from the cache and gives the same outputs, one row at a time too
    res3 = predict(_cfg(tiny_vl, root, tmp_path / "again", batch_size=1), progress=False, frame_cache=cache())
    assert json.loads((tmp_path / "again" / "env.json").read_text())["frame_cache_hits"] == 4
    assert {r["id"]: r["output"] for r in _lines(tmp_path / "again" / "predictions.jsonl")} == \
        {i: r["output"] for i, r in recs2.items()}
    assert res3 == res2
    # a different frame setting refuses to resume into the same directory
    with pytest.raises(ValueError, match="num_frames"):
        predict(_cfg(tiny_vl, root, out, num_frames=2), progress=False, frame_cache=cache())


def test_predict_video_score_mode_and_datasets(tiny_vl, root, tmp_path):
    out = tmp_path / "score"
    res = predict(_cfg(tiny_vl, root, out, mode="score", protocol="clean", datasets=["MELD,MUStARD"],
                       modality="video"), progress=False, frame_cache=V.FrameCache(tmp_path / "fc"))
    recs = _lines(out / "predictions.jsonl")
    ok = [r for r in recs if "clip_error" not in r]
    assert len(recs) == 7 and len(ok) == 5
    assert all(r["output"] in candidates(r["dataset"], "clean", "test", "video") for r in ok)
    assert {r["video"] for r in recs if r["dataset"] == "MUStARD"} == {"MUStARD/video/MUSTARD_1_60.mp4",
                                                                        "MUStARD/video/MUStARD_2_10.mp4"}
    assert res["per_dataset"]["MUStARD"]["unparsed"] == 0.0 and res["missing_clips"] == 2
    with pytest.raises(ValueError, match="no videos are released for MOSI"):
        predict(_cfg(tiny_vl, root, tmp_path / "x", datasets=["MOSI"]), progress=False)
    with pytest.raises(ValueError, match="cannot take video"):
        from mmla.tiny import build_tiny_model

        text_model = build_tiny_model("llama", tmp_path / "tiny-text")
        predict(_cfg(text_model, root, tmp_path / "y", modality="video"), progress=False)


@pytest.mark.parametrize("arch", TINY_VIDEO_ARCHS)
def test_every_video_architecture_through_mmla_predict(arch, root, tmp_path):
    """No code per model: each architecture runs `mmla predict` (generate and score) on real and synthetic clips,
    and the continuously batched outputs equal transformers' generate one clip at a time."""
    from mmla import cli

    path = build_tiny_video_model(arch, tmp_path / arch)
    base = ["predict", "--modality", "video", "--model", str(path), "--data", str(root), "--datasets",
            "MELD,MUStARD", "--split", "test", "--max-new-tokens", "5", "--batch-size", "2", "--no-progress"]
    assert cli.main(base + ["--mode", "generate", "--out", str(tmp_path / "gen")]) == 0
    recs = [r for r in _lines(tmp_path / "gen" / "predictions.jsonl") if "clip_error" not in r]
    assert len(recs) == 5
    model, proc = load_model(str(path), device="cpu", modality="video")
    # the run's own setting: its family's official frames, or the clean protocol where the paper has no row
    env = json.loads((tmp_path / "gen" / "env.json").read_text())
    setting = V.FrameSetting(**env["frame_setting"])
    inputs = make_inputs(model, proc, setting, MODEL_FAMILIES.get(env["model_family"]))
    inputs.time_from_clip = env["protocol_applied"] == "clean"
    if arch == "llava-onevision":
        assert env["model_family"] == "llava-onevision" and setting.name == "llava-infer"
    for r in recs:
        row = inputs.encode(inputs.chat([r["prompt"]], env["protocol_applied"]),
                            [V.load_frames(root / r["video"], inputs.setting)])
        ref = _reference_generate(model, inputs, row[0], max_new_tokens=5)
        assert r["output"] == clean_output(inputs.row, env["protocol_applied"], ref), r["id"]
    assert cli.main(base + ["--mode", "score", "--protocol", "clean", "--out", str(tmp_path / "score")]) == 0
    scored = [r for r in _lines(tmp_path / "score" / "predictions.jsonl") if "clip_error" not in r]
    assert len(scored) == 5
    assert all(r["output"] in candidates(r["dataset"], "clean", "test", "video") for r in scored)
    if arch == "qwen2-vl":  # the same command typed again resumes: nothing to do, the same metrics
        metrics = (tmp_path / "gen" / "metrics.json").read_text()
        assert cli.main(base + ["--mode", "generate", "--out", str(tmp_path / "gen")]) == 0
        assert (tmp_path / "gen" / "metrics.json").read_text() == metrics
        assert len(_lines(tmp_path / "gen" / "predictions.jsonl")) == 7
