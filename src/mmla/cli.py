"""The `mmla` command. Each subcommand is a thin layer over one module; heavy imports (torch,
transformers) happen inside the handlers so that `mmla prompts` and `mmla evaluate` start fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import run_command


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


# ---------------------------------------------------------------- prompts


def cmd_prompts(a) -> int:
    from .data import data_root, load_split
    from .prompts import render, target

    sd = load_split(data_root(a.data), a.dataset, a.split, skip_bad_rows=a.skip_bad_rows)
    out = sys.stdout
    for e in sd.examples[: a.limit] if a.limit else sd.examples:
        obj = {"dataset": e.dataset, "split": e.split, "id": e.id, "text": e.text, "label": e.label,
               "prompt": render(e.dataset, a.family, e.text, a.split, a.modality),
               "target": target(e.dataset, a.family, e.label, a.split, a.modality)}
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return 0


# ---------------------------------------------------------------- evaluate


def cmd_evaluate(a) -> int:
    from .evaluation import evaluate_samples, format_table, read_predictions
    path = Path(a.predictions)
    records = read_predictions(path)
    try:
        result = evaluate_samples(records, seed=a.seed, resamples=a.resamples)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if result["duplicates_dropped"]:
        print(f"{path}: {result['duplicates_dropped']} duplicate records of one (dataset, split, id, sample) "
              f"dropped; the last of each is counted", file=sys.stderr)
    print(json.dumps(result, indent=2) if a.json else format_table(result))
    return 0


# ---------------------------------------------------------------- compare


def cmd_compare(a) -> int:
    from .compare import compare_runs, format_comparison, left_out_line, read_run

    result = compare_runs(read_run(a.run_a), read_run(a.run_b), seed=a.seed,
                          resamples=a.resamples)
    print(left_out_line(result["rows"]), file=sys.stderr)
    print(json.dumps(result, indent=2) if a.json else format_comparison(result, str(a.run_a), str(a.run_b)))
    return 0


# ---------------------------------------------------------------- predict


def cmd_predict(a) -> int:
    from .evaluation import format_table
    from .inference import PredictConfig, predict

    cfg = PredictConfig(
        model=a.model, adapter=a.adapter, data=a.data, datasets=[a.datasets], split=a.split, mode=a.mode,
        protocol=a.protocol, family=a.family, limit=a.limit, batch_size=a.batch_size,
        max_new_tokens=a.max_new_tokens, seed=a.seed, num_samples=a.num_samples, dtype=a.dtype, device=a.device,
        device_map=a.device_map, max_memory=a.max_memory, threads=a.threads,
        skip_bad_rows=a.skip_bad_rows, trust_remote_code=a.trust_remote_code, setting=a.setting,
        paper_model=a.paper_model, name=a.name, out=a.out, modality=a.modality, frames=a.frames,
        num_frames=a.num_frames, fps=a.fps, max_pixels=a.max_pixels, no_frame_cache=a.no_frame_cache,
        backend=a.backend, base_url=a.base_url, api_key_env=a.api_key_env, concurrency=a.concurrency,
        decode_workers=a.decode_workers, max_audio_seconds=a.max_audio_seconds, audio_in_video=a.audio_in_video,
    )
    from .distributed import ranks

    main = ranks().main
    result = predict(cfg, progress=not a.no_progress and main)
    if not main:  # under torchrun / accelerate launch: rank 0 reports
        return 0
    print(format_table(result, _paper_reference(a.paper_model, a.setting)))
    if result.get("missing_clips"):
        print(f"missing or unreadable clips: {result['missing_clips']} (recorded per sample as clip_error)")
    if result.get("silent_clips"):
        print(f"clips without sound: {result['silent_clips']} (run with silence, recorded as audio_track: false)")
    print(f"run directory: {a.out}")
    return 0


def _paper_reference(model: str | None, setting: str) -> dict | None:
    if not model:
        return None
    from . import paper

    ref = paper.paper_accuracies(model, setting)
    if not ref:
        raise ValueError(f"the paper reports no {setting} numbers for '{model}'")
    return ref


# ---------------------------------------------------------------- download


def cmd_download(a) -> int:
    from .data import download

    path = download(a.to)
    print(f"downloaded to {path}")
    return 0


# ---------------------------------------------------------------- train, merge


def cmd_train(a) -> int:
    from . import training
    from .config import parse_overrides, read_yaml
    from .finetune import is_main

    values = read_yaml(a.config) if a.config else {}
    for key in ("model", "data", "datasets", "preset", "out", "modality", "frames", "num_frames", "fps", "max_pixels"):
        if getattr(a, key, None) is not None:
            values[key] = getattr(a, key)
    for flag in ("no_frame_cache", "concurrent"):
        if getattr(a, flag, False):
            values[flag] = True
    values.update(parse_overrides(a.overrides))
    if "datasets" not in values:  # training every dataset is never a default
        raise ValueError("mmla train needs --datasets: one name (SFT), a comma list (SFT each) or all (IT)")
    cfg = training.make_config(values)
    results = training.train(cfg, progress=not a.no_progress)
    if is_main():
        for name, r in results.items():
            best = r.get("best") or {}
            sel = f", best {best.get('metric')} {best.get('value')} at step {best.get('step')}" if best else ""
            print(f"{name}: {r['adapter']} ({r['steps']} steps{sel})")
    return 0


def cmd_merge(a) -> int:
    from .training import merge

    dest = merge(a.model, a.adapter, a.out, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    print(f"merged model: {dest}")
    return 0


def add_train_cli(subparsers) -> None:
    from .training import MODALITIES, PRESET_NAMES

    sp = subparsers.add_parser(
        "train", help="LoRA SFT (one adapter per dataset) or IT (--datasets all: one adapter on all), text or video",
        description="Fine-tune with LoRA. Config: defaults < --preset < --config YAML < flags < key=value. The "
                    "modality comes from the model (a vision-language model trains on video) or --modality. "
                    "Rerun the same command to resume from the last checkpoint.")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_epochs=2")
    sp.add_argument("--config", help="a YAML file of TrainConfig keys")
    sp.add_argument("--model", help="HF id, local path or alias (default smollm2-135m)")
    sp.add_argument("--data", help="data root (default: $MMLA_DATA, else ./data/mmla)")
    sp.add_argument("--datasets", help="one name (SFT), a comma list (SFT each) or all (IT); required here or in "
                                       "--config")
    sp.add_argument("--preset", choices=PRESET_NAMES, help="paper (official configuration) | fast")
    sp.add_argument("--modality", choices=MODALITIES, help="auto (default): video for a vision-language model")
    sp.add_argument("--out", help="output directory (rerun to resume)")
    sp.add_argument("--concurrent", action="store_true",
                    help="SFT of several datasets at once: one frozen base, one LoRA adapter per dataset")
    frame_args(sp)
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_train)

    sp = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model (safetensors)")
    sp.add_argument("--model", required=True, help="the base model (HF id, local path or alias)")
    sp.add_argument("--adapter", required=True, help="adapter directory (e.g. <train out>/adapter)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.set_defaults(func=cmd_merge)


def cmd_demo(a) -> int:
    from .demo import run

    return run()


# ---------------------------------------------------------------- report, run, export, check-data


def cmd_report(a) -> int:
    from .report import build_report

    print(build_report(a.run_dirs, a.out))
    return 0


def add_report_cli(subparsers) -> None:
    sp = subparsers.add_parser(
        "report", help="tables, figures and an HTML page from run directories, compared with the paper",
        description="Build report.html, report.md and CSV tables from one or more run directories.")
    sp.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    sp.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    sp.set_defaults(func=cmd_report)


def cmd_run(a) -> int:
    from . import distributed
    from .experiment import STAGES, load_experiment, run_experiment

    cfg = load_experiment(a.config, a.overrides)
    main = distributed.ranks().main
    text = run_experiment(cfg, progress=not a.no_progress and main)
    if not main:  # under torchrun / accelerate launch: rank 0 reports
        return 0
    print(text)
    if cfg.modalities:
        print(f"\nablation: {Path(cfg.out) / 'ablation.md'} (figure: ablation.png); run directories: "
              + ", ".join(str(Path(cfg.out) / f"zero-shot-{m}") for m in cfg.modalities))
        if cfg.stages == ["zero-shot"]:
            return 0
    print(f"\nresults: {Path(cfg.out) / 'results.md'}; run directories for `mmla report`: "
          + ", ".join(str(Path(cfg.out) / s) for s in STAGES if s in cfg.stages))
    return 0


def add_run_cli(subparsers) -> None:
    sp = subparsers.add_parser("run", help="a whole experiment from a YAML file: zero-shot, SFT, IT, results",
                               description="Run the stages of CONFIG.yaml (rerun to resume; finished stages are "
                                           "skipped), then print one results table beside the paper's numbers.")
    sp.add_argument("config", help="e.g. configs/demo.yaml")
    sp.add_argument("overrides", nargs="*", metavar="key=value",
                    help="e.g. out=runs/x train.preset=fast predict.limit=20 sft.datasets=MELD,MOSI")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_run)


def cmd_export(a) -> int:
    from .export import EXPORT_MODALITIES, export_llamafactory

    modalities = EXPORT_MODALITIES if a.modality == "both" else (a.modality,)
    res = export_llamafactory(a.data, a.out, a.datasets, modalities)
    if res["missing"]:
        print(f"not exported (no such split in the data): {', '.join(res['missing'])}", file=sys.stderr)
    print(f"{len(res['files'])} files, {sum(res['files'].values())} records, dataset_info.json in {a.out}")
    return 0


def add_export_cli(subparsers) -> None:
    sp = subparsers.add_parser("export", help="write the data in another toolkit's format (llamafactory)")
    sp.add_argument("format", choices=("llamafactory",))
    sp.add_argument("--data", help="data root (default: $MMLA_DATA, else ./data/mmla)")
    sp.add_argument("--datasets", default="all")
    sp.add_argument("--modality", default="both", choices=("text", "video", "both"))
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_export)


def cmd_check_data(a) -> int:
    from .data import data_root
    from .tasks import parse_datasets
    from .video import FrameCache, check_data, format_check, frame_setting

    spec = a.datasets or "video"
    check = "exists" if a.no_decode else "full" if a.full else "probe"
    setting = frame_setting(a.frames or "official-infer", num_frames=a.num_frames, fps=a.fps, max_pixels=a.max_pixels)
    cache = FrameCache(enabled=not a.no_frame_cache) if check == "full" else None
    report = check_data(data_root(a.data), parse_datasets(spec), [a.split] if a.split else None,
                        check=check, setting=setting, cache=cache)
    if check == "full":
        report["frame_setting"] = setting.record()
    print(json.dumps(report, indent=2) if a.json else format_check(report, a.show))
    return 1 if report["problems"] else 0


def add_check_data_cli(subparsers) -> None:
    from .tasks import SPLITS

    about = ("For every row of the TSVs, find its clip (tolerant of the release's spelling variants) and decode its "
             "first frame (--full: every frame the setting samples). Exit status 1 when something is missing or "
             "unreadable.")
    sp = subparsers.add_parser("check-data", help="list video clips that are missing or unreadable", description=about)
    sp.add_argument("--data", help="data root (default: $MMLA_DATA, else ./data/mmla)")
    sp.add_argument("--datasets", help="video (default) | all | comma-separated names")
    sp.add_argument("--split", choices=SPLITS, help="one split (default: every split present)")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--no-decode", action="store_true", help="only check that the files exist")
    how.add_argument("--full", action="store_true",
                     help="decode the frames of --frames (finds truncated clips; fills the frame cache)")
    frame_args(sp)
    sp.add_argument("--show", type=int, default=20, help="problems listed per dataset (default 20)")
    sp.add_argument("--json", action="store_true", help="the full report as JSON")
    sp.set_defaults(func=cmd_check_data)


def audio_args(sp) -> None:
    """The audio options of `mmla predict --modality audio|av`."""
    sp.add_argument("--max-audio-seconds", type=float,
                    help="audio, av: seconds of sound kept per clip (default: the model family's, else 30)")
    sp.add_argument("--audio-in-video", action=argparse.BooleanOptionalAction, default=None,
                    help="av: interleave the sound with the frames in time (default: the model family's; "
                         "Qwen2.5-Omni yes), or give it as a separate audio part")


def frame_args(sp) -> None:
    """The frame options of predict, train and check-data (mmla.video's settings)."""
    from .video import FRAME_SETTINGS

    sp.add_argument("--frames", choices=tuple(FRAME_SETTINGS),
                    help="frame setting (default: the model family's official one, else official-infer: "
                         "4 frames, 151,200 px, fps 1)")
    sp.add_argument("--num-frames", type=int, help="override: a fixed number of frames")
    sp.add_argument("--fps", type=float, help="override: sample at this rate (alone: fps sampling)")
    sp.add_argument("--max-pixels", type=int, help="override: pixel budget per frame")
    sp.add_argument("--no-frame-cache", action="store_true", help="decode every clip again")


def build_parser() -> argparse.ArgumentParser:
    from . import backends
    from .prompts import PROTOCOLS
    from .tasks import PROMPT_FAMILIES, SPLITS

    p = _Parser(prog="mmla", description="MMLA benchmark: prompts, inference, evaluation, reports.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def data_args(sp):
        sp.add_argument("--data", help="data root (default: $MMLA_DATA, else ./data/mmla)")
        sp.add_argument("--skip-bad-rows", action="store_true", help="warn about and skip malformed rows")

    sp = sub.add_parser("prompts", help="print the prompts of one split as JSONL")
    data_args(sp)
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--split", default="test", choices=SPLITS)
    sp.add_argument("--family", default="clean", choices=PROMPT_FAMILIES)
    sp.add_argument("--modality", default="text", choices=("text", "video", "audio", "av"))
    sp.add_argument("--limit", type=_positive_int)
    sp.set_defaults(func=cmd_prompts)

    def bootstrap_args(sp):
        sp.add_argument("--seed", type=int, default=0, help="bootstrap seed (same seed, same intervals)")
        sp.add_argument("--resamples", type=_positive_int, default=10_000, help="bootstrap resamples")

    sp = sub.add_parser("evaluate", help="official parser + metrics (with 95%% intervals) over a predictions JSONL")
    sp.add_argument("predictions")
    sp.add_argument("--json", action="store_true")
    bootstrap_args(sp)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("compare", help="is a difference real? two runs paired by row: differences, 95%% "
                                        "intervals, p-values (Holm across datasets), McNemar",
                        description="Compare two runs over the rows both have, paired by (dataset, split, id).")
    sp.add_argument("run_a", metavar="RUN_A", help="a run directory or its predictions.jsonl")
    sp.add_argument("run_b", metavar="RUN_B", help="a run directory or its predictions.jsonl")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    bootstrap_args(sp)
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("predict", help="zero-shot (or adapter) inference, then evaluation")
    data_args(sp)
    sp.add_argument("--model", default="smollm2-135m", help="HF id, local path or alias (smollm2-135m)")
    sp.add_argument("--adapter", help="a peft adapter directory")
    sp.add_argument("--datasets", default="all", help="all | video | comma-separated names")
    sp.add_argument("--split", default="test", choices=SPLITS)
    sp.add_argument("--mode", default="generate", choices=("generate", "score"))
    sp.add_argument("--protocol", default="official", choices=PROTOCOLS)
    sp.add_argument("--family", choices=PROMPT_FAMILIES, help="prompt family (default: infer_script if official, else clean)")
    sp.add_argument("--limit", type=_positive_int, help="first N rows of each dataset")
    sp.add_argument("--batch-size", type=_positive_int, default=32)
    sp.add_argument("--max-new-tokens", type=_positive_int)
    sp.add_argument("--seed", type=int, default=0, help="sampling: each row's generator is seeded from (seed, "
                    "dataset, id)")
    sp.add_argument("--num-samples", type=_positive_int, default=1,
                    help="sampling: K answers per row; metrics: majority vote, and mean +/- std over the K draws")
    sp.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    sp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    sp.add_argument("--device-map", choices=("auto",),
                    help="split the model over the visible GPUs, then CPU, then disk (accelerate big-model dispatch)")
    sp.add_argument("--max-memory", metavar="CAPS", help="with --device-map auto: per-device caps, e.g. "
                    "0=70GiB,1=70GiB,cpu=200GiB (the rest is offloaded to <out>/offload)")
    sp.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    sp.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    sp.add_argument("--setting", default="zero-shot", choices=("zero-shot", "sft", "it"))
    sp.add_argument("--paper-model", help="the paper's model this run reproduces (e.g. Qwen2-1.5B): its official "
                    "setting when the model's config names none, and its numbers beside yours")
    sp.add_argument("--name", help="a short label for reports")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--out", required=True, help="run directory (rerun to resume)")
    sp.add_argument("--modality", default="auto", choices=("auto", "text", "video", "audio", "av"),
                    help="auto (default): what the model takes (av for an omni model, audio for an audio LLM, video "
                         "for a vision-language model; datasets: the 9 with videos), else text")
    frame_args(sp)
    sp.add_argument("--decode-workers", type=_positive_int, metavar="N",
                    help="video: threads decoding the next batches' clips while the model runs (default: the "
                         "cores, at most 8; 1: decode in line)")
    audio_args(sp)
    # an OpenAI-compatible server (vLLM, SGLang, llama.cpp, transformers serve, a hosted API)
    sp.add_argument("--backend", default="local", choices=backends.names(),
                    help="local: the model here; openai: an OpenAI-compatible server (mmla.backends)")
    sp.add_argument("--base-url", help="openai backend: the server's /v1 URL, e.g. http://127.0.0.1:8000/v1")
    sp.add_argument("--api-key-env", metavar="VAR", help="openai backend: environment variable holding the API key")
    sp.add_argument("--concurrency", type=_positive_int, default=8, help="openai backend: requests in flight")
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("demo", help="the whole pipeline on the embedded model (what `make demo` runs)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("download", help="fetch the release from the Hugging Face hub")
    sp.add_argument("--to", default="data/mmla")
    sp.set_defaults(func=cmd_download)

    for add in (add_report_cli, add_check_data_cli, add_train_cli, add_run_cli, add_export_cli):
        add(sub)
    return p


def run_parsed(args) -> int:
    """Run a parsed subcommand; bad input becomes one `mmla: error:` line and exit status 2 (mmla.errors)."""
    return run_command(lambda: args.func(args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_parsed(args)
    except KeyboardInterrupt:
        print("mmla: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130


def entry() -> None:
    """The `mmla` console script and `python -m mmla.cli`: main() with the cyclic garbage collector kept off the
    start-up's objects (mmla.runs.pause_gc), which also lets the interpreter exit without rescanning them."""
    import gc

    from .runs import pause_gc

    pause_gc()
    code = main()
    gc.freeze()  # what is left lives until exit: the interpreter's teardown does not rescan it
    sys.exit(code)


if __name__ == "__main__":
    entry()
