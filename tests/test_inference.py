"""The `mmla predict` recipe end to end: real multi-process kill/resume, the embedded model, run records."""

import json
import os
import signal
import subprocess
import sys
import time

from mmla.inference import PredictConfig, predict

DATASETS = "MELD,MOSI,MUStARD"


def _predict_cmd(model, data_root, out, limit=10, batch=2, extra=()):
    return [sys.executable, "-m", "mmla.cli", "predict", "--model", str(model), "--data", str(data_root),
            "--datasets", DATASETS, "--limit", str(limit), "--batch-size", str(batch), "--max-new-tokens", "8",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_sigkill_halfway_then_resume(tmp_path, tiny_llama, data_root):
    total = 30  # 3 datasets x 10 rows
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_predict_cmd(tiny_llama, data_root, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    preds = killed / "predictions.jsonl"
    deadline = time.time() + 300
    while len(_lines(preds)) < total // 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _lines(preds)
    assert total // 2 <= len(first) < total
    assert not (killed / "metrics.json").exists()

    r = subprocess.run(_predict_cmd(tiny_llama, data_root, killed), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    done_before = len([l for l in first if l.endswith("}")])
    assert f"resuming: {done_before} of {total} done" in r.stderr
    final = _lines(preds)
    assert final[:done_before] == first[:done_before]  # finished work is kept, not redone
    keys = [(j["dataset"], j["id"]) for j in map(json.loads, final)]
    assert len(keys) == len(set(keys)) == total

    clean = tmp_path / "clean"
    r = subprocess.run(_predict_cmd(tiny_llama, data_root, clean), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((clean / "metrics.json").read_text())
    by_key = lambda p: {(j["dataset"], j["id"]): j["output"] for j in map(json.loads, _lines(p))}
    assert by_key(preds) == by_key(clean / "predictions.jsonl")


def test_run_directory_record(tmp_path, tiny_llama, data_root):
    out = tmp_path / "run"
    res = predict(PredictConfig(model=str(tiny_llama), data=str(data_root), datasets=["MOSI"], limit=4,
                                max_new_tokens=4, out=str(out)), progress=False)
    for f in ("config.yaml", "env.json", "predictions.jsonl", "metrics.json"):
        assert (out / f).is_file(), f
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["transformers"] and "git_revision" in env
    rec = json.loads(_lines(out / "predictions.jsonl")[0])
    assert set(rec) >= {"dataset", "split", "id", "text", "label", "prompt", "output", "pred"}
    assert res["per_dataset"]["MOSI"]["n"] == 4
    # a different config refuses to resume into the same directory
    import pytest

    with pytest.raises(ValueError, match="made with mode="):
        predict(PredictConfig(model=str(tiny_llama), data=str(data_root), datasets=["MOSI"], limit=4,
                              max_new_tokens=4, mode="score", out=str(out)), progress=False)


def test_embedded_model_score_mode_never_unparsed(tmp_path, data_root):
    res = predict(PredictConfig(model="smollm2-135m", data=str(data_root), datasets=["MELD", "MELD-DA", "MOSI"],
                                limit=4, mode="score", protocol="clean", out=str(tmp_path / "s")), progress=False)
    assert all(m["unparsed"] == 0.0 for m in res["per_dataset"].values())
    assert res["average"]["n"] == 12
    # each row keeps its candidates' probabilities (task label order); the chosen answer is the most probable
    from mmla.tasks import get_task

    for line in _lines(tmp_path / "s" / "predictions.jsonl"):
        rec = json.loads(line)
        labels = [l.lower() for l in get_task(rec["dataset"]).labels]
        assert len(rec["probs"]) == len(labels) and abs(sum(rec["probs"]) - 1) < 1e-4
        assert labels[max(range(len(labels)), key=rec["probs"].__getitem__)] == rec["pred"]
    for m in (*res["per_dataset"].values(), res["average"]):
        assert 0 <= m["calibration"]["ECE"] <= 100 and 0 <= m["calibration"]["Brier"] <= 2
        assert m["ci95"]["ACC"][0] <= m["ACC"] <= m["ci95"]["ACC"][1]


def test_readme_commands_rerun_as_typed(tmp_path, data_root):
    """The README's predict commands, typed as there (no --max-new-tokens), run twice into the same directory:
    the second run resumes with nothing to do and ends with the same metrics."""
    for mode in ("score", "generate"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "mmla.cli", "predict", "--model", "smollm2-135m", "--data", str(data_root),
               "--datasets", "MELD,MOSI", "--split", "test", "--limit", "3", "--mode", mode, "--batch-size", "32",
               "--threads", "2", "--out", str(out)]
        if mode == "generate":  # the official protocol allows 1024 tokens: keep the run short with the clean one
            cmd += ["--protocol", "clean"]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        assert "resuming: 6 of 6 done, 0 to go" in again.stderr
        assert json.loads((out / "metrics.json").read_text()) == metrics
        assert len(_lines(out / "predictions.jsonl")) == 6


def test_collection_resumes_before_the_model_loads(tiny_llama, data_root, tmp_path, monkeypatch):
    """The `mmla` process pauses the cyclic GC for its imports (runs.pause_gc); predict resumes it before it loads
    the model, so the model is not frozen and a later stage that drops it frees it."""
    import gc

    from mmla import inference, models, runs

    seen = {}
    load = models.load_model

    def spy(*args, **kwargs):
        seen["enabled_at_load"] = gc.isenabled()
        return load(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", spy)
    monkeypatch.setattr(inference, "load_model", spy, raising=False)
    runs.pause_gc()
    try:
        cfg = inference.PredictConfig(model=str(tiny_llama), data=str(data_root), datasets=["MOSI"], split="test",
                                      limit=2, mode="score", out=str(tmp_path / "run"))
        inference.predict(cfg, progress=False)
        assert seen == {"enabled_at_load": True} and gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.enable()
        gc.unfreeze()


def _sampling_model(tiny_llama, tmp_path):
    """The tiny model with Qwen2-Instruct's shipped sampling settings in its generation config."""
    import shutil

    from transformers import GenerationConfig

    d = tmp_path / "sampling-model"
    shutil.copytree(tiny_llama, d)
    gc = GenerationConfig.from_pretrained(d)
    gc.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    gc.save_pretrained(d)
    return d


def test_sampled_predictions_survive_batching_and_sigkill(tmp_path, tiny_llama, data_root):
    """The official protocol samples (the checkpoint's settings): a row's K answers are the same at batch size 1
    and 32 and after a SIGKILL + resume; metrics carry the majority vote and mean +/- std over the draws. (The tiny
    model names no paper row by itself: --paper-model picks Qwen2's, whose script samples with the checkpoint's
    generation config.)"""
    model = _sampling_model(tiny_llama, tmp_path)
    extra = ("--protocol", "official", "--paper-model", "Qwen2-0.5B", "--num-samples", "3", "--seed", "7")
    runs = {}
    for batch in (1, 32):
        out = tmp_path / f"b{batch}"
        r = subprocess.run(_predict_cmd(model, data_root, out, limit=4, batch=batch, extra=extra),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[batch] = {(j["dataset"], j["id"], j["sample"]): j["output"] for j in map(json.loads,
                                                                                         _lines(out / "predictions.jsonl"))}
    assert runs[1] == runs[32] and len(runs[1]) == 36
    assert len(set(runs[1].values())) > 12  # the draws differ
    metrics = json.loads((tmp_path / "b32" / "metrics.json").read_text())
    assert metrics["samples"]["k"] == 3 and set(metrics["samples"]["average"]["ACC"]) == {"mean", "std"}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_predict_cmd(model, data_root, killed, limit=4, batch=2, extra=extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    preds = killed / "predictions.jsonl"
    deadline = time.time() + 300
    while len(_lines(preds)) < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(_predict_cmd(model, data_root, killed, limit=4, batch=2, extra=extra), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resumed = {(j["dataset"], j["id"], j["sample"]): j["output"] for j in map(json.loads, _lines(preds))}
    assert resumed == runs[1]
    assert json.loads((killed / "metrics.json").read_text()) == metrics


def test_a_prompt_longer_than_the_context_is_cut_named_and_marked(data_root, tmp_path, capsys):
    """A model with a 256-token context: an utterance far longer keeps only the end that fits (prompt + answer
    tokens), the row is named on stderr in one line and marked in predictions.jsonl and env.json; rows that fit are
    untouched. With a context the prompt alone overruns, every row is refused, named and marked."""
    from mmla.tiny import build_tiny_model

    rows = (data_root / "MELD" / "test.tsv").read_text(encoding="utf-8").splitlines()[:4]
    long_id, long_text = "9999_0", " ".join(f"word{i}" for i in range(400))
    root = tmp_path / "data"
    (root / "MELD").mkdir(parents=True)
    (root / "MELD" / "test.tsv").write_text("\n".join(rows + [f"{long_id}\t{long_text}\tjoy"]) + "\n", encoding="utf-8")
    model = build_tiny_model("llama", tmp_path / "short", max_positions=256)
    for mode in ("generate", "score"):
        out = tmp_path / mode
        cfg = PredictConfig(model=str(model), data=str(root), datasets=["MELD"], mode=mode, max_new_tokens=8,
                            threads=1, out=str(out))
        predict(cfg, progress=False)
        err = [line for line in capsys.readouterr().err.splitlines() if "longer than the model's context" in line]
        assert len(err) == 1 and err[0].endswith(f"1 rows: MELD {long_id}"), err
        recs = {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
        cut = recs[long_id]
        kept = cut["context"]["words_kept"]
        assert cut["context"]["words"] == 400 and 0 < kept < 400
        assert " ".join(f"word{i}" for i in range(400 - kept, 400)) in cut["prompt"] and "word0 " not in cut["prompt"]
        assert cut["text"] == long_text and "output" in cut
        assert all("context" not in r for i, r in recs.items() if i != long_id) and len(recs) == 4
        env = json.loads((out / "env.json").read_text())
        assert env["past_context"] == [f"MELD {long_id}"] and env["context_length"] == 256
        assert env["context_policy"].startswith("cut the utterance")

    tiny = build_tiny_model("llama", tmp_path / "tiny", max_positions=64)
    out = tmp_path / "refused"
    predict(PredictConfig(model=str(tiny), data=str(root), datasets=["MELD"], max_new_tokens=8, threads=1,
                          out=str(out)), progress=False)
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["output"] == "" and "refused" in r["context"] for r in recs)
    assert len(json.loads((out / "env.json").read_text())["past_context"]) == 4
