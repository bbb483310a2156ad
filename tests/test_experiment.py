"""`mmla run`: stages, markers, resumption, the results table, the shipped configs, a video experiment through the
same stages, and the command rerun as typed."""

import dataclasses
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmla import experiment
from mmla.experiment import load_experiment, run_experiment
from mmla.tasks import parse_datasets as parse

REPO = Path(__file__).resolve().parents[1]


def _ours(stdout: str) -> list[str]:
    """mmla's own output lines: an installed library may log to stdout at import (DeepSpeed does, timestamped)."""
    return [line for line in stdout.splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d ", line)]


@pytest.fixture()
def config(tmp_path, tiny_llama, data_root):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": str(tiny_llama), "paper_model": "Llama-3-8B", "data": str(data_root),
        "out": str(tmp_path / "out"), "datasets": "MUStARD,MOSI", "stages": ["zero-shot", "sft", "it"],
        "predict": {"limit": 3, "max_new_tokens": 4, "threads": 1},
        "train": {"preset": "fast", "limit": 8, "max_steps": 2, "eval_steps": 0, "threads": 1},
        "sft": {"datasets": "MUStARD,MOSI,UR-FUNNY"},
        "it": {"datasets": "MUStARD,MOSI"},
    }))
    return path


def test_experiment_stages_table_and_resume(config, tmp_path, capfd):
    cfg = load_experiment(str(config), ["predict.batch_size=2"])
    assert cfg.predict == {"limit": 3, "max_new_tokens": 4, "threads": 1, "batch_size": 2}  # typed when read
    assert cfg.sft == {"datasets": ["MUStARD", "MOSI", "UR-FUNNY"]}
    text = run_experiment(cfg, progress=False)
    out = tmp_path / "out"
    err = capfd.readouterr().err
    assert "no train split for UR-FUNNY" in err

    for setting, d in (("zero-shot", "zero-shot"), ("sft", "sft"), ("it", "it")):
        run_cfg = yaml.safe_load((out / d / "config.yaml").read_text())
        assert run_cfg["setting"] == setting and run_cfg["paper_model"] == "Llama-3-8B"
        assert (out / d / "stage.done").is_file() and (out / d / "metrics.json").is_file()
    assert (out / "sft-train" / "MUStARD" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "sft-train" / "MOSI" / "adapter").is_dir() and not (out / "sft-train" / "UR-FUNNY").exists()
    assert (out / "it-train" / "adapter").is_dir()
    sft_preds = [json.loads(l) for l in (out / "sft" / "predictions.jsonl").open()]
    assert sorted({p["dataset"] for p in sft_preds}) == ["MOSI", "MUStARD"] and len(sft_preds) == 6
    sft_log = [json.loads(l) for l in (out / "sft" / "train_log.jsonl").open()]
    assert {e["dataset"] for e in sft_log} == {"MUStARD", "MOSI"}  # the report plots one line per dataset
    assert (out / "it" / "train_log.jsonl").is_file()

    table = json.loads((out / "results.json").read_text())
    assert table["datasets"]["MUStARD"]["zero-shot"]["paper"] == 59.4  # Llama-3-8B zero-shot, from mmla.paper
    assert table["datasets"]["MOSI"]["sft"]["n"] == 3
    assert table["average"]["it"]["paper_reported"] == 64.16
    assert "| MUStARD |" in text and "average (weighted)" in text and "(Llama-3-8B)" in text

    # rerun: every stage is skipped by its marker, nothing is trained or predicted again
    mtime = (out / "it-train" / "adapter" / "adapter_model.safetensors").stat().st_mtime
    assert run_experiment(cfg, progress=False) == text
    err = capfd.readouterr().err
    assert all(f"{s}: done" in err for s in ("zero-shot", "sft", "it"))
    assert (out / "it-train" / "adapter" / "adapter_model.safetensors").stat().st_mtime == mtime

    # a changed config is not mixed into finished stages
    with pytest.raises(ValueError, match="stage.done: this run directory was made with predict="):
        run_experiment(load_experiment(str(config), ["predict.limit=5"]), progress=False)


def test_experiment_config_errors(config):
    with pytest.raises(ValueError, match="unknown config section 'nope'"):
        load_experiment(str(config), ["nope.x=1"])
    with pytest.raises(ValueError, match="unknown config key 'modle'"):
        load_experiment(str(config), ["modle=x"])
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        load_experiment(str(config), ["stages=zero-shot,dpo"])
    # section keys are checked and typed when the file is read, before any stage runs
    with pytest.raises(ValueError, match="exp.yaml: train: unknown config key 'lr'"):
        load_experiment(str(config), ["train.lr=1"])
    with pytest.raises(ValueError, match="predict: config key 'limit' expects int"):
        load_experiment(str(config), ["predict.limit=many"])


