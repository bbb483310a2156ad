"""`mmla export llamafactory`: the train/dev splits as LLaMA-Factory sharegpt JSON files plus dataset_info.json.

Files, named as the official release names them (../shared/data/official_prompts.json, "source"):
  text   <DS>_<split>_text_<task>_llamafactory.json   prompts of the `llamafactory_text` family
  video  <DS>_<split>_<task>_llamafactory.json        `llamafactory_video` family ("<video>" first) and a
                                                       `videos` field: ["<DS>/video/<DS>_<id>.mp4"]
  and the IT mixtures Instruct_<split>_text_llamafactory.json / Instruct_<split>_llamafactory.json.
Each record: {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}.
Video paths are relative to the data root (LLaMA-Factory's `media_dir`); only the 9 datasets with released
videos get a video variant. A dataset without a split is reported and left out, never silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import data as data_mod
from .prompts import render, target
from .runs import write_json, write_text
from .tasks import get_task, parse_datasets

EXPORT_MODALITIES = ("text", "video")


def _file_name(ds: str, split: str, modality: str) -> str:
    task = get_task(ds).task
    return f"{ds}_{split}_text_{task}_llamafactory.json" if modality == "text" else f"{ds}_{split}_{task}_llamafactory.json"


def _info(file_name: str, modality: str) -> dict:
    columns = {"messages": "conversations", **({"videos": "videos"} if modality == "video" else {})}
    return {"file_name": file_name, "formatting": "sharegpt", "columns": columns,
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}


def records(root: Path, ds: str, split: str, modality: str) -> list[dict]:
    family = "llamafactory_text" if modality == "text" else "llamafactory_video"
    out = []
    for e in data_mod.load_split(root, ds, split).examples:
        rec = {"conversations": [
            {"from": "human", "value": render(ds, family, e.text, split, modality)},
            {"from": "gpt", "value": target(ds, family, e.label, split, modality)}]}
        if modality == "video":
            rec["videos"] = [f"{ds}/video/{ds}_{e.id}.mp4"]
        out.append(rec)
    return out


def export_llamafactory(data: str | None, out: str, datasets="all", modalities=EXPORT_MODALITIES,
                        splits=("train", "dev")) -> dict:
    """Write the files and dataset_info.json into `out`; returns {"files": {...}, "missing": [...]}."""
    root = data_mod.data_root(data)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    info, missing, counts = {}, [], {}
    for modality in modalities:
        if modality not in EXPORT_MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(EXPORT_MODALITIES)}, got '{modality}'")
        for split in splits:
            union = []
            for ds in parse_datasets(datasets):
                if modality == "video" and not get_task(ds).has_video:
                    continue
                if split not in data_mod.available_splits(root, ds):
                    missing.append(f"{ds}/{split}")
                    continue
                recs = records(root, ds, split, modality)
                name = _file_name(ds, split, modality)
                write_text(dest / name, json.dumps(recs, ensure_ascii=False, indent=1) + "\n")
                info[name.removesuffix(".json")] = _info(name, modality)
                counts[name] = len(recs)
                union += recs
            if union:
                name = f"Instruct_{split}_text_llamafactory.json" if modality == "text" else \
                    f"Instruct_{split}_llamafactory.json"
                write_text(dest / name, json.dumps(union, ensure_ascii=False, indent=1) + "\n")
                info[name.removesuffix(".json")] = _info(name, modality)
                counts[name] = len(union)
    write_json(dest / "dataset_info.json", info)
    return {"files": counts, "missing": sorted(set(missing))}
