"""Fine-tuning, text and video through one trainer: config, data, the loss, train/eval/select, merge, SIGKILL +
resume, DDP under torchrun and accelerate, video LoRA SFT on tiny Qwen2-VL, and `mmla train` rerun as typed."""

import dataclasses
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import LAUNCHERS, ONE_AT_A_TIME
from mmla import finetune, runs, training
from mmla.config import parse_overrides, read_yaml
from mmla.runs import read_run_config
from mmla.finetune import IGNORE, Collator, answer_positions
from mmla.training import make_config

REPO = Path(__file__).resolve().parents[1]



def _ours(stdout: str) -> list[str]:
    """mmla's own output lines: an installed library may log to stdout at import (DeepSpeed does, timestamped)."""
    return [line for line in stdout.splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d ", line)]

def _cli() -> list[str]:
    return [sys.executable, "-m", "mmla.cli"]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}


def _log(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- config


def test_presets_and_overrides():
    sft = make_config({"datasets": "MELD"})
    assert (sft.setting, sft.learning_rate, sft.per_device_batch_size, sft.gradient_accumulation_steps) == ("sft", 5e-5, 1, 4)
    assert (sft.lora_rank, sft.lora_alpha, sft.lora_dropout, sft.num_epochs, sft.cutoff_len) == (16, 32, 0.0, 8.0, 1024)
    assert (sft.lr_scheduler, sft.warmup_ratio, sft.max_grad_norm, sft.eval_steps) == ("cosine", 0.0, 1.0, 20)
    it = make_config({"datasets": "all"})
    assert (it.setting, it.learning_rate, it.per_device_batch_size, it.gradient_accumulation_steps) == ("it", 1e-4, 2, 4)
    assert (it.lora_rank, it.lora_alpha) == (8, 16)
    fast = make_config({"datasets": "all", "preset": "fast"})
    # the same optimisation: same effective batch, lr, schedule and LoRA, executed differently
    assert fast.per_device_batch_size * fast.gradient_accumulation_steps == 8
    assert (fast.learning_rate, fast.lora_rank, fast.batching, fast.answer_logits_only) == (1e-4, 8, "causal", True)
    # YAML / key=value strings are typed by the dataclass; later values win over the preset
    cfg = make_config({"datasets": "MELD,MOSI", "learning_rate": "1e-4", "num_epochs": "2", "group_by_length": "true",
                       "eval_limit": "null", "max_steps": "7"})
    assert (cfg.datasets, cfg.learning_rate, cfg.num_epochs, cfg.group_by_length, cfg.eval_limit, cfg.max_steps) == \
        (["MELD", "MOSI"], 1e-4, 2.0, True, None, 7)
    assert cfg.eval_family == "infer_script"  # the official pipeline evaluates with the inference prompt
    assert make_config({"datasets": "MELD", "family": "clean"}).eval_family == "clean"


@pytest.mark.parametrize("values, message", [
    ({"lr": "1"}, "unknown config key 'lr'"),
    ({"learning_rate": "fast"}, "learning_rate' expects float"),
    ({"max_steps": "2.5"}, "max_steps' expects int"),
    ({"preset": "slow"}, "preset must be one of paper, fast"),
    ({"batching": "ragged"}, "batching must be one of padded, causal, packed"),
    ({"datasets": "NOPE"}, "unknown dataset 'NOPE'"),
    ({"select_metric": "eval_gen_accuracy", "eval_gen": "none"}, "needs eval_gen"),
])
def test_config_errors_are_one_line(values, message):
    with pytest.raises(ValueError, match=message) as e:
        make_config(values)
    assert "\n" not in str(e.value)


def test_overrides_and_yaml(tmp_path):
    assert parse_overrides(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ValueError, match="not key=value"):
        parse_overrides(["oops"])
    (tmp_path / "c.yaml").write_text("preset: fast\nnum_epochs: 3\n")
    cfg = make_config({**read_yaml(tmp_path / "c.yaml"), "datasets": "MOSI"})
    assert (cfg.preset, cfg.num_epochs, cfg.per_device_batch_size) == ("fast", 3.0, 4)


# ---------------------------------------------------------------- data and loss


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from mmla.inputs import make_inputs
    from mmla.models import load_model

    model, tok = load_model(str(tiny_llama), dtype="float32", device="cpu")
    return model, tok, make_inputs(model, tok)


def test_training_example_masks_the_prompt(tiny, data_root):
    _, tok, inputs = tiny
    cfg = make_config({"data": str(data_root), "datasets": "MIntRec"})
    split = training.build_split(cfg, inputs, ["MIntRec"], "train", 3)
    item, ex = split.items[0], split.examples[0]
    answer = [t for t in item["labels"] if t != IGNORE]
    n_prompt = len(item["labels"]) - len(answer)
    assert item["labels"][:n_prompt] == [IGNORE] * n_prompt and item["input_ids"][n_prompt:] == answer
    # the released answer string (llamafactory_text capitalises MIntRec labels) and the end-of-turn token
    assert tok.decode(answer) == f"intent: {ex.label.capitalize()}<|im_end|>"
    prompt = tok.decode(item["input_ids"][:n_prompt])
    assert prompt.endswith("<|im_start|>assistant\n") and "The speaker says: " + ex.text in prompt
    # cutoff keeps the answer and cuts the prompt
    cut, truncated = inputs.train_item("word " * 50, "intent: Praise<|im_end|>", cutoff=20)
    assert truncated and len(cut["input_ids"]) == 20 and cut["labels"][-len(answer):] != [IGNORE] * len(answer)


def test_every_batching_with_answer_only_logits_gives_the_official_loss(tiny, data_root):
    import torch
    import torch.nn.functional as F

    model, tok, inputs = tiny
    cfg = make_config({"data": str(data_root), "datasets": "MELD"})
    items = training.build_split(cfg, inputs, ["MELD"], "train", 4).items
    n = sum(sum(t != IGNORE for t in it["labels"]) for it in items)
    with torch.no_grad():
        # official: one example per micro-batch, full-vocabulary logits, the model's own loss
        one = lambda it: {k: v for k, v in Collator(tok.pad_token_id)([it]).items() if k != "num_tokens"}  # noqa: E731
        full = sum(model(**one(it), num_items_in_batch=torch.tensor(n)).loss for it in items)
        for batching in ("padded", "causal", "packed"):
            batch = Collator(tok.pad_token_id, batching)(items)
            assert int(batch.pop("num_tokens")) == sum(len(it["input_ids"]) for it in items)
            labels = batch.pop("labels")
            keep = answer_positions(labels)
            logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
            assert logits.shape == (n, model.config.vocab_size)  # only the answer positions
            loss = F.cross_entropy(logits, labels[:, 1:][keep[:, :-1]], reduction="sum") / n
            assert torch.allclose(loss, full, atol=1e-5), (batching, loss, full)


def test_fast_and_paper_take_the_same_optimiser_steps(tiny_llama, data_root, tmp_path):
    """fast (one packed micro-batch of 4, answer-only logits) vs paper (1 x accumulation 4, full logits), fp32."""
    logs = {}
    for preset in ("paper", "fast"):
        cfg = make_config({"model": str(tiny_llama), "data": str(data_root), "datasets": "MUStARD", "preset": preset,
                           "limit": 16, "max_steps": 3, "eval_steps": 0, "save_steps": 100, "precision": "fp32",
                           "learning_rate": "1e-3", "threads": 1, "out": str(tmp_path / preset)})
        training.train(cfg, progress=False)
        logs[preset] = [r["loss"] for r in _log(tmp_path / preset)]
    assert len(logs["paper"]) == 3
    assert logs["paper"] == pytest.approx(logs["fast"], abs=1e-4)


def test_bf16_frozen_matmuls_keep_fp32_elsewhere(tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model

    from mmla.models import load_model

    model, _ = load_model(str(tiny_llama), dtype="float32", device="cpu")
    n = finetune.bf16_frozen_matmuls(model)
    assert n == 2 * 7  # 7 projections per layer, the output layer left alone
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------- train, select, merge


@pytest.fixture(scope="module")
def trained(tiny_llama, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    cfg = make_config({"model": str(tiny_llama), "data": str(data_root), "datasets": "MUStARD", "preset": "fast",
                       "limit": 32, "max_steps": 6, "eval_steps": 3, "eval_limit": 8, "save_steps": 3,
                       "learning_rate": "3e-3", "threads": 1, "out": str(out), "select_metric": "eval_gen_accuracy"})
    result = training.train(cfg, progress=False)
    return out, result


def test_train_writes_adapter_logs_and_records(trained):
    out, result = trained
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    log = _log(out)
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_accuracy" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all({"step", "epoch", "loss", "lr", "tokens_per_s"} <= set(r) for r in steps)
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_gen_accuracy"] <= 1 for r in evals)
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "eval_gen_accuracy"
    assert best["value"] == max(r["eval_gen_accuracy"] for r in evals)
    assert result["MUStARD"]["best"]["step"] == best["step"]
    cfg = read_run_config(out / "config.yaml")
    assert cfg["preset"] == "fast" and cfg["datasets"] == ["MUStARD"] and cfg["learning_rate"] == 3e-3
    env = json.loads((out / "env.json").read_text())
    assert env["train_rows"] == 32 and env["dev_rows"] == 8 and env["packages"]["peft"]
    # a second call finds the finished run and does not train again
    again = training.train(make_config({**cfg, "out": str(out)}), progress=False)  # config.yaml as the config
    assert again["MUStARD"]["steps"] == 6 and len(_log(out)) == len(log)


def test_merged_model_predicts_like_the_adapter(trained, tiny_llama, data_root, tmp_path):
    from mmla.inference import PredictConfig, predict

    out, _ = trained
    merged = training.merge(str(tiny_llama), str(out / "adapter"), str(tmp_path / "merged"))
    assert list(merged.glob("*.safetensors")) and (merged / "tokenizer.json").is_file()

    def run(name, model, adapter, mode):
        predict(PredictConfig(model=str(model), adapter=adapter and str(adapter), data=str(data_root),
                              datasets=["MUStARD"], limit=6, mode=mode, max_new_tokens=6, threads=1,
                              out=str(tmp_path / f"{name}-{mode}")), progress=False)
        return [json.loads(l)["output"] for l in (tmp_path / f"{name}-{mode}" / "predictions.jsonl").open()]

    for mode in ("generate", "score"):
        with_adapter = run("adapter", tiny_llama, out / "adapter", mode)
        assert run("merged", merged, None, mode) == with_adapter
    assert run("base", tiny_llama, None, "generate") != run("adapter", tiny_llama, out / "adapter", "generate")


def test_it_reports_datasets_without_train_split(tiny_llama, data_root, tmp_path, capfd):
    cfg = make_config({"model": str(tiny_llama), "data": str(data_root), "datasets": "all", "limit": 1,
                       "max_steps": 1, "eval_steps": 0, "threads": 1, "out": str(tmp_path / "it")})
    result = training.train(cfg, progress=False)
    err = capfd.readouterr().err
    assert "no train split" in err and "MIntRec2.0, UR-FUNNY" in err
    assert result["it"]["missing_train"] == ["MIntRec2.0", "UR-FUNNY"]
    assert len(result["it"]["datasets"]) == 10
    assert json.loads((tmp_path / "it" / "env.json").read_text())["train_rows"] == 10
    with pytest.raises(ValueError, match="has a train split"):
        training.train(dataclasses.replace(cfg, datasets=["UR-FUNNY"], setting="sft"), progress=False)


# ---------------------------------------------------------------- processes


def _train_cmd(model, data_root, out, *extra):
    return [*_cli(), "train", "--model", str(model), "--data", str(data_root), "--datasets", "MUStARD",
            "--out", str(out), "--no-progress", "limit=48", "max_steps=12", "save_steps=3", "eval_steps=6",
            "eval_limit=4", "threads=1", *extra]


def test_sigkill_then_resume_from_last_checkpoint(tiny_llama, data_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_llama, data_root, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while runs.last_checkpoint(out / "checkpoints") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = runs.last_checkpoint(out / "checkpoints")
    step = int(ckpt.name.split("-")[1])
    assert step < 12 and not (out / "train_result.json").exists()

    r = subprocess.run(_train_cmd(tiny_llama, data_root, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from checkpoint-{step} (step {step})" in r.stderr
    log = _log(out)
    assert [e["step"] for e in log if "loss" in e] == list(range(1, 13))  # nothing lost, nothing twice
    assert [e["step"] for e in log if "eval_accuracy" in e] == [6, 12]
    assert json.loads((out / "train_result.json").read_text())["steps"] == 12
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_error_is_one_line(tiny_llama, data_root, tmp_path):
    r = subprocess.run([*_cli(), "train", "--model", str(tiny_llama), "--data", str(data_root), "--datasets",
                        "MUStARD", "--out", str(tmp_path / "x"), "lr=1"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "unknown config key 'lr'" in r.stderr


@ONE_AT_A_TIME
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_data_parallel(launcher, tiny_llama, data_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [*LAUNCHERS[launcher], "-m", _cli()[2], "train",
           "--model", str(tiny_llama), "--data", str(data_root), "--datasets", "MUStARD", "--out", str(out),
           "--no-progress", "limit=32", "max_steps=4", "eval_steps=2", "eval_limit=6", "save_steps=2"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 2
    log = _log(out)
    # 32 rows, 2 processes x batch 1 x accumulation 4 = 8 rows per step: 4 steps are exactly one epoch
    assert [e["epoch"] for e in log if "loss" in e] == [0.25, 0.5, 0.75, 1.0]
    assert [e["step"] for e in log if "eval_accuracy" in e] == [2, 4]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert r.stdout.count("MUStARD:") == 1  # one summary, from process 0


# ---------------------------------------------------------------- `mmla train` rerun as typed


def test_train_rerun_as_typed_skips_and_ends_the_same(tiny_llama, data_root, tmp_path):
    """The README's command, typed twice into the same directory: the second run reuses the finished one."""
    out = tmp_path / "typed"
    typed = lambda *more: [*_cli(), "train", "--model", str(tiny_llama), "--data", str(data_root), "--datasets",  # noqa
                           "MUStARD", "--preset", "fast", "limit=8", "max_steps=2", "eval_steps=2", "eval_limit=4",
                           "threads=1", *more, "--out", str(out)]
    cmd = typed()
    first = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    result = (out / "train_result.json").read_text()
    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already trained" in second.stderr and _ours(second.stdout) == _ours(first.stdout)
    assert (out / "train_result.json").read_text() == result and len(_log(out)) == 3  # 2 steps + 1 evaluation
    # the same directory under another identity config is refused in one line, naming the key
    third = subprocess.run(typed("learning_rate=1e-3"), env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 2 and third.stderr.strip().count("\n") == 0
    assert "made with learning_rate=5e-05, not 0.001" in third.stderr
    # `mmla train` never defaults to training every dataset
    r = subprocess.run([*_cli(), "train", "--model", str(tiny_llama), "--out", str(tmp_path / "none")], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs --datasets" in r.stderr


# ---------------------------------------------------------------- video: tiny Qwen2-VL on real and synthetic clips


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    from mmla.tiny import build_tiny_video_model

    return build_tiny_video_model("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture
def video_root(tmp_path, videos_dir):
    from video_fixtures import make_video_root

    return make_video_root(tmp_path / "data", videos_dir)


def test_video_paper_presets(tiny_vl):
    c = make_config({"model": str(tiny_vl), "datasets": "MELD"})
    assert (c.modality, c.family, c.frames, c.eval_family, c.paper_table) == \
        ("video", "llamafactory_video", "official-train", "infer_script", "qwen2-vl-7b")
    assert (c.setting, c.learning_rate, c.num_epochs, c.warmup_ratio, c.per_device_batch_size,
            c.gradient_accumulation_steps, c.lora_rank, c.lora_alpha) == ("sft", 1.1e-4, 30.0, 0.1, 16, 8, 8, 16)
    it = make_config({"model": str(tiny_vl), "datasets": "video"})
    assert (it.setting, it.learning_rate, it.num_epochs, it.warmup_ratio, it.per_device_batch_size,
            it.gradient_accumulation_steps, it.eval_steps) == ("it", 1e-4, 5.0, 0.3, 8, 4, 10)
    assert len(it.datasets) == 9 and make_config({"model": str(tiny_vl), "datasets": "all"}).datasets == it.datasets
    mine = make_config({"model": str(tiny_vl), "datasets": "MUStARD", "learning_rate": "2e-4"})
    assert mine.learning_rate == 2e-4 and mine.num_epochs == 10.0  # the user's value wins over the preset
    other = training.with_preset(mine, "MIntRec")
    assert other.num_epochs == 60.0 and other.learning_rate == 2e-4
    table = training.VIDEO_PRESETS["qwen2-vl-7b"]["sft"]
    assert set(table) == {training.get_task(d).name for d in table} and len(table) == 12
    # the same model trained as text, and the errors
    assert make_config({"model": str(tiny_vl), "datasets": "MOSI", "modality": "text"}).lora_rank == 16
    with pytest.raises(ValueError, match="no videos are released for MOSI"):
        make_config({"model": str(tiny_vl), "datasets": "MOSI"})
    with pytest.raises(ValueError, match="cannot take video"):
        make_config({"model": "smollm2-135m", "datasets": "MELD", "modality": "video"})
    with pytest.raises(ValueError, match="are for video models"):
        make_config({"datasets": "MELD", "frames": "official-train"})


def test_video_items_and_every_batching_give_the_official_loss(tiny_vl, video_root, tmp_path):
    import torch
    import torch.nn.functional as F

    from mmla.inputs import make_inputs
    from mmla.models import load_model
    from mmla.prompts import target
    from mmla.video import FrameCache

    model, proc = load_model(str(tiny_vl), dtype="float32", device="cpu", modality="video")
    cfg = make_config({"model": str(tiny_vl), "data": str(video_root), "datasets": "MELD"})
    inputs = make_inputs(model, proc, training.frames_of(cfg))
    split = training.build_split(cfg, inputs, ["MELD"], "train", None, cache=FrameCache(tmp_path / "frames"))
    assert len(split.items) == 4 and [(m["dataset"], m["id"]) for m in split.missing] == [("MELD", "9_4")]
    assert split.missing[0]["error"].startswith("missing")
    items = [split.items[i] for i in range(4)]
    video_id = proc.video_token_id
    for it, e in zip(items, split.examples):
        answer = [t for t in it["labels"] if t != IGNORE]
        n_prompt = len(it["labels"]) - len(answer)
        assert it["input_ids"][n_prompt:] == answer and video_id not in answer
        assert proc.tokenizer.decode(answer) == target("MELD", "llamafactory_video", e.label, "train", "video") + \
            "<|im_end|>"
        assert it["input_ids"][:n_prompt].count(video_id) > 1  # the clip's vision tokens, masked from the loss
        assert len(it["tokens"]["mm_token_type_ids"]) == len(it["input_ids"])
    n = sum(sum(t != IGNORE for t in it["labels"]) for it in items)
    collate = lambda b, its: Collator(inputs.pad_id, b, inputs.forward_kwargs)(its)  # noqa: E731
    with torch.no_grad():
        one = lambda it: {k: v for k, v in collate("padded", [it]).items() if k != "num_tokens"}  # noqa: E731
        full = sum(model(**one(it), num_items_in_batch=torch.tensor(n)).loss for it in items)
        for batching in ("padded", "causal"):
            batch = collate(batching, items)
            assert batch["pixel_values_videos"].shape[0] == sum(it["media"]["pixel_values_videos"].shape[0]
                                                                for it in items)
            assert batch["video_grid_thw"].shape == (4, 3) and "second_per_grid_ts" not in batch
            batch.pop("num_tokens")
            labels = batch.pop("labels")
            keep = answer_positions(labels)
            logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
            assert logits.shape == (n, model.config.text_config.vocab_size)
            loss = F.cross_entropy(logits, labels[:, 1:][keep[:, :-1]], reduction="sum") / n
            assert torch.allclose(loss, full, atol=1e-5), (batching, loss, full)


def test_video_sft_trains_language_lora_only_then_predicts(tiny_vl, video_root, tmp_path):
    """`mmla train` on a video model, typed twice (the second reuses the finished run), then predict with the
    adapter through mmla.inference.predict."""
    from safetensors.torch import load_file

    from mmla.inference import PredictConfig, predict
    from mmla.video import FrameCache

    out = tmp_path / "sft"
    env = {**_env(), "MMLA_FRAME_CACHE": str(tmp_path / "frames")}
    typed = lambda *more: [*_cli(), "train", "--model", str(tiny_vl), "--data", str(video_root), "--datasets",  # noqa
                           "MELD", "max_steps=3", "per_device_batch_size=2", "gradient_accumulation_steps=1",
                           "learning_rate=5e-3", "warmup_ratio=0", "eval_steps=3", "save_steps=100", "device=cpu",
                           "threads=1", *more, "--out", str(out)]
    cmd = typed()
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((out / "train_result.json").read_text())
    adapter = out / "adapter"
    assert res["steps"] == 3 and res["best"]["metric"] == "eval_accuracy" and (adapter / "adapter_config.json").exists()
    assert res["train_missing_clips"] == 1 and res["best"]["step"] == 3
    log = _log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in log if "eval_accuracy" in r] == [3]
    assert all(0 <= r["eval_gen_accuracy"] <= 1 for r in log if "eval_accuracy" in r)
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("language_model" in k and "visual" not in k for k in weights)  # vision tower frozen
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    env_rec = json.loads((out / "env.json").read_text())
    assert env_rec["frame_setting"]["name"] == "official-train" and env_rec["train_rows"] == 4
    assert env_rec["train_missing_clips"] == 1 and env_rec["dev_rows"] == 2
    run_cfg = read_run_config(out / "config.yaml")
    assert run_cfg["modality"] == "video" and run_cfg["frame_setting"]["name"] == "official-train"
    assert run_cfg["learning_rate"] == 5e-3 and run_cfg["lora_rank"] == 8  # paper table, except the keys given

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "already trained" in second.stderr and _ours(second.stdout) == _ours(first.stdout)
    changed = subprocess.run(typed("num_frames=2"), env=env, capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2 and "made with num_frames=None, not 2" in changed.stderr

    res_a = predict(PredictConfig(model=str(tiny_vl), adapter=str(adapter), data=str(video_root), datasets=["MELD"],
                                  limit=3, max_new_tokens=6, batch_size=2, device="cpu", threads=1,
                                  out=str(tmp_path / "pa")), progress=False, frame_cache=FrameCache(tmp_path / "fc"))
    assert res_a["per_dataset"]["MELD"]["n"] == 3 and res_a["missing_clips"] == 0
    recs = [json.loads(l) for l in (tmp_path / "pa" / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["output"] for r in recs)
