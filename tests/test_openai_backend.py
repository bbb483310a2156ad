"""The openai backend against real servers on 127.0.0.1: `transformers serve` with the embedded model (and the same
server behind a key check for 401). Greedy answers through the API equal the local engine's; a server killed
mid-run ends the run with one line, and the rerun after a restart completes it with the same metrics."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from mmla.models import resolve

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = os.environ.get("MMLA_DATA") or str(ROOT.parent / "shared" / "data" / "mmla")
LIMIT, TOKENS = 4, 12  # per dataset: 8 samples of MELD and MOSI

pytestmark = pytest.mark.skipif(not os.environ.get("CI") and shutil.which("transformers", path=str(BIN)) is None and
                                shutil.which("transformers") is None,
                                reason="transformers[serving] is not installed (make setup installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "MMLA_DATA": DATA}
    env.update(extra)
    return env


class Server:
    """A real server process in its own process group, started and killed by the test."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.port = _free_port()
        self.argv, self.log, self.env = argv + ["--host", "127.0.0.1", "--port", str(self.port)], log, env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Server:
        self.proc = subprocess.Popen(self.argv, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     env=self.env or _env(), start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"server did not come up: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def model_dir() -> str:
    return resolve("smollm2-135m")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # The exact command a user runs (no dtype flag: the checkpoint is fp32, and "auto" keeps it).
    s = Server([str(BIN / "transformers"), "serve", model_dir], tmp_path_factory.mktemp("serve") / "log").start()
    yield s
    s.kill()


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _predict(out: Path, *args: str, popen: bool = False, limit: int = LIMIT):
    """`mmla predict` in this process (the CLI's own error handling, no interpreter start-up), or as a process."""
    argv = ["predict", "--data", DATA, "--datasets", "MELD,MOSI", "--split", "test", "--limit", str(limit),
            "--protocol", "clean", "--max-new-tokens", str(TOKENS), "--no-progress", "--out", str(out), *args]
    if popen:
        return subprocess.Popen([sys.executable, "-m", "mmla.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env())
    from mmla.cli import main

    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(argv)
    return Result(rc, o.getvalue(), e.getvalue())


def _api(server: Server, model: str, *args: str) -> list[str]:
    return ["--backend", "openai", "--base-url", server.url, "--model", model, "--mode", "generate", *args]


def _outputs(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    keys = [(r["dataset"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate predictions"
    return {k: r["output"] for k, r in zip(keys, rows)}


def test_greedy_matches_local_engine_and_resumes_after_server_dies(server, model_dir, tmp_path):
    local = _predict(tmp_path / "local", "--model", model_dir, "--dtype", "float32", "--mode", "generate")
    assert local.returncode == 0, local.stderr
    full = _predict(tmp_path / "api", *_api(server, model_dir, "--concurrency", "4"))
    assert full.returncode == 0, full.stderr
    want = _outputs(tmp_path / "local")
    assert len(want) == 2 * LIMIT
    assert _outputs(tmp_path / "api") == want  # greedy over the API == the local engine, every row
    env = json.loads((tmp_path / "api" / "env.json").read_text())
    assert env["server"]["server_model"] == model_dir and env["server"]["base_url"] == server.url
    assert env["decoding"]["do_sample"] is False and env["decoding"]["max_new_tokens"] == TOKENS

    # The server dies halfway: one line, nothing finished is lost.
    run = tmp_path / "killed"
    proc = _predict(run, *_api(server, model_dir, "--concurrency", "2"), popen=True)
    pred = run / "predictions.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pred.exists() and len(pred.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    server.kill()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"mmla: error: {server.url} (model '{model_dir}'): no answer after 5 retries"), stderr
    partial = _outputs(run)
    assert 3 <= len(partial) < 2 * LIMIT
    assert all(want[k] == v for k, v in partial.items())

    server.start()  # same port
    rerun = _predict(run, *_api(server, model_dir, "--concurrency", "2"))
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {len(partial)} of {2 * LIMIT} done" in rerun.stderr
    assert _outputs(run) == want  # complete, no duplicates
    assert json.loads((run / "metrics.json").read_text()) == json.loads((tmp_path / "api" / "metrics.json").read_text())


def _one_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_unknown_model_wrong_url_and_score_mode_are_one_line(server, model_dir, tmp_path):
    line = _one_line(_predict(tmp_path / "a", *_api(server, "gpt-nope")))
    assert line == f"mmla: error: {server.url}: model 'gpt-nope' is not served there (it serves: {model_dir})"

    r = _predict(tmp_path / "b", "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.port}/nope/v1",
                 "--model", model_dir)
    line = _one_line(r)
    assert f"http://127.0.0.1:{server.port}/nope/v1 (model '{model_dir}'): 404 not found" in line

    # transformers serve ignores echo/logprobs and takes no token-id prompts: score mode says so, in one line.
    line = _one_line(_predict(tmp_path / "c", "--backend", "openai", "--base-url", server.url, "--model", model_dir,
                              "--mode", "score"))
    assert "gives no prompt log-probabilities" in line and server.url in line
    assert not (tmp_path / "c" / "predictions.jsonl").exists() or not (tmp_path / "c" / "predictions.jsonl").read_text()


def test_api_key_from_env_only_and_401(model_dir, tmp_path, monkeypatch):
    key = "sk-mmla-test-0123456789"
    keyed = Server([sys.executable, str(ROOT / "tests" / "keyed_server.py"), model_dir], tmp_path / "log",
                   env=_env(MMLA_TEST_SERVER_KEY=key)).start()
    try:
        line = _one_line(_predict(tmp_path / "nokey", *_api(keyed, model_dir)))
        assert line.startswith(f"mmla: error: {keyed.url} (model '{model_dir}'): 401 unauthorized, no key")
        monkeypatch.setenv("MY_KEY", "sk-wrong")
        line = _one_line(_predict(tmp_path / "bad", *_api(keyed, model_dir, "--api-key-env", "MY_KEY")))
        assert line.startswith(f"mmla: error: {keyed.url} (model '{model_dir}'): 401 unauthorized, the key in $MY_KEY")
        line = _one_line(_predict(tmp_path / "unset", *_api(keyed, model_dir, "--api-key-env", "MMLA_UNSET_VAR")))
        assert line == "mmla: error: --api-key-env MMLA_UNSET_VAR: the environment variable MMLA_UNSET_VAR is not set or empty"

        run = tmp_path / "ok"
        monkeypatch.setenv("MY_KEY", key)
        r = _predict(run, *_api(keyed, model_dir, "--api-key-env", "MY_KEY"), limit=1)
        assert r.returncode == 0, r.stderr
        assert len(_outputs(run)) == 2
        for f in run.iterdir():  # the key is never written: not in config.yaml, env.json (argv) or predictions
            assert key not in f.read_text(), f
        env = json.loads((run / "env.json").read_text())
        assert env["server"]["api_key_env"] == "MY_KEY"
    finally:
        keyed.kill()


def test_rank_from_prompt_logprobs_equals_engine_score(model_dir):
    """What score mode does with a server's echo log-probabilities, fed the local model's own per-token
    log-probabilities, picks and scores exactly as mmla.engine.score."""
    import torch

    from mmla import engine
    from mmla.data import load_split
    from mmla.models import load_model
    from mmla.backends.openai import rank
    from mmla.prompts import candidates, chat_text, render

    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    cases = []
    for ds in ("MELD", "MELD-DA", "MOSI"):  # MELD-DA has labels that share first tokens: no shortcut there
        e = load_split(Path(DATA), ds, "test").examples[0]
        cases.append((chat_text(tok, render(ds, "clean", e.text), "clean"), candidates(ds, "clean")))
    want = engine.score(model, tok, [p for p, _ in cases], [c for _, c in cases], batch_size=4)
    for (prompt, cands), w in zip(cases, want):
        ids = tok([prompt + c for c in cands], add_special_tokens=False)["input_ids"]
        lps = []
        for s in ids:  # what a server returns with echo=True, logprobs=1: log p(token t | tokens before t)
            with torch.inference_mode():
                logp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
            lps.append([None] + [logp[t - 1, s[t]].item() for t in range(1, len(s))])
        got = rank(ids, lps)
        assert got.best == w.best
        assert got.scores == pytest.approx(w.scores, abs=1e-3)


def test_video_messages_carry_the_runs_frames(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from mmla import video
    from mmla.backends.openai import OpenAIBackendError, video_messages
    from mmla.prompts import chat_messages

    clip = sorted((ROOT.parent / "shared" / "data" / "videos").glob("*.mp4"))[0]
    setting = video.frame_setting("official-infer")
    frames = video.load_frames(clip, setting)
    msgs = chat_messages("What is the emotion?", "official", "qwen")
    out = video_messages(msgs, frames=frames, video_input="frames-png")
    assert out[0] == msgs[0] and msgs[-1]["content"] == "What is the emotion?"  # input untouched
    parts = out[-1]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * setting.num_frames + ["text"]
    assert parts[-1]["text"] == "What is the emotion?"
    for part, frame in zip(parts, frames.array):  # PNG is lossless: the very pixels the local path would use
        head, data = part["image_url"]["url"].split(",", 1)
        assert head == "data:image/png;base64"
        assert (np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))) == frame).all()
    jpeg = video_messages(msgs, frames=frames)[-1]["content"][0]["image_url"]["url"]
    assert jpeg.startswith("data:image/jpeg;base64,")
    url = video_messages(msgs, clip=clip, video_input="video_url")[-1]["content"][0]
    assert url["type"] == "video_url"
    assert base64.b64decode(url["video_url"]["url"].split(",", 1)[1]) == clip.read_bytes()
    with pytest.raises(OpenAIBackendError, match="video input must be one of"):
        video_messages(msgs, frames=frames, video_input="gif")
