"""Run directories: every run holds its resolved config, package versions, git revision,
per-sample predictions (appended as produced) and metrics.

One writer per run directory: `claim(out, what)` takes an advisory lock (flock) on <out>/.mmla.lock for as long
as a run writes there; the kernel drops it when the holder exits or is killed, so no lock is ever stale. Whole
files are written to a temporary name and renamed (write_text / write_json / write_config); predictions are
appended line by line (JsonlAppender) and a torn last line is dropped on resume (read_jsonl)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
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


def named(e: OSError, path) -> OSError:
    """The same error with `path` as its file name: a failed write() carries no name, and a failed rename
    names the temporary file; the user needs the file the run was writing."""
    return OSError(e.errno, e.strerror or str(e), str(path))


# What torch.save (RuntimeError) and safetensors (SafetensorError) say when the OS refuses a write: they drop errno.
_WRITE_FAILED = re.compile(r"PytorchStreamWriter|inline_container|iostream error|file write failed|unexpected pos|"
                           r"Error while serializing|IoError", re.I)


def _why_not_written(path) -> tuple[int, str]:
    """errno and cause for a write that failed without one: a file-size limit, a full disk, or unknown."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        return errno.EFBIG, f"{os.strerror(errno.EFBIG)} (the file-size limit, ulimit -f, is {soft} bytes)"
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return errno.ENOSPC, os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return errno.EIO, "write failed"


@contextlib.contextmanager
def writing(path):
    """Errors while the block writes `path` name `path`: OSError, and what libraries raise instead of one when a
    write fails (torch.save's RuntimeError, safetensors' SafetensorError), which carry no errno."""
    try:
        yield
    except OSError as e:
        raise named(e, path) from None
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        code = re.search(r"\bcode: (\d+)", text)  # safetensors: IoError(Os { code: 28, kind: StorageFull, ... })
        if code:
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
        if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
            if _WRITE_FAILED.search(text):
                raise OSError(*_why_not_written(path), str(path)) from None
        raise


def write_text(path: Path, text: str) -> None:
    """Whole-file write: a temporary sibling (unique per process), fsynced, then renamed over `path`, so a
    reader sees the old file or the new one, never half of one. A failure (no space, a file-size limit,
    permissions) raises OSError naming `path` and leaves the old file as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise named(e, path) from None


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, records) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_config(path: Path, config) -> None:
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_json(path: Path):
    """A JSON file this toolkit wrote; a damaged one is a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to redo that step") from None


