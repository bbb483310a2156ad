"""Concurrent multi-LoRA SFT: the same adapters, losses and selection as separate runs (text, and video on tiny
Qwen2-VL with per-dataset paper presets); SIGKILL + resume through `mmla train --concurrent`; refusals; mmla run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmla import multilora, training
from mmla.runs import read_run_config
from mmla.training import make_config

REPO = Path(__file__).resolve().parents[1]
SIZES = {"MUStARD": 12, "MOSI": 20, "MELD": 28}  # train rows: 3, 5 and 7 optimiser steps per epoch at batch 1 x 4


@pytest.fixture(scope="module")
def small_root(data_root, tmp_path_factory) -> Path:
    """The first rows of three real datasets, so that their adapters train for different numbers of steps."""
    root = tmp_path_factory.mktemp("mmla-small")
    for ds, n in SIZES.items():
        (root / ds).mkdir()
        for split, rows in (("train", n), ("dev", 6), ("test", 4)):
            lines = (data_root / ds / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
            (root / ds / f"{split}.tsv").write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return root


def _values(model, root, out, **extra):
    # the paper preset (lr 5e-5, batch 1 x accumulation 4, cosine, grad norm 1.0, r16/a32), fp32, 2 epochs
    return {"model": str(model), "data": str(root), "datasets": ",".join(SIZES), "preset": "paper",
            "num_epochs": 2, "eval_steps": 0, "save_steps": 2, "precision": "fp32", "threads": 1, "out": str(out),
            **extra}


def _log(d: Path) -> list[dict]:
    return [json.loads(l) for l in (d / "train_log.jsonl").read_text().splitlines()]


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter" / "adapter_model.safetensors"))


def _adapter_config(d: Path) -> dict:
    """adapter_config.json; peft writes a resolved `all-linear` as a list in set order, so compare it sorted."""
    c = json.loads((d / "adapter" / "adapter_config.json").read_text())
    if isinstance(c["target_modules"], list):
        c["target_modules"] = sorted(c["target_modules"])
    return c


def _rel(a: dict, b: dict, ref: dict | None = None) -> float:
    """||a - b|| / ||b|| over all of an adapter's tensors; with `ref` (the initial weights): relative to the trained
    change ||b - ref||, a far stricter measure (A barely moves from its random init)."""
    assert a.keys() == b.keys()
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    den = sum(((b[k] - (ref[k] if ref else 0)) ** 2).sum() for k in a) ** 0.5
    return float(num / den)


@pytest.fixture(scope="module")
def initial(tiny_llama) -> dict:
    """The LoRA weights a separate run starts from (set_seed, then get_peft_model)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import set_seed

    from mmla.models import load_model

    from mmla.inputs import make_inputs

    model, tok = load_model(str(tiny_llama), dtype="float32", device="cpu")
    set_seed(42)
    cfg = make_config({"datasets": "MELD"})
    model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                             target_modules=make_inputs(model, tok).lora_target,
                                             task_type="CAUSAL_LM"))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def runs(tiny_llama, small_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("multilora")
    res = {}
    for mode in ("separate", "concurrent"):
        cfg = make_config(_values(tiny_llama, small_root, out / mode, concurrent=mode == "concurrent"))
        res[mode] = _train(mode, cfg)
    return out, res


def _train(mode: str, cfg, **kw) -> dict:
    """What mmla.cli does: training.train, which honours concurrent itself (mmla.multilora), else one after another."""
    assert cfg.concurrent == (mode == "concurrent")
    return training.train(cfg, progress=False, **kw)


def test_concurrent_adapters_equal_separate_runs(runs, initial):
    out, res = runs
    assert {ds: r["steps"] for ds, r in res["concurrent"].items()} == {"MUStARD": 6, "MOSI": 10, "MELD": 14}
    for ds in SIZES:
        sep, con = out / "separate" / ds, out / "concurrent" / ds
        # the adapter after training: an ordinary peft directory, the same files and config as a separate run's
        assert sorted(p.name for p in (con / "adapter").iterdir()) == sorted(p.name for p in (sep / "adapter").iterdir())
        assert _adapter_config(con) == _adapter_config(sep)
        assert _rel(_weights(con), _weights(sep)) < 1e-5, ds
        # the trained change too (float rounding differs with the batch shape; Adam amplifies it on the tiny
        # gradients of a random-init model: about 5e-6 here after 14 steps)
        assert _rel(_weights(con), _weights(sep), initial) < 2e-5, ds
        # the loss curve, learning rate, grad norm and epoch, step by step
        a, b = _log(sep), _log(con)
        assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, res["separate"][ds]["steps"] + 1))
        for x, y in zip(a, b):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (ds, x["step"])
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), (ds, x["step"])
            assert (y["lr"], y["epoch"]) == pytest.approx((x["lr"], x["epoch"]), rel=1e-9)
        for name in ("config.yaml", "env.json", "train_result.json"):
            assert (con / name).is_file()
        assert res["concurrent"][ds]["epochs"] == res["separate"][ds]["epochs"] == 2.0
        env = json.loads((con / "env.json").read_text())
        assert env["train_rows"] == SIZES[ds] and env["concurrent_with"] == [d for d in SIZES if d != ds]
    # datasets finish at different steps; the batch then holds the rest
    joint = [json.loads(l) for l in (out / "concurrent" / "joint_log.jsonl").read_text().splitlines()]
    assert [r["adapters"] for r in joint] == [3] * 6 + [2] * 4 + [1] * 4
    assert not (out / "concurrent" / "checkpoint").exists()


