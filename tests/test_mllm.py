"""Qwen2-VL / Qwen2.5-VL end to end with tiny random-init models and a processor assembled in code:
inputs as the processor builds them, batched greedy = model.generate one at a time, scoring = full forwards,
`predict_video` (run directory, resume, missing/corrupt clips), LoRA SFT, predict with the adapter."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from mmla import mllm
from mmla import video as V
from mmla.prompts import Decoding, candidates, render
from test_video import REAL, write_clip, write_corrupt


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return mllm.build_tiny_mllm("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def loaded(tiny_vl):
    return mllm.load_mllm(str(tiny_vl), device="cpu")


@pytest.fixture(scope="module")
def frames(videos_dir, tmp_path_factory, loaded):
    """Frames of the 3 real clips and two synthetic clips (different sizes, so batches are left-padded)."""
    _, proc = loaded
    s = mllm.frame_setting_for(proc, V.SETTINGS["official-infer"])
    d = tmp_path_factory.mktemp("syn")
    syn = [write_clip(d / "a.mp4", n=12, w=96, h=64), write_clip(d / "b.mp4", n=8, w=64, h=48, seed=1)]
    return s, [V.load_frames(p, s).array for p in [videos_dir / n for n in REAL] + syn]


@pytest.fixture
def root(tmp_path, videos_dir):
    """A fake release: MELD test (2 real clips, one under a variant name, 1 synthetic, 1 missing, 1 corrupt),
    MELD train/dev with synthetic clips, MUStARD test with MUSTARD_ names."""
    r = tmp_path / "data"
    v = r / "MELD" / "video"
    test = [("1_1", "Hi there.", "joy"), ("1_2", "No way!", "surprise"), ("1_3", "Fine.", "neutral"),
            ("1_4", "Gone.", "sadness"), ("1_5", "Broken.", "anger")]
    train = [(f"9_{i}", t, l) for i, (t, l) in enumerate(
        [("Great!", "joy"), ("Oh no.", "sadness"), ("What?", "surprise"), ("Okay.", "neutral")])]
    dev = [("8_0", "Wow.", "surprise"), ("8_1", "Sure.", "neutral")]
    for split, rows in (("test", test), ("train", train), ("dev", dev)):
        (r / "MELD").mkdir(parents=True, exist_ok=True)
        (r / "MELD" / f"{split}.tsv").write_text("id\ttext\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    v.mkdir(parents=True)
    shutil.copy(videos_dir / REAL[1], v / "MELD_1_1.mp4")
    shutil.copy(videos_dir / REAL[2], v / "MELD-DA_1_2.mp4")
    write_clip(v / "MELD_1_3.mp4", seed=3)
    write_corrupt(v / "MELD_1_5.mp4")
    for k, (i, _, _) in enumerate(train + dev):
        write_clip(v / f"MELD_{i}.mp4", seed=10 + k)
    (r / "MUStARD" / "video").mkdir(parents=True)
    (r / "MUStARD" / "test.tsv").write_text("id\ttext\tlabel\n1_60\tOh, sure.\tsarcastic\n2_10\tThanks.\tsincere\n")
    write_clip(r / "MUStARD/video/MUSTARD_1_60.mp4", seed=5)
    shutil.copy(videos_dir / REAL[0], r / "MUStARD/video/MUStARD_2_10.mp4")
    return r


def _reference_generate(model, proc, item, **kw):
    b = mllm.left_pad_batch([item], proc.tokenizer.pad_token_id, proc.video_token_id, "cpu")
    if "second_per_grid_ts" not in mllm.inspect.signature(model.forward).parameters:
        b.pop("second_per_grid_ts")
    with torch.inference_mode():
        g = model.generate(**b, do_sample=False, **kw)
    return proc.tokenizer.decode(g[0, b["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------- inputs


def test_inputs_are_what_the_processor_builds(loaded, frames):
    model, proc = loaded
    s, fr = frames
    prompts = [render("MELD", "infer_script", "Hi there.", "test", "video"),
               render("MELD", "llamafactory_video", "Hi there.", "dev", "video")]
    assert prompts[1].startswith("<video>")
    texts = [mllm.chat_text(proc, p) for p in prompts]
    for t in texts:  # the tag becomes the vision tokens, never text
        assert t.count("<|video_pad|>") == 1 and "<video>" not in t
        assert "<|vision_start|><|video_pad|><|vision_end|>You are presented" in t
    assert mllm.video_messages(prompts[1])[0]["content"][0] == {"type": "video"}
    items = [mllm.encode(proc, ids, f, s) for ids, f in zip(mllm.tokenize(proc, texts), fr[:2])]
    ref = proc(text=texts, videos=fr[:2], padding=True, return_tensors="pt", add_special_tokens=False,
               videos_kwargs=dict(do_resize=False, cap_pixels_per_frame=False))
    ours = mllm.left_pad_batch(items, proc.tokenizer.pad_token_id, proc.video_token_id, "cpu")
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(ref[k], ours[k]), k
    with pytest.raises(ValueError, match="one <video> tag"):
        mllm.video_messages("<video><video>x")


# ---------------------------------------------------------------- generate and score


@pytest.mark.parametrize("penalty", [None, 1.05])
def test_batched_greedy_equals_generate_one_at_a_time(loaded, frames, penalty):
    model, proc = loaded
    s, fr = frames
    texts = [mllm.chat_text(proc, render("MELD", "infer_script", t, "test", "video"))
             for t in ("Hi.", "What is going on here, seriously?", "Okay then.", "No!")]
    items = [mllm.encode(proc, ids, f, s) for ids, f in zip(mllm.tokenize(proc, texts), fr[1:])]
    assert len({len(it.ids) for it in items}) == 4  # left padding is exercised
    ours = mllm.generate_batch(model, proc, items, Decoding(max_new_tokens=10, repetition_penalty=penalty))
    ref = [_reference_generate(model, proc, it, max_new_tokens=10, repetition_penalty=penalty) for it in items]
    assert ours == ref


def test_score_equals_full_forward(loaded, frames):
    model, proc = loaded
    s, fr = frames
    cands = candidates("MELD-DA", "clean", "test", "video")  # statement-opinion / statement-non-opinion: 2nd pass
    texts = [mllm.chat_text(proc, render("MELD-DA", "clean", t, "test", "video")) for t in ("Yes.", "Where to?")]
    items, rests = [], []
    for t, f in zip(texts, fr[3:]):
        ids, r = mllm.score_prefix(proc, t, cands)
        items.append(mllm.encode(proc, ids, f, s))
        rests.append(r)
    res = mllm.score_batch(model, proc, items, rests)
    for t, f, got in zip(texts, fr[3:], res):
        ref = []
        for c in cands:
            pre, _ = mllm.score_prefix(proc, t, cands)
            full = mllm.encode(proc, mllm.tokenize(proc, [t + c])[0], f, s)
            n = len(mllm.tokenize(proc, [t + c])[0]) - len(pre)
            b = mllm.left_pad_batch([full], proc.tokenizer.pad_token_id, proc.video_token_id, "cpu")
            b.pop("second_per_grid_ts")
            with torch.inference_mode():
                lp = model(**b).logits[0].float().log_softmax(-1)
            L = len(full.ids)
            ref.append(sum(lp[L - n - 1 + j, full.ids[L - n + j]].item() for j in range(n)))
        assert np.allclose(got.scores, ref, atol=1e-4) and got.best == int(np.argmax(ref))


# ---------------------------------------------------------------- predict_video


def _fc(tmp_path):
    """A frame cache of its own (a fresh object, so its hit/miss counts are per call)."""
    return V.FrameCache(tmp_path / "frame-cache")


def _predict(cfg, tmp_path):
    return mllm.predict_video(cfg, progress=False, frame_cache=_fc(tmp_path))


def _cfg(model, root, out, **kw):
    base = dict(model=str(model), data=str(root), datasets=["MELD"], max_new_tokens=6, batch_size=2,
                device="cpu", out=str(out))
    return mllm.VideoPredictConfig(**{**base, **kw})


def _lines(p):
    return [json.loads(l) for l in p.read_text().splitlines()]


def test_predict_video_end_to_end(tiny_vl, root, tmp_path, capsys):
    out = tmp_path / "run"
    res = _predict(_cfg(tiny_vl, root, out), tmp_path)
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

    # resume: finished samples are kept, the two bad clips are tried again; a fixed clip is picked up
    write_clip(root / "MELD/video/MELD_1_4.mp4", seed=4)
    capsys.readouterr()
    res2 = _predict(_cfg(tiny_vl, root, out), tmp_path)
    assert "resuming: 3 of 5 done, 2 to go (2 missing clips retried)" in capsys.readouterr().err
    recs2 = {r["id"]: r for r in _lines(out / "predictions.jsonl")}
    assert len(_lines(out / "predictions.jsonl")) == 5
    assert all(recs2[i] == recs[i] for i in ("1_1", "1_2", "1_3"))
    assert recs2["1_4"]["output"] and res2["missing_clips"] == 1
    env2 = json.loads((out / "env.json").read_text())
    assert env2["frame_cache_misses"] == 1  # only the new clip was decoded

    # another run reads every frame from the cache and gives the same outputs
    res3 = _predict(_cfg(tiny_vl, root, tmp_path / "again"), tmp_path)
    assert json.loads((tmp_path / "again" / "env.json").read_text())["frame_cache_hits"] == 4
    assert {r["id"]: r["output"] for r in _lines(tmp_path / "again" / "predictions.jsonl")} == \
        {i: r["output"] for i, r in recs2.items()}
    assert res3 == res2
    # a different frame setting refuses to resume into the same directory
    with pytest.raises(ValueError, match="frame setting"):
        _predict(_cfg(tiny_vl, root, out, num_frames=2), tmp_path)


def test_predict_video_score_mode_and_datasets(tiny_vl, root, tmp_path):
    out = tmp_path / "score"
    res = _predict(_cfg(tiny_vl, root, out, mode="score", protocol="clean", datasets=["MELD,MUStARD"]), tmp_path)
    recs = _lines(out / "predictions.jsonl")
    ok = [r for r in recs if "clip_error" not in r]
    assert len(recs) == 7 and len(ok) == 5
    assert all(r["output"] in candidates(r["dataset"], "clean", "test", "video") for r in ok)
    assert {r["video"] for r in recs if r["dataset"] == "MUStARD"} == {"MUStARD/video/MUSTARD_1_60.mp4",
                                                                        "MUStARD/video/MUStARD_2_10.mp4"}
    assert res["per_dataset"]["MUStARD"]["unparsed"] == 0.0 and res["missing_clips"] == 2
    # a plain PredictConfig with modality="video" (what `mmla predict --modality video` builds) works too
    from mmla.inference import PredictConfig

    plain = PredictConfig(model=str(tiny_vl), data=str(root), datasets=["MUStARD"], mode="score", modality="video",
                          device="cpu", out=str(tmp_path / "plain"))
    assert _predict(plain, tmp_path)["per_dataset"]["MUStARD"]["n"] == 2
    assert yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["frame_setting"]["name"] == "official-infer"
    with pytest.raises(ValueError, match="no videos are released for MOSI"):
        mllm.predict_video(_cfg(tiny_vl, root, tmp_path / "x", datasets=["MOSI"]), tmp_path)
    assert mllm._resolve_video_cfg(_cfg(tiny_vl, root, tmp_path / "y", datasets=["all"])).datasets == \
        list(mllm.VIDEO_DATASETS)


def test_qwen2_5_vl(tmp_path, root, frames):
    path = mllm.build_tiny_mllm("qwen2.5-vl", tmp_path / "tiny-2.5")
    model, proc = mllm.load_mllm(str(path), device="cpu")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    s, fr = frames
    texts = [mllm.chat_text(proc, render("MELD", "clean", t, "test", "video")) for t in ("Hi.", "What is it now?")]
    items = [mllm.encode(proc, ids, f, s) for ids, f in zip(mllm.tokenize(proc, texts), fr[3:])]
    assert items[0].second_per_grid == 2.0  # temporal patch 2 / fps 1, as qwen-vl-utils with fps=1
    ours = mllm.generate_batch(model, proc, items, Decoding(max_new_tokens=6))
    assert ours == [_reference_generate(model, proc, it, max_new_tokens=6) for it in items]
    res = _predict(_cfg(path, root, tmp_path / "run", datasets=["MUStARD"], limit=1), tmp_path)
    assert res["per_dataset"]["MUStARD"]["n"] == 1 and res["missing_clips"] == 0


# ---------------------------------------------------------------- fine-tuning


def test_paper_presets():
    c = mllm.make_train_config({"datasets": "MELD"})
    assert (c.setting, c.learning_rate, c.num_epochs, c.warmup_ratio, c.per_device_batch_size,
            c.gradient_accumulation_steps, c.lora_rank, c.lora_alpha) == ("sft", 1.1e-4, 30.0, 0.1, 16, 8, 8, 16)
    it = mllm.make_train_config({"datasets": "video"})
    assert (it.setting, it.learning_rate, it.num_epochs, it.warmup_ratio, it.per_device_batch_size,
            it.gradient_accumulation_steps, it.eval_steps) == ("it", 1e-4, 5.0, 0.3, 8, 4, 10)
    assert len(it.datasets) == 9
    mine = mllm.make_train_config({"datasets": "MUStARD", "learning_rate": "2e-4"})
    assert mine.learning_rate == 2e-4 and mine.num_epochs == 10.0  # the user's value wins over the preset
    other = mllm.with_preset(mine, "MIntRec")
    assert other.num_epochs == 60.0 and other.learning_rate == 2e-4
    assert set(mllm.PAPER_SFT_7B) == set(mllm.get_task(d).name for d in mllm.PAPER_SFT_7B)
    with pytest.raises(ValueError, match="unknown config key"):
        mllm.make_train_config({"lr": 1})


def test_sft_then_predict_with_adapter(tiny_vl, root, tmp_path):
    cfg = mllm.make_train_config(dict(model=str(tiny_vl), data=str(root), datasets="MELD", out=str(tmp_path / "sft"),
                                      max_steps=3, per_device_batch_size=2, gradient_accumulation_steps=1,
                                      learning_rate=5e-3, warmup_ratio=0, eval_steps=3, save_steps=100, device="cpu"))
    assert cfg.frames == "official-train" and cfg.family == "llamafactory_video"
    res = mllm.train_video(cfg, progress=False, frame_cache=_fc(tmp_path))["MELD"]
    adapter = tmp_path / "sft" / "adapter"
    assert res["steps"] == 3 and res["best"]["metric"] == "eval_accuracy" and (adapter / "adapter_config.json").exists()
    log = [json.loads(l) for l in (tmp_path / "sft" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3] and res["best"]["step"] == 3
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("language_model" in k and "visual" not in k for k in weights)  # vision tower frozen
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    env = json.loads((tmp_path / "sft" / "env.json").read_text())
    assert env["frame_setting"]["name"] == "official-train" and env["train_rows"] == 4

    res_a = _predict(_cfg(tiny_vl, root, tmp_path / "pa", adapter=str(adapter), limit=3), tmp_path)
    assert res_a["per_dataset"]["MELD"]["n"] == 3
    recs = _lines(tmp_path / "pa" / "predictions.jsonl")
    assert all(r["output"] for r in recs)


# ---------------------------------------------------------------- the experiment config


def test_config_file_and_video_run(tiny_vl, root, tmp_path, monkeypatch):
    from pathlib import Path

    from mmla.experiment import load_experiment

    path = Path(__file__).resolve().parents[1] / "configs" / "qwen2-vl-7b.yaml"
    exp = mllm.read_experiment(path)
    assert (exp.model, exp.datasets, exp.stages) == ("Qwen/Qwen2-VL-7B-Instruct", ["video"], ["zero-shot", "sft", "it"])
    assert exp.predict["frames"] == "official-infer" and exp.train["frames"] == "official-train"
    assert mllm.make_train_config({**exp.train, "datasets": "MELD"}).learning_rate == 1.1e-4
    assert mllm.make_train_config({**exp.train, "datasets": exp.it["datasets"], "setting": "it"}).num_epochs == 5.0
    assert load_experiment(str(path)).paper_model == "Qwen2-VL-7B"  # the same file is a valid `mmla run` config

    monkeypatch.setenv("MMLA_FRAME_CACHE", str(tmp_path / "frames"))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny", "model": str(tiny_vl), "data": str(root), "datasets": "MELD", "out": str(tmp_path / "exp"),
        "stages": ["zero-shot", "sft", "it"], "predict": {"modality": "video", "max_new_tokens": 4, "batch_size": 4,
                                                          "device": "cpu"},
        "train": {"max_steps": 1, "per_device_batch_size": 2, "gradient_accumulation_steps": 1, "eval_steps": 0,
                  "device": "cpu"}, "it": {"datasets": "MELD"}}))
    assert mllm.main(["video-run", str(cfg), "--limit", "3", "--no-progress"]) == 0
    out = tmp_path / "exp"
    zs = json.loads((out / "zero-shot" / "metrics.json").read_text())
    sft = json.loads((out / "sft" / "metrics.json").read_text())
    assert zs["per_dataset"]["MELD"]["n"] == sft["per_dataset"]["MELD"]["n"] == 3
    assert (out / "sft-train" / "MELD" / "adapter" / "adapter_config.json").exists()
    assert yaml.safe_load((out / "sft-test" / "MELD" / "config.yaml").read_text())["setting"] == "sft"
    assert yaml.safe_load((out / "sft" / "config.yaml").read_text())["setting"] == "sft"
    assert (out / "it-train" / "adapter" / "adapter_config.json").exists()
    assert json.loads((out / "it" / "metrics.json").read_text())["per_dataset"]["MELD"]["n"] == 3
    assert yaml.safe_load((out / "it-train" / "config.yaml").read_text())["setting"] == "it"
    assert list((tmp_path / "frames").rglob("*.npz"))
    assert mllm.main(["video-run", str(cfg), "--stages", "nope"]) == 2


def test_mmla_run_dispatches_video_experiments(tiny_vl, root, tmp_path, monkeypatch):
    """`mmla run CONFIG.yaml` with predict.modality=video trains and tests with the video trainer."""
    from mmla import cli

    monkeypatch.setenv("MMLA_FRAME_CACHE", str(tmp_path / "frames"))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny", "model": str(tiny_vl), "data": str(root), "datasets": "MELD", "out": str(tmp_path / "exp"),
        "stages": ["zero-shot", "sft"], "predict": {"modality": "video", "max_new_tokens": 4, "batch_size": 4,
                                                    "device": "cpu", "limit": 3},
        "train": {"max_steps": 1, "per_device_batch_size": 2, "gradient_accumulation_steps": 1, "eval_steps": 0,
                  "device": "cpu"}}))
    assert cli.main(["run", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "exp"
    assert json.loads((out / "sft" / "metrics.json").read_text())["per_dataset"]["MELD"]["n"] == 3
    assert (out / "sft-train" / "MELD" / "adapter" / "adapter_config.json").exists()
    rec = _lines(out / "sft" / "predictions.jsonl")[0]
    assert rec["video"].endswith(".mp4")
