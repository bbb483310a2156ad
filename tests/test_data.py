import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmla.data import DataError, load_split, safe_path


def test_reads_every_released_file(data_root):
    n = 0
    for ds_dir in sorted(data_root.iterdir()):
        for tsv in sorted(ds_dir.glob("*.tsv")):
            sd = load_split(data_root, ds_dir.name, tsv.stem)
            assert sd.examples and not sd.skipped
            n += len(sd.examples)
    assert n == 64605  # PROVENANCE.md: 64,605 rows in 34 files
    ur = load_split(data_root, "UR-FUNNY", "test").examples
    assert all(isinstance(e.id, str) for e in ur)
    # whitespace is kept verbatim (the released prompts embed it)
    assert any("\n" in e.text for e in load_split(data_root, "AnnoMi-therapist", "dev").examples)


def _write(root: Path, ds: str, split: str, content: bytes) -> None:
    (root / ds).mkdir(parents=True, exist_ok=True)
    (root / ds / f"{split}.tsv").write_bytes(content)


GOOD = b"id\ttext\tlabel\n1_0\tHello there.\tneutral\n1_1\tGreat!\tJoy\n"
BAD_INPUTS = [
    # (what, file content or None, extra CLI args, text the one-line error must contain)
    ("missing column", b"id\ttext\n1_0\thi\n", [], "missing column 'label'"),
    ("empty file", b"", [], "empty file"),
    ("label outside the list", b"id\ttext\tlabel\n1_0\thi\tneutral\n1_1\tho\thappiness\n", [], "line 3: field 'label' = 'happiness'"),
    ("non-UTF-8 byte", b"id\ttext\tlabel\n1_0\thi\tneutral\n1_1\tcaf\xe9\tjoy\n", [], "line 3: byte 0xe9 is not valid UTF-8"),
    ("empty text", b"id\ttext\tlabel\n1_0\t \tneutral\n", [], "line 2: field 'text' is empty"),
    ("duplicate id", b"id\ttext\tlabel\n1_0\thi\tneutral\n1_0\tho\tjoy\n", [], "line 3: field 'id' = '1_0' duplicates line 2"),
    ("missing file", None, [], "file not found"),
    ("unknown dataset name", GOOD, ["--dataset", "Meld"], "unknown dataset 'Meld'"),
    ("bad flag value", GOOD, ["--limit", "zero"], "expected a positive integer, got 'zero'"),
    ("bad split", GOOD, ["--split", "valid"], "invalid choice: 'valid'"),
]


@pytest.mark.parametrize("what,content,extra,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_malformed_input_gives_one_line_error(tmp_path, what, content, extra, needle):
    root = tmp_path / "mmla"
    root.mkdir()
    if content is not None:
        _write(root, "MELD", "test", content)
    args = ["prompts", "--data", str(root), "--dataset", "MELD", "--split", "test", *extra]
    if "--dataset" in extra:
        args = ["prompts", "--data", str(root), *extra]
    r = subprocess.run([sys.executable, "-m", "mmla.cli", *args], capture_output=True, text=True)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr
    if content is not None and "--dataset" not in extra and what != "bad flag value" and what != "bad split":
        assert str(root / "MELD" / "test.tsv") in lines[0]  # names the file


def test_skip_bad_rows_counts(tmp_path):
    root = tmp_path / "mmla"
    _write(root, "MELD", "test", b"id\ttext\tlabel\n1_0\thi\tneutral\n1_1\tho\thappiness\n1_2\t\tjoy\n")
    with pytest.warns(UserWarning):
        sd = load_split(root, "MELD", "test", skip_bad_rows=True)
    assert [e.id for e in sd.examples] == ["1_0"] and len(sd.skipped) == 2


def test_never_leaves_the_data_root(tmp_path):
    root = tmp_path / "mmla"
    (root / "MELD").mkdir(parents=True)
    outside = tmp_path / "secret.tsv"
    outside.write_bytes(GOOD)
    os.symlink(outside, root / "MELD" / "test.tsv")
    with pytest.raises(DataError, match="leaves the data root"):
        load_split(root, "MELD", "test")
    with pytest.raises(DataError):
        safe_path(root, "..", "secret.tsv")


def test_download_offline_fails_clearly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mmla.cli", "download", "--to", str(tmp_path / "d")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "could not download THUIAR/MMLA-Datasets" in r.stderr
