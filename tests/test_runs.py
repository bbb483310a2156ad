"""Run directories: every command that writes one refuses a directory made under another identity, with the same
one-line message (mmla.runs.open_run)."""

from __future__ import annotations

import re

import yaml

from mmla import cli

REFUSED = re.compile(r"^mmla: error: \S+: this run directory was made with (\w+)=.+, not .+; use another --out$")


def _refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    m = REFUSED.match(err)
    assert m and "\n" not in err, err
    return m.group(1)


def test_every_run_writing_command_refuses_another_identity(tiny_llama, data_root, tmp_path, capsys):
    base = ["--model", str(tiny_llama), "--data", str(data_root)]
    predict = ["predict", *base, "--datasets", "MOSI", "--limit", "1", "--max-new-tokens", "2", "--threads", "1",
               "--no-progress", "--out", str(tmp_path / "predict")]
    assert cli.main(predict) == 0
    assert _refused(capsys, [*predict, "--mode", "score"]) == "mode"

    over = ["limit=4", "max_steps=1", "eval_steps=0", "threads=1"]
    opts = [*base, "--preset", "fast", "--no-progress"]
    train = [*opts, "--datasets", "MUStARD", "--out", str(tmp_path / "train")]
    assert cli.main(["train", *over, *train]) == 0
    assert _refused(capsys, ["train", *over, "learning_rate=1e-3", *train]) == "learning_rate"

    concurrent = [*opts, "--concurrent", "--out", str(tmp_path / "concurrent")]
    assert cli.main(["train", *over, *concurrent, "--datasets", "MUStARD,MOSI"]) == 0
    assert _refused(capsys, ["train", *over, *concurrent, "--datasets", "MUStARD,MOSI", "--preset", "paper"]) == "preset"

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "model": str(tiny_llama), "data": str(data_root),
                                      "out": str(tmp_path / "experiment"), "datasets": "MOSI",
                                      "stages": ["zero-shot"], "predict": {"limit": 1, "max_new_tokens": 2,
                                                                           "threads": 1}}))
    assert cli.main(["run", str(config), "--no-progress"]) == 0
    assert _refused(capsys, ["run", str(config), "predict.limit=2", "--no-progress"]) == "predict"
