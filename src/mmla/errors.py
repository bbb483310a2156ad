"""Errors a user can cause become one line and exit status 2; a bug keeps its traceback.

`run_command(fn)` is the one top-level handler every `mmla` entry point runs its subcommand under:
- a missing, unreadable or corrupt file (OSError with its path, JSON, YAML, safetensors), a full disk or a
  file-size limit (ENOSPC, EFBIG), a run directory in use, bad values (ValueError): `mmla: error: <path>: <cause>`;
- a closed stdout (`mmla prompts ... | head -1`): ends quietly with status 0;
- anything else (TypeError, KeyError, ... from our code) is a bug: its traceback shows. `MMLA_DEBUG=1` shows the
  traceback of everything.
"""

from __future__ import annotations

import os
import stat
import sys


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def describe(e: BaseException) -> str | None:
    """The one-line message for an error a user can cause, or None for a bug."""
    if isinstance(e, OSError):
        cause = e.strerror or _first_line(str(e)) or type(e).__name__
        if e.filename is not None:
            where = f"{os.fsdecode(e.filename)}" + (f" -> {os.fsdecode(e.filename2)}" if e.filename2 else "")
            return f"{where}: {cause}"
        return cause
    if isinstance(e, ValueError):  # ours (already one line naming the file), JSONDecodeError, UnicodeDecodeError
        return _first_line(str(e)) or type(e).__name__
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(e, yaml.YAMLError):
        return f"not valid YAML ({_first_line(str(e))})"
    st = sys.modules.get("safetensors")
    if st is not None and isinstance(e, getattr(st, "SafetensorError", ())):
        return f"corrupt safetensors file ({_first_line(str(e))})"
    return None


def _stdout_closed(e: BrokenPipeError) -> bool:
    """A closed pipe on our stdout (the reader, e.g. `head`, has exited), not some other broken connection."""
    if e.filename is not None:
        return False
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
        return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
    except (OSError, ValueError, AttributeError):
        return False


def _debug() -> bool:
    return os.environ.get("MMLA_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def run_command(fn) -> int:
    """Run `fn()` (a subcommand; returns its exit status) under the handler described above."""
    import signal

    if hasattr(signal, "SIGXFSZ"):  # a file-size limit makes writes fail with EFBIG instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        status = int(fn() or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return status
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs just below
        if isinstance(e, BrokenPipeError) and _stdout_closed(e) and not _debug():
            # Python docs (signal, "Note on SIGPIPE"): point stdout at devnull so the flush at exit is quiet
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        msg = describe(e)
        if msg is None or _debug():
            raise
        print(f"mmla: error: {msg}", file=sys.stderr, flush=True)
        return 2
