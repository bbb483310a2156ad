"""What every benchmark ends with: the JSON result, the command that reproduces it, and a copy at --out."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | None) -> dict:
    text = json.dumps(result, indent=2)
    print(text)
    print(f"reproduce: {result['command']}")
    if out:
        Path(out).write_text(text + "\n")
    return result
