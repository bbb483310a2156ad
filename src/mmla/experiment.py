"""`mmla run CONFIG.yaml [key=value ...]`: one model's whole experiment, text or video, stage by stage, then one
results table.

Stages (each in its own directory under `out`, each resumable, each skipped once its `stage.done` marker exists):
  zero-shot   predict on the test splits                                   -> <out>/zero-shot/
  sft         per dataset with a train split: train an adapter             -> <out>/sft-train/<DS>/
              and predict its test split with it                           -> <out>/sft-test/<DS>/
              then one combined run directory of all SFT predictions       -> <out>/sft/
  it          one adapter on the union of the train splits                 -> <out>/it-train/
              and predict every test split with it                         -> <out>/it/
  results     results.md / results.json: ACC per dataset and the test-size weighted average beside the paper's.
With `modalities` (e.g. [text, video, audio, av]), the zero-shot stage runs once per modality instead
(<out>/zero-shot-<modality>/, each a run directory) and the modality ablation is written: <out>/ablation.md,
ablation.json, ablation.png (mmla.ablation: what each modality adds, per dataset and dimension).
<out>/zero-shot, <out>/sft and <out>/it are run directories for `mmla report` (config.yaml with `setting` and
`paper_model`, predictions.jsonl, metrics.json and, for trained settings, train_log.jsonl).

Text and video experiments are the same stages through the same predict loop (mmla.inference) and trainer
(mmla.training): the modality comes from the model, or from `predict.modality` (which training follows unless
`train.modality` says otherwise). For a video model, `datasets: all` means the 9 datasets with released videos.

Config keys (ExperimentConfig below); the sections `predict` (PredictConfig keys, for every test evaluation),
`zero_shot` (PredictConfig keys for that stage only), `train` (TrainConfig keys for SFT and IT), `sft` and `it`
(TrainConfig keys for one setting; their `datasets` is what is trained on). Section keys are checked and typed when
the file is read. Overrides use dotted keys: `train.preset=fast`, `predict.limit=20`.
A stage whose config changed since its marker was written stops with an error (use another `out`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import data as data_mod
from . import distributed
from .config import build, coerce, parse_overrides, read_yaml
from .inference import PredictConfig, dedupe, predict
from .runs import claim, open_run, read_json, read_jsonl, read_run_config, write_config, write_json, write_jsonl, \
    write_text
from .tasks import DATASETS, VIDEO_DATASETS, parse_datasets
from .training import TrainConfig, make_config, model_info, train

STAGES = ("zero-shot", "sft", "it")
SECTIONS = {"predict": PredictConfig, "zero_shot": PredictConfig, "train": TrainConfig, "sft": TrainConfig,
            "it": TrainConfig}


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: str = "smollm2-135m"
    paper_model: str | None = None  # the paper's model to compare with, e.g. Qwen2-1.5B
    data: str | None = None
    out: str = "runs/experiment"
    datasets: list[str] = field(default_factory=lambda: ["all"])  # test sets evaluated in every stage
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    modalities: list[str] = field(default_factory=list)  # zero-shot once per modality + the ablation table
    predict: dict = field(default_factory=dict)
    zero_shot: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    it: dict = field(default_factory=dict)


def load_experiment(path: str, overrides: list[str] = ()) -> ExperimentConfig:
    raw = read_yaml(path)
    for key, value in parse_overrides(overrides).items():
        head, _, rest = key.partition(".")
        if rest:
            if head not in SECTIONS:
                raise ValueError(f"unknown config section '{head}' (known: {', '.join(SECTIONS)})")
            raw.setdefault(head, {})
            raw[head] = {**(raw[head] or {}), rest: value}
        else:
            raw[key] = value
    values = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{path}: config section '{key}' must be a mapping")
            try:  # typed now, so that a typo fails before any stage runs
                values[key] = {k: coerce(SECTIONS[key], k, v) for k, v in (value or {}).items()}
            except ValueError as e:
                raise ValueError(f"{path}: {key}: {e}") from None
        else:
            values[key] = coerce(ExperimentConfig, key, value)
    cfg = ExperimentConfig(**values)
    cfg.datasets = parse_datasets(cfg.datasets if len(cfg.datasets) != 1 else cfg.datasets[0])
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage '{unknown[0]}' (known: {', '.join(STAGES)})")
    cfg.data = str(data_mod.data_root(cfg.data))
    return cfg


def _say(msg: str) -> None:
    if distributed.ranks().main:
        print(f"[mmla run] {msg}", file=sys.stderr, flush=True)


def _on_main(fn, *args):
    """fn(*args) on rank 0 only (under torchrun / accelerate launch every rank runs the stages, and the files
    that join them are written once), its result handed to every rank."""
    r = distributed.start()
    return distributed.gather(r, fn(*args) if r.main else None)[0]


class Stage:
    """A marker file that says a stage finished, with the config it ran under."""

    def __init__(self, directory: Path, config: dict):
        self.dir, self.config = directory, json.loads(json.dumps(config, default=str))
        self.marker = directory / "stage.done"

    def done(self) -> dict | None:
        open_run(self.dir, self.config, self.marker.name, "config")
        return read_json(self.marker) if self.marker.exists() else None

    def finish(self, summary: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.marker, {"config": self.config, "summary": summary})


def _predict(cfg: ExperimentConfig, out: Path, setting: str, datasets: list[str], progress: bool,
             adapter: str | None = None, extra: dict | None = None) -> dict:
    values = {"model": cfg.model, "data": cfg.data, "datasets": datasets, "setting": setting,
              "paper_model": cfg.paper_model, "name": f"{cfg.name} {setting}", "out": str(out), "adapter": adapter,
              **cfg.predict, **(extra or {})}
    return predict(build(PredictConfig, values), progress=progress)


def _train_values(cfg: ExperimentConfig, setting: str, out: Path, datasets) -> dict:
    section = cfg.sft if setting == "sft" else cfg.it
    values = {"model": cfg.model, "data": cfg.data, "datasets": datasets, "setting": setting, "out": str(out),
              **cfg.train, **{k: v for k, v in section.items() if k != "datasets"}}
    if "modality" not in values and cfg.predict.get("modality", "auto") != "auto":
        values["modality"] = cfg.predict["modality"]  # the experiment's modality, as its test evaluations
    return values


def _for_modality(cfg: ExperimentConfig) -> ExperimentConfig:
    """A video experiment over `datasets: all` evaluates the 9 datasets with released videos."""
    modality = cfg.predict.get("modality", "auto")
    if set(cfg.datasets) != set(parse_datasets("all")):
        return cfg
    if model_info(cfg.model, modality, bool(cfg.predict.get("trust_remote_code", False)))[0] == "text":
        return cfg
    return dataclasses.replace(cfg, datasets=list(VIDEO_DATASETS))


def run_modalities(cfg: ExperimentConfig, progress: bool) -> dict:
    """The zero-shot stage once per modality, then the ablation table and figure; the text row's datasets are
    those with clips too, so that every modality sees the same rows."""
    from .ablation import write_ablation
    from .inference import MODALITIES

    unknown = [m for m in cfg.modalities if m not in MODALITIES[1:]]
    if unknown:
        raise ValueError(f"modalities: unknown {', '.join(unknown)} (known: {', '.join(MODALITIES[1:])})")
    datasets = cfg.datasets if set(cfg.datasets) != set(parse_datasets("all")) else list(VIDEO_DATASETS)
    dirs = {}
    for m in cfg.modalities:
        sub = dataclasses.replace(cfg, out=str(Path(cfg.out) / f"zero-shot-{m}"), datasets=datasets,
                                  predict={**cfg.predict, "modality": m})
        dirs[m] = Path(sub.out)
        stage = Stage(dirs[m], {"model": cfg.model, "datasets": datasets, "predict": sub.predict,
                                "zero_shot": cfg.zero_shot})
        if stage.done() is not None:
            _say(f"zero-shot {m}: done ({stage.marker})")
            continue
        _say(f"zero-shot {m}: {cfg.model} on {len(datasets)} test sets -> {dirs[m]}")
        _on_main(stage.finish, _predict(sub, dirs[m], "zero-shot", datasets, progress, extra=cfg.zero_shot))
    text = _on_main(write_ablation, dirs, Path(cfg.out), f"{cfg.name}: what each modality adds ({cfg.model})")
    return {"ablation": text}


def run_zero_shot(cfg: ExperimentConfig, progress: bool) -> dict:
    out = Path(cfg.out) / "zero-shot"
    stage = Stage(out, {"model": cfg.model, "datasets": cfg.datasets, "predict": cfg.predict, "zero_shot": cfg.zero_shot})
    if (rec := stage.done()) is not None:
        _say(f"zero-shot: done ({stage.marker})")
        return rec["summary"]
    _say(f"zero-shot: {cfg.model} on {len(cfg.datasets)} test sets -> {out}")
    result = _predict(cfg, out, "zero-shot", cfg.datasets, progress, extra=cfg.zero_shot)
    _on_main(stage.finish, result)
    return result


def _combine(out: Path, parts: dict[str, Path], train_dirs: dict[str, Path], config: dict) -> dict:
    """One run directory from per-dataset SFT runs: predictions, metrics, config and the training logs."""
    from .evaluation import evaluate_records

    out.mkdir(parents=True, exist_ok=True)
    records = [r for p in parts.values() for r in dedupe(read_jsonl(p / "predictions.jsonl")[0])]
    write_jsonl(out / "predictions.jsonl", records)
    logs = [{"dataset": ds, **r} for ds, d in train_dirs.items() for r in read_jsonl(d / "train_log.jsonl")[0]]
    write_jsonl(out / "train_log.jsonl", logs)
    result = evaluate_records(records)
    if config.get("modality") == "video":
        result["missing_clips"] = sum(bool(r.get("clip_error")) for r in records)
    write_json(out / "metrics.json", result)
    write_config(out / "config.yaml", config)
    first = next(iter(parts.values()))
    if (first / "env.json").exists():
        write_text(out / "env.json", (first / "env.json").read_text())
    return result


def run_sft(cfg: ExperimentConfig, progress: bool) -> dict:
    out = Path(cfg.out)
    wanted = parse_datasets(cfg.sft.get("datasets", cfg.datasets))
    root = Path(cfg.data)
    have = [ds for ds in wanted if "train" in data_mod.available_splits(root, ds)]
    missing = [ds for ds in wanted if ds not in have]
    stage = Stage(out / "sft", {"model": cfg.model, "datasets": wanted, "predict": cfg.predict, "train": cfg.train,
                                "sft": cfg.sft})
    if (rec := stage.done()) is not None:
        _say(f"sft: done ({stage.marker})")
        return rec["summary"]
    if missing:
        _say(f"sft: no train split for {', '.join(missing)}: no SFT adapter, no SFT number for them")
    if not have:
        raise ValueError(f"sft: none of {', '.join(wanted)} has a train split in {root}")
    parts, train_dirs, adapters = {}, {}, {}
    if len(have) > 1 and {**cfg.train, **cfg.sft}.get("concurrent"):
        # every adapter at once over one frozen base (mmla.multilora); each run below then finds its adapter done
        _say(f"sft: {len(have)} adapters trained concurrently -> {out / 'sft-train'}")
        train(make_config(_train_values(cfg, "sft", out / "sft-train", have)), progress=progress)
    for i, ds in enumerate(have, 1):
        tdir, pdir = out / "sft-train" / ds, out / "sft-test" / ds
        _say(f"sft {i}/{len(have)}: {ds}: train -> {tdir}")
        train(make_config(_train_values(cfg, "sft", tdir, [ds])), progress=progress)
        _say(f"sft {i}/{len(have)}: {ds}: test -> {pdir}")
        _predict(cfg, pdir, "sft", [ds], progress, adapter=str(tdir / "adapter"))
        parts[ds], train_dirs[ds], adapters[ds] = pdir, tdir, str(tdir / "adapter")
    config = {**read_run_config(parts[have[0]] / "config.yaml"), "datasets": have, "adapter": adapters, "setting": "sft", "name": f"{cfg.name} sft",
              "out": str(out / "sft"), "no_train_split": missing}
    result = _on_main(_combine, out / "sft", parts, train_dirs, config)
    result["no_train_split"] = missing
    _on_main(stage.finish, result)
    return result


def run_it(cfg: ExperimentConfig, progress: bool) -> dict:
    out = Path(cfg.out)
    train_sets = cfg.it.get("datasets", "all")
    stage = Stage(out / "it", {"model": cfg.model, "datasets": cfg.datasets, "train_datasets": train_sets,
                               "predict": cfg.predict, "train": cfg.train, "it": cfg.it})
    if (rec := stage.done()) is not None:
        _say(f"it: done ({stage.marker})")
        return rec["summary"]
    tdir = out / "it-train"
    _say(f"it: train one adapter on the train splits of {train_sets} -> {tdir}")
    summary = train(make_config(_train_values(cfg, "it", tdir, train_sets)), progress=progress)["it"]
    _say(f"it: test on {len(cfg.datasets)} test sets -> {out / 'it'}")
    result = _predict(cfg, out / "it", "it", cfg.datasets, progress, adapter=str(tdir / "adapter"))
    log = tdir / "train_log.jsonl"
    if log.exists() and distributed.ranks().main:
        write_text(out / "it" / "train_log.jsonl", log.read_text())
    result["no_train_split"] = summary.get("missing_train", [])
    _on_main(stage.finish, result)
    return result


def results_table(cfg: ExperimentConfig, results: dict[str, dict]) -> tuple[str, dict]:
    """Markdown table: our ACC per dataset and setting beside the paper's, and the weighted averages."""
    from . import paper

    settings = [s for s in STAGES if s in results]
    refs = {s: paper.paper_accuracies(cfg.paper_model, s) if cfg.paper_model else {} for s in settings}
    ours = {s: {ds: m["ACC"] for ds, m in results[s]["per_dataset"].items()} for s in settings}
    ns = {s: {ds: m["n"] for ds, m in results[s]["per_dataset"].items()} for s in settings}
    label = cfg.paper_model or "paper"
    head = ["dataset"] + [c for s in settings for c in (f"{s} (ours)", f"{s} ({label})")]
    rows, table = [], {"datasets": {}, "average": {}}
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for ds in DATASETS:
        if not any(ds in ours[s] for s in settings):
            continue
        cells = [ds]
        for s in settings:
            mine, ref = ours[s].get(ds), refs[s].get(ds)
            cells += [fmt(mine), fmt(ref)]
            table["datasets"].setdefault(ds, {})[s] = {"ours": mine, "paper": ref, "n": ns[s].get(ds)}
        rows.append(cells)
    cells = ["average (weighted)"]
    for s in settings:
        mine = results[s]["average"].get("ACC")
        common = {ds: v for ds, v in refs[s].items() if ds in ours[s]}
        ref = round(paper.weighted_average(common), 2) if common else None
        cells += [fmt(mine), fmt(ref)]
        table["average"][s] = {"ours": mine, "paper_same_datasets": ref, "n": results[s]["average"].get("n"),
                               "paper_reported": paper.reported_average(cfg.paper_model, s) if cfg.paper_model else None}
    rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    notes = [f"\nOurs: {cfg.model}; ACC in %, averages weighted by the number of test rows evaluated; the paper's "
             f"averages are test-size weighted over the same datasets."]
    for s in settings:
        if results[s].get("no_train_split"):
            notes.append(f"{s}: no train split for {', '.join(results[s]['no_train_split'])}"
                         + (" (evaluated without training on them)" if s == "it" else " (no SFT number)"))
    return "\n".join(lines + notes), table


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> str:
    cfg = _for_modality(cfg)
    out = Path(cfg.out)
    with claim(out, "run"):  # one writer per experiment directory: a second `mmla run` is refused
        main = distributed.ranks().main  # under torchrun / accelerate every rank runs the stages; rank 0 writes
        if main:
            write_config(out / "experiment.yaml", dataclasses.asdict(cfg))
        runners = {"zero-shot": run_zero_shot, "sft": run_sft, "it": run_it}
        ablation = run_modalities(cfg, progress)["ablation"] if cfg.modalities else None
        results = {s: runners[s](cfg, progress) for s in STAGES if s in cfg.stages
                   and not (s == "zero-shot" and cfg.modalities)}
        if ablation is not None and not results:
            return ablation
        text, table = results_table(cfg, results)
        if main:
            write_text(out / "results.md", f"# {cfg.name}\n\n{text}\n")
            write_json(out / "results.json", table)
        return text
