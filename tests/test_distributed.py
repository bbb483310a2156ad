"""Past one device, on CPUs: data-parallel `mmla predict` under torchrun and accelerate launch (2 gloo processes,
the embedded model) equals one process row for row; a rank SIGKILLed partway is completed by a 1-process rerun;
a model split over CPU and disk by --device-map auto predicts like the unsplit one; LoRA SFT under
configs/accelerate/deepspeed_zero{2,3}.yaml on 2 processes follows the single-process loss curve."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import LAUNCHERS, ONE_AT_A_TIME, TORCHRUN
from mmla import distributed
from mmla.inference import PredictConfig, predict

REPO = Path(__file__).resolve().parents[1]
DATASETS = "MELD,MOSI,MUStARD"
LIMIT = 4  # rows per dataset: 12 in all
pytestmark = ONE_AT_A_TIME  # every test here starts torchrun or accelerate


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false",
            "OMP_WAIT_POLICY": "PASSIVE"}


def _args(data_root, out, mode, batch=32):
    return ["-m", "mmla.cli", "predict", "--model", "smollm2-135m", "--data", str(data_root), "--datasets", DATASETS,
            "--limit", str(LIMIT), "--mode", mode, "--protocol", "clean", "--max-new-tokens", "8",
            "--batch-size", str(batch), "--threads", "1", "--no-progress", "--out", str(out)]


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]


def _by_key(rows):
    return {(r["dataset"], r["id"]): (r["prompt"], r["output"], r["pred"]) for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """One process, in this interpreter: the rows and metrics every multi-process run must reproduce."""
    ref = {}
    for mode in ("generate", "score"):
        out = tmp_path_factory.mktemp(f"one-{mode}")
        metrics = predict(PredictConfig(model="smollm2-135m", data=str(data_root), datasets=DATASETS.split(","),
                                        limit=LIMIT, mode=mode, protocol="clean", max_new_tokens=8, threads=1,
                                        out=str(out)), progress=False)
        ref[mode] = (_rows(out), metrics)
    return ref


def test_shard_is_balanced_deterministic_and_complete():
    weights = [120, 80, 300, 95, 110, 100, 90, 290, 105]
    shares = distributed.shard(weights, 2)
    assert shares == distributed.shard(weights, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(weights)))
    loads = [sum(weights[i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= max(weights) // 2, loads
    assert distributed.shard([5, 5], 4)[2:] == [[], []]  # more ranks than rows: the extra ranks idle


def test_merge_folds_parts_once_keeps_good_answers_and_checks(tmp_path):
    rec = lambda i, out, **kw: {"dataset": "MELD", "split": "test", "id": str(i), "label": "joy", "output": out,
                                **kw}  # noqa: E731
    write = lambda p, rows: p.write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write(tmp_path / "predictions.jsonl", [rec(0, "a"), rec(1, "", clip_error="missing")])
    write(distributed.part_path(tmp_path, 0), [rec(1, "b"), rec(2, "c")])
    # an older run's part (more ranks then): its failed clip must not undo rank 0's retry; a torn tail is dropped
    distributed.part_path(tmp_path, 3).write_text(json.dumps(rec(1, "", clip_error="missing")) + "\n" +
                                                  json.dumps(rec(3, "d"))[:20])
    expected = [("MELD", "test", str(i), 0) for i in (2, 1, 0)]
    stats = distributed.merge_parts(tmp_path, expected)
    assert stats == {"parts": 2, "records_read": 5} and not distributed.part_files(tmp_path)
    assert [(r["id"], r["output"]) for r in _rows(tmp_path)] == [("2", "c"), ("1", "b"), ("0", "a")]
    with pytest.raises(RuntimeError, match="1 rows are missing"):
        distributed.check(tmp_path / "predictions.jsonl", set(expected) | {("MELD", "test", "3", 0)})


@pytest.mark.parametrize("launcher, mode", [("torchrun", "generate"), ("accelerate", "score")])
def test_two_processes_equal_one_row_for_row(launcher, mode, reference, data_root, tmp_path):
    out = tmp_path / "dp"
    cmd = [*LAUNCHERS[launcher], *_args(data_root, out, mode)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows, metrics = reference[mode]
    merged = _rows(out)
    keys = [(x["dataset"], x["id"]) for x in merged]
    assert len(keys) == len(set(keys)) == 3 * LIMIT
    assert _by_key(merged) == _by_key(rows)
    assert [x["dataset"] for x in merged] == [d for d in DATASETS.split(",") for _ in range(LIMIT)]  # data order
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert not distributed.part_files(out)
    env = json.loads((out / "env.json").read_text())
    assert [x["rank"] for x in env["ranks"]] == [0, 1] and sum(x["rows"] for x in env["ranks"]) == 3 * LIMIT
    assert min(x["rows"] for x in env["ranks"]) >= 3 * LIMIT // 2 - 2  # balanced by prompt length
    assert env["merge"] == {"parts": 2, "records_read": 3 * LIMIT}
    assert r.stdout.count("average (n-weighted)") == 1  # one report, from rank 0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def test_sigkill_one_rank_then_finish_with_one_process(reference, data_root, tmp_path):
    out = tmp_path / "killed"
    launcher = subprocess.Popen([*TORCHRUN, *_args(data_root, out, "generate", batch=1)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    part1 = distributed.part_path(out, 1)
    deadline = time.time() + 240
    while launcher.poll() is None and time.time() < deadline:
        if part1.exists() and len(part1.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert launcher.poll() is None, "finished before a rank could be killed: " + launcher.stderr.read()[-2000:]
    victim = [p for p in _children(launcher.pid) if _rank_of(p) == 1]
    assert len(victim) == 1
    os.kill(victim[0], signal.SIGKILL)
    launcher.wait(timeout=120)
    assert launcher.returncode != 0  # the launcher stops the other rank too
    assert not (out / "metrics.json").exists()
    left = [json.loads(l) for p in distributed.part_files(out) for l in p.read_text().splitlines()
            if l.endswith("}")]
    assert 2 <= len(left) < 3 * LIMIT

    r = subprocess.run([sys.executable, *_args(data_root, out, "generate", batch=1)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming: {len(left)} of {3 * LIMIT} done" in r.stderr  # the parts' rows are not redone
    rows, metrics = reference["generate"]
    final = _rows(out)
    keys = [(x["dataset"], x["id"]) for x in final]
    assert len(keys) == len(set(keys)) == 3 * LIMIT
    assert _by_key(final) == _by_key(rows)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert not distributed.part_files(out)


def test_device_map_offload_predicts_like_the_unsplit_model(tiny_llama, data_root, tmp_path):
    from safetensors import safe_open

    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as f:
        size = {k: f.get_slice(k).get_shape() for k in f.keys()}
    nbytes = lambda prefix: sum(4 * math.prod(s) for k, s in size.items() if k.startswith(prefix))  # noqa: E731
    embed, layer = nbytes("model.embed_tokens."), nbytes("model.layers.0.")
    # accelerate keeps room for the largest unit (the embedding) beside what it places on the CPU: this cap holds
    # the embedding and the first layer there, the rest goes to <out>/offload on disk
    cap = f"{(2 * embed + layer + layer // 2) // 1000}KB"
    common = dict(model=str(tiny_llama), data=str(data_root), datasets=DATASETS.split(","), limit=3,
                  max_new_tokens=6, threads=1)
    whole = predict(PredictConfig(**common, out=str(tmp_path / "whole")), progress=False)
    split = predict(PredictConfig(**common, device_map="auto", max_memory=f"cpu={cap}", out=str(tmp_path / "split")),
                    progress=False)
    placed = json.loads((tmp_path / "split" / "env.json").read_text())["hf_device_map"]
    assert placed["model.embed_tokens"] == "cpu" and placed["lm_head"] == "disk", placed
    assert _by_key(_rows(tmp_path / "split")) == _by_key(_rows(tmp_path / "whole"))
    assert split == whole
    with pytest.raises(ValueError, match="'lots' is not a size") as e:
        predict(PredictConfig(**common, device_map="auto", max_memory="cpu=lots", out=str(tmp_path / "bad")))
    assert "\n" not in str(e.value)


def _train(model, data_root, out, *overrides):
    return ["-m", "mmla.cli", "train", "--model", str(model), "--data", str(data_root), "--datasets", "MUStARD",
            "--out", str(out), "--no-progress", "limit=32", "max_steps=4", "eval_steps=0", "save_steps=100",
            "threads=1", *overrides]


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.fixture(scope="module")
def one_process_losses(tiny_llama, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-one")
    r = subprocess.run([sys.executable, *_train(tiny_llama, data_root, out, "per_device_batch_size=2")], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "train_result.json").read_text())["distributed_type"] == "NO"
    return _losses(out)


@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_lora_sft_two_processes_follow_one(config, one_process_losses, tiny_llama, data_root, tmp_path):
    """configs/accelerate/<config>.yaml (DeepSpeed on its CPU accelerator) with 2 processes x micro-batch 1 against
    one process x micro-batch 2: the same 8 rows per optimiser step, so the same loss curve. (No FSDP config is
    shipped: accelerate turns FSDP on only for GPU-like devices, so on CPUs it would silently run plain DDP.)"""
    out = tmp_path / config
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(REPO / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
                        *_train(tiny_llama, data_root, out)],
                       env=_env(), capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "train_result.json").read_text())
    assert (result["distributed_type"], result["world_size"]) == ("DEEPSPEED", 2)
    losses = _losses(out)
    assert len(losses) == len(one_process_losses) == 4
    assert losses == pytest.approx(one_process_losses, rel=1e-4), (losses, one_process_losses)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_device_map_training_keeps_the_loss_and_refuses_disk(tiny_llama, data_root, tmp_path):
    """device_map=auto for LoRA training: the dispatched base model trains to the same losses; a max_memory that
    would push weights to disk is refused in one line."""
    from mmla import training
    from mmla.training import make_config

    base = {"model": str(tiny_llama), "data": str(data_root), "datasets": "MUStARD", "limit": 8, "max_steps": 2,
            "eval_steps": 0, "save_steps": 100, "threads": 1}
    plain = training.train(make_config({**base, "out": str(tmp_path / "plain")}), progress=False)
    mapped = training.train(make_config({**base, "device_map": "auto", "max_memory": "cpu=1GB",
                                         "out": str(tmp_path / "mapped")}), progress=False)
    assert _losses(tmp_path / "mapped") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-6)
    assert mapped["MUStARD"]["train_loss"] == pytest.approx(plain["MUStARD"]["train_loss"], rel=1e-6)
    with pytest.raises(ValueError) as e:
        training.train(make_config({**base, "device_map": "auto", "max_memory": "cpu=1MB",
                                    "out": str(tmp_path / "disk")}), progress=False)
    assert "\n" not in str(e.value) and "disk" in str(e.value)


def test_mmla_run_video_under_torchrun(videos_dir, data_root, tmp_path):
    """`mmla run` on a video model under torchrun: every rank runs the stages; its zero-shot and SFT predict
    stages are shared (video rows, clips decoded per rank), training is DDP, and the stage files are written
    once. The merged zero-shot rows equal a one-process `mmla predict` of the same config."""
    import yaml
    from video_fixtures import make_video_root

    from mmla.tiny import build_tiny_video_model

    model = build_tiny_video_model("qwen2-vl", tmp_path / "tiny-vl")
    root = make_video_root(tmp_path / "data", videos_dir)
    predict_section = {"modality": "video", "max_new_tokens": 4, "batch_size": 4, "device": "cpu", "threads": 1}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": str(model), "data": str(root), "datasets": "MELD,MUStARD",
        "out": str(tmp_path / "exp"), "stages": ["zero-shot", "sft"], "predict": predict_section,
        "train": {"max_steps": 1, "per_device_batch_size": 1, "gradient_accumulation_steps": 1, "eval_steps": 0,
                  "device": "cpu", "threads": 1},
        "sft": {"datasets": "MELD"}}))
    env = {**_env(), "MMLA_FRAME_CACHE": str(tmp_path / "frames")}
    r = subprocess.run([*TORCHRUN, "-m", "mmla.cli", "run", str(path), "--no-progress"], env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "exp"
    assert r.stdout.count("| dataset |") == 1 and (out / "results.json").is_file()
    zs_env = json.loads((out / "zero-shot" / "env.json").read_text())
    assert sum(x["rows"] for x in zs_env["ranks"]) == 7 and min(x["rows"] for x in zs_env["ranks"]) >= 3
    assert json.loads((out / "sft-train" / "MELD" / "train_result.json").read_text())["world_size"] == 2
    assert json.loads((out / "sft" / "metrics.json").read_text())["per_dataset"]["MELD"]["n"] == 5
    one = tmp_path / "one"
    predict(PredictConfig(model=str(model), data=str(root), datasets=["MELD", "MUStARD"], out=str(one),
                          **predict_section), progress=False)
    strip = lambda rows: {(x["dataset"], x["id"]): (x["output"], x.get("clip_error")) for x in rows}  # noqa: E731
    assert strip(_rows(out / "zero-shot")) == strip(_rows(one))
    assert json.loads((out / "zero-shot" / "metrics.json").read_text()) == \
        json.loads((one / "metrics.json").read_text())
