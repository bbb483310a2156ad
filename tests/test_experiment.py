"""`mmla run`: stages, markers, resumption, the results table, and the shipped configs."""

import json
from pathlib import Path

import pytest
import yaml

from mmla import experiment
from mmla.experiment import load_experiment, run_experiment

REPO = Path(__file__).resolve().parents[1]


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
    assert cfg.predict == {"limit": 3, "max_new_tokens": 4, "threads": 1, "batch_size": "2"}
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
    with pytest.raises(ValueError, match="ran with another config"):
        run_experiment(load_experiment(str(config), ["predict.limit=5"]), progress=False)


def test_experiment_config_errors(config):
    with pytest.raises(ValueError, match="unknown config section 'nope'"):
        load_experiment(str(config), ["nope.x=1"])
    with pytest.raises(ValueError, match="unknown config key 'modle'"):
        load_experiment(str(config), ["modle=x"])
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        load_experiment(str(config), ["stages=zero-shot,dpo"])


@pytest.mark.parametrize("name", ["demo.yaml", "qwen2-1.5b.yaml", "llama3-8b.yaml"])
def test_shipped_configs_load(name):
    from mmla import paper
    from mmla.training import make_config

    cfg = load_experiment(str(REPO / "configs" / name))
    assert cfg.paper_model in paper.paper_models()
    for setting in ("sft", "it"):
        make_config(experiment._train_values(cfg, setting, Path("x"), ["MELD"] if setting == "sft" else "all"))
