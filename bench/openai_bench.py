"""The openai backend against `transformers serve`: the whole `mmla predict` command at --concurrency 1 and 8.

    python bench/openai_bench.py --data DIR [--limit 16] [--max-new-tokens 16] [--continuous-batching]

Starts the server itself (the embedded model, 127.0.0.1, a free port), runs each command into a fresh run
directory, prints samples/s of the whole command (interpreter start-up, model check, requests, evaluation).
Without --continuous-batching the server runs one `generate` at a time, so concurrency only overlaps the
requests' round trips with compute; with it the server batches what is in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.environ.get("MMLA_DATA", str(ROOT.parent / "shared" / "data" / "mmla")))
    p.add_argument("--datasets", default="MELD")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--continuous-batching", action="store_true")
    a = p.parse_args()

    from mmla.models import resolve

    model = resolve("smollm2-135m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    serve = [str(Path(sys.executable).parent / "transformers"), "serve", model, "--host", "127.0.0.1", "--port",
             str(port)] + (["--continuous-batching"] if a.continuous_batching else [])
    tmp = Path(tempfile.mkdtemp(prefix="mmla-openai-bench."))
    server = subprocess.Popen(serve, stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        print(f"server: {' '.join(serve)}")
        results = {}
        for c in a.concurrency.split(","):
            out = tmp / f"c{c}"
            cmd = [sys.executable, "-m", "mmla.cli", "predict", "--backend", "openai", "--base-url",
                   f"http://127.0.0.1:{port}/v1", "--model", model, "--data", a.data, "--datasets", a.datasets,
                   "--split", "test", "--limit", str(a.limit), "--mode", "generate", "--protocol", "clean",
                   "--max-new-tokens", str(a.max_new_tokens), "--concurrency", c, "--no-progress", "--out", str(out)]
            t = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            dt = time.perf_counter() - t
            if r.returncode:
                print(r.stderr, file=sys.stderr)
                return r.returncode
            n = len((out / "predictions.jsonl").read_text().splitlines())
            results[c] = [json.loads(line)["output"] for line in (out / "predictions.jsonl").read_text().splitlines()]
            print(f"--concurrency {c:>2}: {n} samples in {dt:6.1f} s = {n / dt:5.2f} samples/s   ({' '.join(cmd[2:])})")
        same = len({tuple(sorted(v)) for v in results.values()}) == 1
        print(f"same outputs at every concurrency: {same}")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