@pytest.mark.parametrize("name", ["demo.yaml", "qwen2-1.5b.yaml", "llama3-8b.yaml"])
def test_shipped_configs_load(name):
    from mmla import paper
    from mmla.training import make_config

    cfg = load_experiment(str(REPO / "configs" / name))
    assert cfg.paper_model in paper.paper_models()
    for setting in ("sft", "it"):  # modality given: the hub model's config is not read offline
        values = experiment._train_values(cfg, setting, Path("x"), ["MELD"] if setting == "sft" else "all")
        assert make_config({**values, "modality": "text"}).lora_target is None


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    from mmla.tiny import build_tiny_video_model

    return build_tiny_video_model("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


def test_shipped_video_config(tiny_vl):
    """configs/qwen2-vl-7b.yaml is an ordinary `mmla run` config; its train keys give the paper's tables for a
    qwen2_vl model (the tiny one stands in for the hub checkpoint)."""
    from mmla.training import make_config

    cfg = load_experiment(str(REPO / "configs" / "qwen2-vl-7b.yaml"))
    assert (cfg.model, cfg.datasets, cfg.stages, cfg.paper_model) == \
        ("Qwen/Qwen2-VL-7B-Instruct", parse("video"), ["zero-shot", "sft", "it"], "Qwen2-VL-7B")
    assert cfg.predict["modality"] == "video" and cfg.predict["frames"] == "official-infer"
    assert cfg.train["frames"] == "official-train" and cfg.it["datasets"] == ["video"]
    tiny = dataclasses.replace(cfg, model=str(tiny_vl))
    sft = make_config(experiment._train_values(tiny, "sft", Path("x"), ["MELD"]))
    assert (sft.modality, sft.learning_rate, sft.num_epochs, sft.lora_rank, sft.gradient_checkpointing) == \
        ("video", 1.1e-4, 30.0, 8, True)
    it = make_config(experiment._train_values(tiny, "it", Path("x"), cfg.it["datasets"]))
    assert (it.setting, it.num_epochs, it.warmup_ratio, len(it.datasets)) == ("it", 5.0, 0.3, 9)


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false", **extra}


def _mmla(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mmla.cli", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=900)


def test_video_experiment_same_stages_rerun_as_typed(tiny_vl, videos_dir, tmp_path):
    """`mmla run` on a video config: zero-shot -> SFT -> IT through the one predict loop and trainer; typed again,
    every stage is skipped and the results are the same."""
    from video_fixtures import make_video_root

    root = make_video_root(tmp_path / "data", videos_dir)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": str(tiny_vl), "data": str(root), "datasets": "MELD", "out": str(tmp_path / "exp"),
        "stages": ["zero-shot", "sft", "it"],
        "predict": {"modality": "video", "max_new_tokens": 4, "batch_size": 4, "device": "cpu", "limit": 3,
                    "threads": 1},
        "train": {"max_steps": 1, "per_device_batch_size": 2, "gradient_accumulation_steps": 1, "eval_steps": 0,
                  "device": "cpu", "threads": 1},
        "it": {"datasets": "MELD"}}))
    env = _env(MMLA_FRAME_CACHE=str(tmp_path / "frames"))
    first = _mmla("run", str(path), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "exp"
    zs = json.loads((out / "zero-shot" / "metrics.json").read_text())
    sft = json.loads((out / "sft" / "metrics.json").read_text())
    it = json.loads((out / "it" / "metrics.json").read_text())
    assert zs["per_dataset"]["MELD"]["n"] == sft["per_dataset"]["MELD"]["n"] == it["per_dataset"]["MELD"]["n"] == 3
    assert zs["missing_clips"] == sft["missing_clips"] == 0
    assert (out / "sft-train" / "MELD" / "adapter" / "adapter_config.json").exists()
    assert (out / "it-train" / "adapter" / "adapter_config.json").exists()
    for d, setting in (("sft-test/MELD", "sft"), ("sft", "sft"), ("it", "it"), ("zero-shot", "zero-shot")):
        run_cfg = yaml.safe_load((out / d / "config.yaml").read_text())
        assert run_cfg["setting"] == setting and run_cfg["modality"] == "video", d
    train_cfg = yaml.safe_load((out / "it-train" / "config.yaml").read_text())
    assert (train_cfg["setting"], train_cfg["modality"], train_cfg["frame_setting"]["name"]) == \
        ("it", "video", "official-train")
    rec = json.loads((out / "sft" / "predictions.jsonl").read_text().splitlines()[0])
    assert rec["video"].endswith(".mp4")
    assert list((tmp_path / "frames").rglob("*.npz"))
    results = (out / "results.json").read_text()

    again = _mmla("run", str(path), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"{s}: done" in again.stderr for s in ("zero-shot", "sft", "it"))
    assert (out / "results.json").read_text() == results and _ours(again.stdout) == _ours(first.stdout)


def test_text_run_rerun_as_typed(tiny_llama, data_root, tmp_path):
    """`mmla run CONFIG.yaml` typed twice into the same directory, the second time after its SFT stage was cut
    short (no marker, a finished adapter): the finished work is reused and the metrics are the same."""
    import shutil

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "typed", "model": str(tiny_llama), "data": str(data_root), "datasets": "MUStARD",
        "out": str(tmp_path / "out"), "stages": ["zero-shot", "sft"],
        "predict": {"limit": 4, "max_new_tokens": 4, "threads": 1},
        "train": {"preset": "fast", "limit": 8, "max_steps": 2, "eval_steps": 0, "threads": 1}}))
    first = _mmla("run", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    results = (out / "results.json").read_text()
    sft_metrics = (out / "sft" / "metrics.json").read_text()
    shutil.rmtree(out / "sft")  # as if killed after training and testing, before the stage finished
    again = _mmla("run", str(path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "zero-shot: done" in again.stderr and "already trained" in again.stderr
    assert "resuming: 4 of 4 done" in again.stderr  # the SFT test run is not predicted again
    assert (out / "sft" / "metrics.json").read_text() == sft_metrics
    assert (out / "results.json").read_text() == results and _ours(again.stdout) == _ours(first.stdout)