def test_any_grouping_of_the_rows_gives_the_same_adapters(runs, initial, tiny_llama, small_root, tmp_path):
    """concurrent_rows=5: forwards of 5 rows, an adapter's rows split across forwards and unequal slices."""
    out, _ = runs
    _train("concurrent", make_config(_values(tiny_llama, small_root, tmp_path, concurrent=True, concurrent_rows=5)))
    for ds in SIZES:
        assert _rel(_weights(tmp_path / ds), _weights(out / "separate" / ds), initial) < 2e-5, ds
        assert [e["loss"] for e in _log(tmp_path / ds)] == pytest.approx(
            [e["loss"] for e in _log(out / "separate" / ds)], rel=1e-5)


@pytest.mark.parametrize("rows", [(2, 2, 2), (1, 3, 2)])  # equal slices: one batched matmul; unequal: per slice
def test_routed_lora_layer_equals_peft_mixed_batch(tiny_llama, rows):
    """Router's update on a plain LoRA layer == peft's own mixed-batch forward (adapter_names), values and
    gradients of every adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear

    from mmla.models import load_model

    model, _ = load_model(str(tiny_llama), dtype="float32", device="cpu")
    for i in range(3):
        cfg = LoraConfig(r=4, lora_alpha=8 * (i + 1), target_modules=["q_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg, adapter_name="a0") if i == 0 else (model.add_adapter(f"a{i}", cfg) or model)
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    torch.manual_seed(0)
    for i in range(3):  # B starts at zero: give every adapter an update to route
        torch.nn.init.normal_(layer.lora_B[f"a{i}"].weight)
    x = torch.randn(sum(rows), 5, layer.in_features)
    spans, names, k = [], [], 0
    for i, n in enumerate(rows):
        spans.append((f"a{i}", k, k + n))
        names += [f"a{i}"] * n
        k += n
    params = [p for n, p in layer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)

    def run(forward):
        for p in params:
            p.grad = None
        y = forward()
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), [p.grad.clone() for p in params]

    router = multilora.Router()
    peft_forward = layer.forward
    routed = router._forward(peft_forward).__get__(layer)
    router.spans = spans
    ours = run(lambda: routed(x))
    theirs = run(lambda: peft_forward(x, adapter_names=names))
    for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):  # float rounding apart (summation order)
        assert float((a - b).norm() / b.norm()) < 1e-6


def test_saved_adapter_loads_with_peft(runs, tiny_llama):
    import torch

    from mmla.models import load_model

    out, _ = runs
    model, _ = load_model(str(tiny_llama), adapter=str(out / "concurrent" / "MOSI" / "adapter"), dtype="float32",
                          device="cpu", merge=False)  # the LoRA tensors as peft loads them
    sd = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    saved = _weights(out / "concurrent" / "MOSI")
    assert len(saved) == 28 and all(torch.equal(sd[k], v) for k, v in saved.items())


def test_dev_evaluation_and_selection_match_separate_runs(tiny_llama, small_root, tmp_path):
    extra = dict(datasets="MUStARD,MOSI", num_epochs=1, eval_steps=2, eval_limit=4, learning_rate="2e-3")
    for mode in ("separate", "concurrent"):
        _train(mode, make_config(_values(tiny_llama, small_root, tmp_path / mode, concurrent=mode == "concurrent",
                                         **extra)))
    for ds in ("MUStARD", "MOSI"):
        sep, con = tmp_path / "separate" / ds, tmp_path / "concurrent" / ds
        ev = [[{k: v for k, v in r.items() if k != "eval_runtime"} for r in _log(d) if "eval_accuracy" in r]
              for d in (sep, con)]
        assert [r["step"] for r in ev[0]] == ([2, 3] if ds == "MUStARD" else [2, 4, 5])
        assert ev[1] == ev[0]
        best = [json.loads((d / "best.json").read_text()) for d in (sep, con)]
        assert best[1] == best[0]
        assert _rel(_weights(con), _weights(sep)) < 1e-5


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}


def _cmd(model, root, out):
    return [sys.executable, "-m", "mmla.cli", "train", "--concurrent", "--model", str(model), "--data", str(root),
            "--datasets", ",".join(SIZES), "--out", str(out), "--no-progress", "num_epochs=2", "eval_steps=0",
            "save_steps=2", "precision=fp32", "threads=1"]


def test_sigkill_then_resume_ends_with_the_same_adapters(runs, initial, tiny_llama, small_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny_llama, small_root, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    joint = json.loads(state.read_text())["joint_step"]
    assert joint < 14 and not (out / "concurrent_result.json").exists()

    r = subprocess.run(_cmd(tiny_llama, small_root, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from joint step {joint} " in r.stderr
    done, _ = runs
    for ds in SIZES:
        assert [e["step"] for e in _log(out / ds)] == list(range(1, 2 * -(-SIZES[ds] // 4) + 1))  # nothing twice
        assert _rel(_weights(out / ds), _weights(done / "concurrent" / ds), initial) < 2e-5, ds
        assert [e["loss"] for e in _log(out / ds)] == pytest.approx(
            [e["loss"] for e in _log(done / "concurrent" / ds)], rel=1e-5)


def test_run_directory_refuses_another_dataset_set_or_preset(runs, tiny_llama, small_root):
    out, _ = runs
    con = out / "concurrent"
    for extra, message in (({"datasets": "MUStARD,MOSI"}, re.escape("this run directory was made with datasets="
                                                                    "['MUStARD', 'MOSI', 'MELD'], not ['MUStARD', 'MOSI']")),
                           ({"preset": "fast"}, "this run directory was made with preset='paper', not 'fast'")):
        with pytest.raises(ValueError, match=message) as e:
            training.train(make_config(_values(tiny_llama, small_root, con, concurrent=True, **extra)), progress=False)
        assert "\n" not in str(e.value)
    for extra, message in (({"batching": "packed"}, "not packed"), ({"group_by_length": True}, "group_by_length"),
                           ({"datasets": "all"}, "for SFT .* not setting=it")):
        with pytest.raises(ValueError, match=message) as e:
            training.train(make_config(_values(tiny_llama, small_root, out / "x", concurrent=True, **extra)),
                            progress=False)
        assert "\n" not in str(e.value)
    assert not (out / "x").exists()


def test_experiment_sft_concurrent(tiny_llama, small_root, tmp_path):
    import yaml

    from mmla.experiment import load_experiment, run_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": str(tiny_llama), "data": str(small_root), "out": str(tmp_path / "out"),
        "datasets": "MUStARD,MOSI", "stages": ["sft"], "predict": {"limit": 2, "max_new_tokens": 2, "threads": 1},
        "train": {"limit": 8, "max_steps": 2, "eval_steps": 0, "threads": 1}, "sft": {"concurrent": True}}))
    run_experiment(load_experiment(str(path), []), progress=False)
    out = tmp_path / "out"
    for ds in ("MUStARD", "MOSI"):
        result = json.loads((out / "sft-train" / ds / "train_result.json").read_text())
        assert result["concurrent_with"] == [d for d in ("MUStARD", "MOSI") if d != ds] and result["steps"] == 2
    assert (out / "sft-train" / "concurrent_result.json").is_file() and (out / "sft" / "metrics.json").is_file()


# ---------------------------------------------------------------- video: tiny Qwen2-VL, per-dataset paper presets


def test_video_adapters_equal_separate_runs(videos_dir, tmp_path):
    """Video rows of two datasets share each micro-batch (media tensors concatenated by the training collator, the
    language model's LoRA layers routed per row); each adapter keeps its dataset's row of the Qwen2-VL-7B paper table
    (MELD: lr 1.1e-4, warmup 0.1, batch 16 x 8; MUStARD: lr 1e-3, warmup 0.2, batch 2 x 2) and equals a separate
    run's: weights, loss curve, dev evaluation and selection."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from test_video import write_clip
    from transformers import set_seed
    from video_fixtures import make_video_root

    from mmla.inputs import make_inputs
    from mmla.models import load_model
    from mmla.tiny import build_tiny_video_model
    from mmla.video import FrameCache

    model_dir = build_tiny_video_model("qwen2-vl", tmp_path / "tiny-qwen2-vl")
    root = make_video_root(tmp_path / "data", videos_dir)  # MELD train: 4 clips and one row whose clip is missing
    rows = {"train": [(f"3_{i}", "Oh, sure." if i % 2 else "Thanks.", "sarcastic" if i % 2 else "sincere")
                      for i in range(6)], "dev": [("4_0", "Right.", "sarcastic"), ("4_1", "Nice.", "sincere")]}
    for split, rs in rows.items():
        (root / "MUStARD" / f"{split}.tsv").write_text("id\ttext\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rs))
        for k, (i, _, _) in enumerate(rs):
            write_clip(root / "MUStARD" / "video" / f"MUStARD_{i}.mp4", seed=40 + k + 10 * (split == "dev"))
    values = {"model": str(model_dir), "data": str(root), "datasets": "MELD,MUStARD", "preset": "paper",
              "num_epochs": 2, "eval_steps": 2, "eval_limit": 2, "save_steps": 100, "precision": "fp32",
              "device": "cpu", "threads": 1}
    res = {}
    for mode in ("separate", "concurrent"):
        cfg = make_config({**values, "out": str(tmp_path / mode), "concurrent": mode == "concurrent"})
        res[mode] = _train(mode, cfg, frame_cache=FrameCache(tmp_path / "frames"))
    assert {ds: r["steps"] for ds, r in res["concurrent"].items()} == {"MELD": 2, "MUStARD": 4}

    model, proc = load_model(str(model_dir), dtype="float32", device="cpu", modality="video")
    cfg = make_config({**values, "datasets": "MELD"})
    set_seed(42)  # the LoRA weights a separate run starts from
    model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                             target_modules=make_inputs(model, proc, training.frames_of(cfg))
                                             .lora_target, task_type="CAUSAL_LM"))
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    for ds in ("MELD", "MUStARD"):
        sep, con = tmp_path / "separate" / ds, tmp_path / "concurrent" / ds
        w = _weights(con)
        assert w and all("language_model" in k and "visual" not in k for k in w)  # vision tower frozen
        assert any(not torch.equal(w[k], initial[k]) for k in w), ds  # it trained
        assert _adapter_config(con) == _adapter_config(sep)
        assert _rel(w, _weights(sep)) < 1e-5, ds
        assert _rel(w, _weights(sep), initial) < 2e-5, ds
        a, b = _log(sep), _log(con)
        steps = [r for r in a if "loss" in r]
        assert [r["step"] for r in steps] == [r["step"] for r in b if "loss" in r] == \
            list(range(1, res["separate"][ds]["steps"] + 1))
        for x, y in zip(steps, [r for r in b if "loss" in r]):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (ds, x["step"])
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), (ds, x["step"])
            assert (y["lr"], y["epoch"]) == pytest.approx((x["lr"], x["epoch"]), rel=1e-9)
        ev = [[{k: v for k, v in r.items() if k != "eval_runtime"} for r in log if "eval_accuracy" in r]
              for log in (a, b)]
        assert [r["step"] for r in ev[0]] == ([2] if ds == "MELD" else [2, 4]) and ev[1] == ev[0]
        assert json.loads((con / "best.json").read_text()) == json.loads((sep / "best.json").read_text())
        run_cfg, sep_cfg = ({k: v for k, v in read_run_config(d / "config.yaml").items() if k not in ("out", "concurrent")}
                            for d in (con, sep))
        assert run_cfg == sep_cfg  # the paper table's row of its dataset, the frame setting too
        assert (run_cfg["learning_rate"], run_cfg["warmup_ratio"], run_cfg["per_device_batch_size"],
                run_cfg["gradient_accumulation_steps"]) == ((1.1e-4, 0.1, 16, 8) if ds == "MELD" else (1e-3, 0.2, 2, 2))
        env = json.loads((con / "env.json").read_text())
        assert env["frame_setting"]["name"] == "official-train"
        assert (env["train_rows"], env["train_missing_clips"], env["dev_rows"]) == \
            ((4, 1, 2) if ds == "MELD" else (6, 0, 2))
        assert res["concurrent"][ds]["train_missing_clips"] == res["separate"][ds]["train_missing_clips"]
