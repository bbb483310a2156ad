"""bench/gpu.sh, the script a lent GPU runs, dry-run on the CPU with tiny models: every item runs and the one JSON
holds each item's figures, so the script cannot rot between devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ITEMS = ("e2e", "greedy", "train", "concurrent", "video")


def test_gpu_script_dry_run(tmp_path, data_root, videos_dir):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "MMLA_DATA": str(data_root), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--videos", str(videos_dir), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["errors"] == {}
    assert set(res["items"]) == set(ITEMS) and all(res["seconds"][k] > 0 for k in ITEMS)
    s = res["summary"]
    assert s["command_over_prefill"] > 0 and s["prefill_samples_per_s"] > 0
    assert 0 < s["greedy_share_of_prefill"]
    assert set(s["lora_sft_tokens_per_s"]) >= {"official", "fast"} and all(v > 0 for v in s["lora_sft_tokens_per_s"].values())
    assert s["concurrent_tokens_per_s"] > 0 and res["items"]["concurrent"]["adapters"] == 2
    assert set(s["video_samples_per_s"]) == {"official", "ours_cold", "ours_warm"}
    # in fp32 mmla's batched greedy gives one-at-a-time model.generate's tokens
    agree = s["video_agreement_with_one_at_a_time"]
    assert agree["dtype"] == "float32" and agree["identical_token_ids"] == agree["n"] == 2
    assert res["items"]["e2e"]["n"] == 8 and res["items"]["video"]["n"] == 2