def read_run_config(path: Path) -> dict:
    """A run directory's config.yaml (or another YAML mapping this toolkit wrote)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).strip().splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def open_run(out: Path, identity: dict, record: str = "config.yaml", section: str | None = None) -> Path:
    """The run directory `out`, made if need be, after checking that what it already holds was made under the
    same identity: the settings that change its results. The identity a run recorded is read from <out>/<record>
    (YAML or JSON; `section`: the mapping under that key); a setting that differs, or that the record lacks while
    this run sets it, refuses the directory with one line. Every command that writes a run directory calls this."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: --out names an existing file, not a run directory")
    path = out / record
    if path.exists():
        old = read_json(path) if path.suffix == ".json" else read_run_config(path)
        old = (old.get(section) or {}) if section else old
        for key, value in identity.items():
            if old.get(key) != value and (key in old or value is not None):
                raise ValueError(f"{path}: this run directory was made with {key}={old.get(key)!r}, not {value!r}; "
                                 f"use another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


PREDICTION_KEYS = ("dataset", "split", "id", "label", "output")  # what a predictions.jsonl record must hold


def read_jsonl(path: Path, need: tuple[str, ...] = ()) -> tuple[list[dict], bool]:
    """All complete records, and whether the file ended in a torn line (a run killed mid-write, a full disk).
    Reading stops at the first line that is not a whole JSON object with the keys `need`: it and what follows
    count as not done (and are dropped when the file is next appended to)."""
    if not path.exists():
        return [], False
    records, torn = [], False
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                torn = True
                break
            if raw.strip():
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    rec = None
                if not isinstance(rec, dict) or any(k not in rec for k in need):
                    torn = True
                    break
                records.append(rec)
    return records, torn


class JsonlAppender:
    """Appends one JSON record per line, each written through to the file at once (unbuffered), so a kill loses
    at most the line in flight. A failed write (no space, EFBIG under a file-size limit) raises OSError naming
    the file; the lines before it stay, and the torn tail it may leave is repaired by the next run."""

    def __init__(self, path: Path, existing: list[dict] | None = None, torn: bool = False):
        self.path = Path(path)
        if torn:  # rewrite without the torn tail before appending after it
            write_jsonl(self.path, existing or [])
        try:
            self.f = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise named(e, self.path) from None

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            while data:  # a short write (the disk filled up mid-line) is followed by the error itself
                data = data[self.f.write(data):]
        except OSError as e:
            raise named(e, self.path) from None

    def close(self) -> None:
        self.f.close()  # nothing buffered: closing cannot fail on a full disk


# ---------------------------------------------------------------- the process's start-up

_gc_paused = False


def pause_gc() -> None:
    """For the `mmla` process only (cli.entry). Start-up imports torch and transformers: about 4,000 modules whose
    objects live until exit. The cyclic garbage collector rescans them again and again while they load (0.6 s of a
    3.5 s start-up here) and once more at exit (about 1 s), finding nothing to free. So collection pauses during
    the imports; `startup_done` resumes it, and the entry point freezes everything before the interpreter exits."""
    global _gc_paused
    gc.disable()
    _gc_paused = True


def startup_done() -> None:
    """The imports are over (call it before loading a model): collect once (nothing start-up dropped is kept),
    exempt what remains from later collections (gc.freeze: modules and their objects live until exit) and resume
    collecting. A model is loaded after it, so a stage that drops its model (`mmla run`) frees it as usual. A
    no-op unless `pause_gc` ran (e.g. when mmla is used as a library or in tests)."""
    global _gc_paused
    if _gc_paused:
        gc.collect()
        gc.freeze()
        gc.enable()
        _gc_paused = False


# ---------------------------------------------------------------- one writer per run directory

LOCK_NAME = ".mmla.lock"
_held: dict[str, int] = {}  # real path of a directory this process holds -> its lock file descriptor


class RunLocked(ValueError):
    """Another live process is writing the run directory."""


def _holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
        argv = list(h.get("argv") or ["?"])
        prog = "mmla" if os.path.basename(argv[0]) in ("mmla", "cli.py") else argv[0]
        cmd = " ".join([prog, *argv[1:]])
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"]))
        return f"{h.get('what', 'a run')} pid {h['pid']} on {h['host']} since {since}: {cmd}"
    except (ValueError, KeyError, TypeError, OSError):  # the holder has not written its record yet
        return "another process (starting)"


@contextlib.contextmanager
def claim(out: Path, what: str):
    """Hold the run directory `out` (created if needed) for this process while the block runs; a second process
    is refused at once with RunLocked naming the holder. Nested claims of one directory by one process nest.
    In a multi-process launch (torchrun, accelerate) process 0 holds it for all."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory (--out names a run directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise named(e, out) from None
    key = os.path.realpath(out)
    if key in _held or int(os.environ.get("RANK", "0")) != 0:  # the outer claim (or process 0) holds it
        yield out
        return
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise named(e, path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunLocked(f"{out}: in use by {holder} (wait for it to end, or use another --out)") from None
    except OSError as e:  # e.g. ENOLCK: a file system without locks
        os.close(fd)
        raise named(e, path) from None
    try:
        record = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    except OSError:
        pass  # a full disk must not stop the run from starting: the record only names the holder
    _held[key] = fd
    try:
        yield out
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # while still held: a stale record never names a finished run
        os.close(fd)


# ---------------------------------------------------------------- training checkpoints


def checkpoint_problem(d: Path) -> str | None:
    """Why the Trainer checkpoint `d` cannot be resumed from, or None. The Trainer writes a checkpoint in place
    (weights, optimizer, scheduler, RNG state, then trainer_state.json last), so a kill or a full disk mid-save
    leaves a directory with some files missing or truncated; a file can also be damaged later."""
    try:
        json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"trainer_state.json: {getattr(e, 'strerror', None) or 'not valid JSON'}"
    weights = sorted(d.glob("*.safetensors"))
    sharded = any(d.glob("global_step*")) or any(d.glob("*fsdp*"))  # DeepSpeed / FSDP lay checkpoints out apart
    if not weights and not sharded:
        return "no safetensors weights"
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), "pt"):  # reads the header and checks that the file covers every tensor
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError or OSError: either way not resumable
            return f"{w.name}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    needed = [] if sharded else ["optimizer.pt", "scheduler.pt"]
    for name in needed:
        if not (d / name).is_file() or (d / name).stat().st_size == 0:
            return f"{name}: missing or empty"
    import zipfile

    for f in sorted([*d.glob("*.pt"), *d.glob("*.pth")]):  # torch.save writes zip archives with CRCs
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            return f"{f.name}: truncated or corrupt ({e})"
        if bad is not None:
            return f"{f.name}: corrupt entry {bad}"
    return None


def last_checkpoint(ckpt_dir: Path, say=None) -> Path | None:
    """The newest Trainer checkpoint under `ckpt_dir` that can be resumed from; newer ones that cannot (a kill
    mid-save, a truncated file) are skipped, each named through `say`."""
    if not ckpt_dir.is_dir():
        return None
    found = []
    for d in ckpt_dir.glob("checkpoint-*"):
        try:
            found.append((int(d.name.split("-")[1]), d))
        except ValueError:
            continue
    for _, d in sorted(found, reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        if say is not None:
            say(f"ignoring {d}: {problem} (an interrupted save or a damaged file)")
    return None
