"""The fault table: each fault a user can meet, through real `python -m mmla.cli` processes.

Every row asserts the exit status, the one-line `mmla: error:` message (no traceback), and, where a rerun
follows, that the final predictions / metrics / adapter equal an uninterrupted run's. Inference rows use the
embedded model (smollm2-135m, score mode, 2 datasets x 3 rows); training rows the tiny random Llama.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmla import errors, runs

REPO = Path(__file__).resolve().parents[1]
DATASETS, LIMIT = "MELD,MOSI", 3


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false",
            "OMP_WAIT_POLICY": "PASSIVE", **extra}


def _mmla(*args) -> list[str]:
    return [sys.executable, "-m", "mmla.cli", *map(str, args)]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=kw.pop("env", _env()), **kw)


def _predict(data_root, out, *extra) -> list[str]:
    return _mmla("predict", "--model", "smollm2-135m", "--data", data_root, "--datasets", DATASETS, "--limit", LIMIT,
                 "--mode", "score", "--threads", "1", "--no-progress", "--out", out, *extra)


def _train(model, data_root, out) -> list[str]:
    return _mmla("train", "--model", model, "--data", data_root, "--datasets", "MUStARD", "--preset", "fast",
                 "--out", out, "--no-progress", "limit=16", "max_steps=6", "save_steps=2", "save_total_limit=3",
                 "eval_steps=0", "precision=fp32", "threads=1")


def _file_size_limit(n_bytes: int):
    def limit():  # `ulimit -f` in the child; SIGXFSZ ignored so that a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return limit


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and one `mmla: error:` line (the last on stderr) holding every fragment."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("mmla: error:")]
    assert len(lines) == 1 and r.stderr.strip().splitlines()[-1] == lines[0], r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _outputs(run_dir: Path) -> dict:
    recs = [json.loads(l) for l in (run_dir / "predictions.jsonl").read_text().splitlines()]
    keys = [(r["dataset"], r["split"], r["id"]) for r in recs]
    assert len(keys) == len(set(keys)), "a sample written twice"
    return {k: r["output"] for k, r in zip(keys, recs)}


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def clean(tmp_path_factory, data_root) -> Path:
    """The uninterrupted run every rerun is compared with."""
    out = tmp_path_factory.mktemp("clean") / "run"
    r = _run(_predict(data_root, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _metrics(out)["average"]["n"] == 6 and len(_outputs(out)) == 6
    return out


# ---------------------------------------------------------------- one writer per run directory


def test_two_runs_into_one_directory_then_sigkill_and_take_over(clean, data_root, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_predict(data_root, out), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            lock = out / runs.LOCK_NAME
            if lock.exists() and lock.read_text().strip():
                break
            time.sleep(0.02)
        assert first.poll() is None, first.stderr.read()[-3000:]
        os.kill(first.pid, signal.SIGSTOP)  # the holder stays alive (and holds the lock) while we try
        second = _run(_predict(data_root, out))
        assert_one_line_error(second, f"{out}: in use by predict pid {first.pid}", "mmla predict --model smollm2-135m")
        os.kill(first.pid, signal.SIGKILL)  # the kernel drops its lock: nothing stale is left behind
    finally:
        first.kill()
        first.wait()
    third = _run(_predict(data_root, out))
    assert third.returncode == 0, third.stderr[-3000:]
    assert _outputs(out) == _outputs(clean) and _metrics(out) == _metrics(clean)


def test_lock_semantics_across_processes(tmp_path):
    """Nested claims in one process nest; another process is refused naming the holder; SIGKILL frees it."""
    out = tmp_path / "d"
    with runs.claim(out, "predict"), runs.claim(out, "predict"), runs.claim(out / "stage", "train"):
        r = _run([sys.executable, "-c", f"from mmla import runs\nwith runs.claim({str(out)!r}, 'x'): pass"])
        assert r.returncode == 1 and f"RunLocked: {out}: in use by predict pid {os.getpid()}" in r.stderr
    code = f"import time\nfrom mmla import runs\nwith runs.claim({str(out)!r}, 'train'):\n print('held', flush=True)\n" \
           " time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.RunLocked, match=f"in use by train pid {holder.pid}"):
            with runs.claim(out, "predict"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with runs.claim(out, "predict"):
            assert json.loads((out / runs.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- a full disk, then the rerun as typed


def test_file_size_limit_while_writing_predictions_then_rerun(clean, data_root, tmp_path):
    out = tmp_path / "run"
    r = _run(_predict(data_root, out), preexec_fn=_file_size_limit(2048), env=_env(PYTHONDONTWRITEBYTECODE="1"))
    assert_one_line_error(r, f"{out / 'predictions.jsonl'}: File too large")
    before = (out / "predictions.jsonl").read_text().split("\n")
    done = before[:-1]  # complete lines; the last element is the torn tail the limit cut
    assert 1 <= len(done) < 6 and before[-1] and not (out / "metrics.json").exists()

    # the same command, as typed (no --max-new-tokens), with room: resumes, never refuses its own directory
    r = _run(_predict(data_root, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming: {len(done)} of 6 done" in r.stderr
    assert (out / "predictions.jsonl").read_text().split("\n")[: len(done)] == done  # nothing done is lost
    assert _outputs(out) == _outputs(clean) and _metrics(out) == _metrics(clean)


# ---------------------------------------------------------------- bad input: one line


def test_corrupt_adapter(data_root, tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": "smollm2-135m"}))
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    tensors = {key.format(i, "A"): np.zeros((2, 576), np.float32) for i in range(30)}
    tensors.update({key.format(i, "B"): np.zeros((576, 2), np.float32) for i in range(30)})
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    st = adapter / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # a copy cut short
    r = _run(_predict(data_root, tmp_path / "run", "--adapter", adapter))
    assert_one_line_error(r, f"{adapter}: cannot load the adapter", "incomplete metadata")


def test_damaged_model_weights(tiny_llama, data_root, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # cut short, as by a full disk during a copy
    r = _run(_mmla("predict", "--model", model, "--data", data_root, "--datasets", "MOSI", "--limit", 2, "--mode",
                   "score", "--threads", 1, "--no-progress", "--out", tmp_path / "run"))
    assert_one_line_error(r, f"model '{model}': no loadable safetensors weights (Error while deserializing header")


def test_evaluate_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(_run(_mmla("evaluate", empty)), f"{empty}: no predictions in this file")
    # MMLA_DEBUG=1 shows the traceback of everything
    r = _run(_mmla("evaluate", empty), env=_env(MMLA_DEBUG="1"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError" in r.stderr


def test_evaluate_counts_each_sample_once(clean, tmp_path):
    doubled = tmp_path / "doubled.jsonl"
    lines = (clean / "predictions.jsonl").read_text()
    doubled.write_text(lines + lines)  # what two writers into one file used to leave
    r = _run(_mmla("evaluate", doubled, "--json"))
    assert r.returncode == 0, r.stderr
    assert f"{doubled}: 6 duplicate records of one (dataset, split, id, sample) dropped" in r.stderr
    res = json.loads(r.stdout)
    ref = _metrics(clean)
    assert res["duplicates_dropped"] == 6 and res["per_dataset"] == ref["per_dataset"]
    assert res["average"] == ref["average"] and res["average"]["n"] == 6


def test_duplicates_of_sampled_records_keep_each_draw(clean):
    """With K draws per row the key is (dataset, split, id, sample): a doubled file keeps every draw, once."""
    from mmla.evaluation import evaluate_samples

    recs = [json.loads(l) for l in (clean / "predictions.jsonl").read_text().splitlines()]
    draws = [{**r, "sample": k, "output": r["output"] if k == 0 else "unknown"} for k in range(2) for r in recs]
    once, twice = evaluate_samples(draws), evaluate_samples(draws + draws)
    assert once["duplicates_dropped"] == 0 and twice["duplicates_dropped"] == len(draws)
    assert twice["samples"]["k"] == 2 and twice == {**once, "duplicates_dropped": len(draws)}


def test_prompts_into_a_closed_pipe(data_root):
    cmd = " ".join(_mmla("prompts", "--data", data_root, "--dataset", "MELD"))  # ~2,600 rows: more than a pipe holds
    r = _run(["bash", "-c", f'{cmd} | head -1; echo "status=${{PIPESTATUS[0]}}" >&2'])
    assert json.loads(r.stdout.strip())["dataset"] == "MELD" and len(r.stdout.strip().splitlines()) == 1
    assert r.stderr == "status=0\n"  # quiet: no BrokenPipeError, no "Exception ignored"


def test_out_names_an_existing_file(data_root, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    assert_one_line_error(_run(_predict(data_root, out)), f"{out}: exists and is not a directory")
    assert out.read_text() == "mine\n"


def test_bug_keeps_its_traceback(capsys):
    with pytest.raises(KeyError):
        errors.run_command(lambda: {}["ACC"])  # a bug in our code: not turned into a line
    assert errors.run_command(lambda: open("/nonexistent/x.json")) == 2
    assert capsys.readouterr().err == "mmla: error: /nonexistent/x.json: No such file or directory\n"


def test_run_into_a_directory_in_use(data_root, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: x\ndata: {data_root}\ndatasets: MOSI\nstages: [zero-shot]\npredict: {{limit: 2}}\n")
    out = tmp_path / "exp"
    with runs.claim(out, "run"):
        r = _run(_mmla("run", config, f"out={out}", "--no-progress"))
    assert_one_line_error(r, f"{out}: in use by run pid {os.getpid()}")
    assert not (out / "experiment.yaml").exists()


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, data_root) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    r = _run(_train(tiny_llama, data_root, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out


def _losses(out: Path) -> list:
    return [(e["step"], e["loss"]) for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
            if "loss" in e]


def _same_training(out: Path, ref: Path) -> None:
    from safetensors.numpy import load_file

    assert json.loads((out / "train_result.json").read_text())["steps"] == 6
    assert _losses(out) == _losses(ref)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, ref))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_train_into_a_directory_in_use(tiny_llama, data_root, tmp_path):
    out = tmp_path / "run"
    with runs.claim(out, "run"):  # e.g. an `mmla run` writing there
        r = _run(_train(tiny_llama, data_root, out))
    assert_one_line_error(r, f"{out}: in use by run pid {os.getpid()}")
    assert not (out / "config.yaml").exists()


def test_sigkill_mid_save_and_corrupt_checkpoint_then_resume(trained, tiny_llama, data_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    # the state a run killed while saving step 6 leaves: no summary, no adapter, checkpoint-6 half-written ...
    (out / "train_result.json").unlink()
    shutil.rmtree(out / "adapter")
    ck = out / "checkpoints"
    (ck / "checkpoint-6" / "trainer_state.json").unlink()
    os.truncate(ck / "checkpoint-6" / "optimizer.pt", 1000)
    # ... and, before it, a checkpoint whose adapter file was cut short afterwards (a damaged copy)
    st = ck / "checkpoint-4" / "adapter_model.safetensors"
    os.truncate(st, st.stat().st_size // 2)
    r = _run(_train(tiny_llama, data_root, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ignoring {ck / 'checkpoint-6'}: trainer_state.json" in r.stderr
    assert f"ignoring {ck / 'checkpoint-4'}: adapter_model.safetensors" in r.stderr
    assert "resuming from checkpoint-2 (step 2)" in r.stderr
    _same_training(out, trained)


def test_file_size_limit_during_checkpoint_save_then_rerun(trained, tiny_llama, data_root, tmp_path):
    out = tmp_path / "run"
    limit = (trained / "checkpoints" / "checkpoint-2" / "optimizer.pt").stat().st_size - 4096  # the adapter fits
    r = _run(_train(tiny_llama, data_root, out), preexec_fn=_file_size_limit(limit),
             env=_env(PYTHONDONTWRITEBYTECODE="1"))
    assert_one_line_error(r, f"{out / 'checkpoints' / 'checkpoint-2'}: File too large")
    r = _run(_train(tiny_llama, data_root, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ignoring {out / 'checkpoints' / 'checkpoint-2'}" in r.stderr
    _same_training(out, trained)
