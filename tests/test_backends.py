"""The backend seam is one file: a backend defined here, registered with one line, runs `mmla predict` through the
unchanged predict loop (resume, evaluation, run records included)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from mmla import backends, cli
from mmla.backends import Options, Scored
from mmla.data import load_split
from mmla.prompts import chat_messages, model_kind
from mmla.tasks import get_task


class TableBackend:
    """Answers from a table keyed by the utterance: deterministic, over the model's real tokenizer (its chat
    template and token ids are what a row is). `fail_after`: the run stops with one line after that many answers."""

    table: dict[str, str] = {}
    asked: list[str] = []
    fail_after: int | None = None

    def __init__(self, options: Options):
        self.tokenizer = AutoTokenizer.from_pretrained(options.model)
        self.kind = model_kind(self.tokenizer)
        self.modality, self.setting, self.audio, self.generation_config = options.modality, None, None, None
        self.context_length = None  # a table has no context limit
        self.name = options.model

    def prepare(self, prompts, protocol, frames=None, candidates=None, histories=None):
        texts = [self.tokenizer.apply_chat_template(chat_messages(p, protocol, self.kind), tokenize=False,
                                                    add_generation_prompt=True) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        rows = [(p, i) for p, i in zip(prompts, ids)]
        return rows if candidates is None else list(zip(rows, candidates))

    def excess(self, rows, new_tokens):
        return [0] * len(rows)

    def heads(self, rows):
        return [self.tokenizer.decode(ids) for _, ids in rows]

    def _answer(self, row) -> str:
        prompt, ids = row
        assert ids and isinstance(ids[0], int)  # the real tokenizer made the row
        if self.fail_after is not None and len(TableBackend.asked) >= self.fail_after:
            raise ValueError("table backend: stopped on purpose")
        utterance = next(u for u in self.table if u in prompt)
        TableBackend.asked.append(utterance)
        return self.table[utterance]

    def generate(self, rows, *, decoding, batch_size, on_result):
        for i, row in enumerate(rows):
            on_result(i, self._answer(row))

    def sample(self, rows, *, decoding, seeds, batch_size, on_result):
        self.generate(rows, decoding=decoding, batch_size=batch_size, on_result=on_result)

    def score(self, rows, *, batch_size, on_result):
        for i, (row, cands) in enumerate(rows):
            answer = self._answer(row)
            on_result(i, Scored(best=next((k for k, c in enumerate(cands) if answer in c), 0),
                                scores=[float(answer in c) for c in cands]))

    def describe(self) -> dict:
        return {"device": None, "server": {"backend": "table", "model": self.name}}


@pytest.fixture
def table_backend(data_root):
    backends.register("table", TableBackend)  # the one registry line
    rows = [e for ds in ("MELD", "MOSI") for e in load_split(data_root, ds, "test").examples[:4]]
    # right for even rows, a wrong label for odd ones: the metrics must show it
    TableBackend.table = {e.text: f"{get_task(e.dataset).task}: "
                                  f"{e.label if k % 2 == 0 else next(x for x in get_task(e.dataset).labels if x != e.label)}"
                          for k, e in enumerate(rows)}
    TableBackend.asked, TableBackend.fail_after = [], None
    yield rows
    del backends.BACKENDS["table"]


def _predict(tiny_llama, data_root, out, *extra) -> int:
    return cli.main(["predict", "--backend", "table", "--model", str(tiny_llama), "--data", str(data_root),
                     "--datasets", "MELD,MOSI", "--limit", "4", "--no-progress", "--out", str(out), *extra])


def test_a_registered_backend_runs_predict_and_resumes(table_backend, tiny_llama, data_root, tmp_path, capsys):
    out = tmp_path / "run"
    TableBackend.fail_after = 3
    assert _predict(tiny_llama, data_root, out) == 2  # one line, after the finished rows were saved
    assert "table backend: stopped on purpose" in capsys.readouterr().err
    first = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(first) == 3

    TableBackend.fail_after, TableBackend.asked = None, []
    assert _predict(tiny_llama, data_root, out) == 0
    assert "resuming: 3 of 8 done, 5 to go" in capsys.readouterr().err
    assert len(TableBackend.asked) == 5  # only what was left
    recs = {(r["dataset"], r["id"]): r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert len(recs) == 8
    for k, e in enumerate(table_backend):
        assert (recs[(e.dataset, e.id)]["pred"] == e.label.lower()) == (k % 2 == 0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["per_dataset"]["MELD"]["ACC"] == 50.0 and metrics["per_dataset"]["MOSI"]["ACC"] == 50.0
    env = json.loads((out / "env.json").read_text())
    assert env["server"] == {"backend": "table", "model": str(tiny_llama)} and env["decoding"]["do_sample"] is False


def test_a_registered_backend_scores(table_backend, tiny_llama, data_root, tmp_path):
    out = tmp_path / "score"
    assert _predict(tiny_llama, data_root, out, "--mode", "score", "--protocol", "clean") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["per_dataset"]["MELD"]["ACC"] == 50.0


def test_an_unknown_backend_is_one_line(tiny_llama, data_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _predict(tiny_llama, data_root, tmp_path / "x")
    assert "invalid choice: 'table'" in capsys.readouterr().err
