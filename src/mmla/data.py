"""Reading the MMLA release: `<root>/<DATASET>/{train,dev,test}.tsv` with columns id, text, label.

Every cell is read as a string (UR-FUNNY ids look numeric) and whitespace is kept verbatim: the
released prompts embed the text exactly. Each problem is reported as one line naming file, line and
value; with `skip_bad_rows` a bad row becomes a warning and is counted instead.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import SPLITS, get_task

HF_REPO = "THUIAR/MMLA-Datasets"
COLUMNS = ("id", "text", "label")


class DataError(ValueError):
    """A problem with the input data; its message is one line naming file, line and field."""


@dataclass
class Example:
    dataset: str
    split: str
    id: str
    text: str
    label: str  # gold, lower case


@dataclass
class SplitData:
    examples: list[Example]
    path: Path
    skipped: list[str] = field(default_factory=list)  # one message per skipped bad row


def data_root(cli_value: str | os.PathLike | None = None) -> Path:
    """--data, else $MMLA_DATA, else ./data/mmla."""
    value = cli_value or os.environ.get("MMLA_DATA") or "data/mmla"
    return Path(value).expanduser()


def safe_path(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that resolves outside the data root (.., absolute, symlinks)."""
    root_r = Path(root).resolve()
    p = root_r.joinpath(*parts).resolve()
    if p != root_r and root_r not in p.parents:
        raise DataError(f"{Path(root).joinpath(*parts)}: path leaves the data root {root_r}")
    return p


def split_path(root: Path, dataset: str, split: str) -> Path:
    return safe_path(root, get_task(dataset).name, f"{split}.tsv")


def available_splits(root: Path, dataset: str) -> list[str]:
    return [s for s in SPLITS if split_path(root, dataset, s).is_file()]


def load_split(root: Path, dataset: str, split: str, *, skip_bad_rows: bool = False) -> SplitData:
    task = get_task(dataset)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (set --data or $MMLA_DATA; `mmla download` fetches the release)")
    path = split_path(root, dataset, split)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected <root>/{task.name}/{split}.tsv)")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: byte 0x{raw[e.start]:02x} is not valid UTF-8") from None
    if content.startswith("\ufeff"):
        content = content[1:]
    if not content.strip():
        raise DataError(f"{path}: empty file (expected a header line: id, text, label)")

    reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t")
    header = next(reader)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: line 1: missing column '{missing[0]}' (header has: {', '.join(header)})")
    col = {c: header.index(c) for c in COLUMNS}
    labels = set(task.labels)

    out = SplitData([], path)
    seen: dict[str, int] = {}
    start = 2  # line number where the next record starts (records may span lines when quoted)
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not cells:  # blank line
            continue
        problem = None
        if len(cells) < len(header):
            problem = f"line {line}: expected {len(header)} tab-separated fields, found {len(cells)}"
        else:
            id_, text, label = (cells[col[c]] for c in COLUMNS)
            gold = normalize_label(label, task.task)
            if not id_.strip():
                problem = f"line {line}: field 'id' is empty"
            elif not text.strip():
                problem = f"line {line}: field 'text' is empty (id {id_})"
            elif gold not in labels:
                problem = (f"line {line}: field 'label' = {label!r} is not a {task.name} label "
                           f"(expected one of: {', '.join(task.labels)})")
            elif id_ in seen:
                problem = f"line {line}: field 'id' = {id_!r} duplicates line {seen[id_]}"
        if problem:
            msg = f"{path}: {problem}"
            if not skip_bad_rows:
                raise DataError(msg)
            warnings.warn(f"skipped: {msg}", stacklevel=2)
            out.skipped.append(msg)
            continue
        seen[id_] = line
        out.examples.append(Example(task.name, split, id_, text, gold))
    if not out.examples and not out.skipped:
        raise DataError(f"{path}: no rows after the header")
    return out


def normalize_label(label: str, task_name: str | None = None) -> str:
    """Gold labels are compared lower-cased; a leading 'task:' prefix is stripped (official eval.py)."""
    g = label.strip().lower()
    if ":" in g:
        head, _, rest = g.partition(":")
        if task_name is None or head.strip().replace(" ", "_") in (task_name, "talk_type", "therapist_behaviour"):
            g = rest.strip()
    return g


def download(to: str | os.PathLike) -> Path:
    """Fetch the release with huggingface_hub. Needs network access to the Hugging Face hub."""
    from huggingface_hub import snapshot_download

    to = Path(to)
    try:
        snapshot_download(repo_id=HF_REPO, repo_type="dataset", local_dir=to)
    except Exception as e:  # offline, DNS, auth: all end here with one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not download {HF_REPO} to {to}: {type(e).__name__}: {first[:200]} "
            f"(is the Hugging Face hub reachable? offline users: copy the release to {to} by hand)"
        ) from None
    return to
