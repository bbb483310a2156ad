"""Run directories: every run holds its resolved config, package versions, git revision,
per-sample predictions (appended as produced) and metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

PACKAGES = ("mmla", "torch", "torchvision", "transformers", "peft", "accelerate", "tokenizers",
            "safetensors", "scikit-learn", "numpy", "pandas", "av")


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(device: str | None = None) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    from . import __version__

    return {
        "mmla": __version__,
        "python": sys.version.split()[0],
        "packages": versions,
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "device": device,
        "argv": sys.argv,
    }


def write_json(path: Path, obj) -> None:
    """Atomic write: a killed run never leaves a half-written JSON file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_config(path: Path, config) -> None:
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)


def read_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """All complete records, and whether the file ended in a torn line (a run killed mid-write)."""
    if not path.exists():
        return [], False
    records, torn = [], False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                torn = True
                break
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    torn = True
                    break
    return records, torn


class JsonlAppender:
    """Appends one JSON record per line and flushes each, so a kill loses at most the line in flight."""

    def __init__(self, path: Path, existing: list[dict] | None = None, torn: bool = False):
        if torn:  # rewrite without the torn tail before appending after it
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in existing or []))
            os.replace(tmp, path)
        self.f = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
