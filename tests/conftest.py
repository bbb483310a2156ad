import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _need(path: Path) -> Path:
    # In CI ../shared is always there: a missing copy is a failure, never a silent skip.
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing (CI must run beside ../shared)")
        pytest.skip(f"{path} is not available")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _need(SHARED / "data" / "mmla")


@pytest.fixture(scope="session")
def official_prompts() -> dict:
    import json

    return json.loads(_need(SHARED / "data" / "official_prompts.json").read_text())


@pytest.fixture(scope="session")
def videos_dir() -> Path:
    return _need(SHARED / "data" / "videos")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random-init Llama with SmolLM2's tokenizer: fast, deterministic, real architecture."""
    from mmla.tiny import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))
