"""Where the shared data lives: $CARRECOG_DATA_DIR, else ../shared/data beside the repo."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_dir() -> Path:
    return Path(os.environ.get("CARRECOG_DATA_DIR", DEFAULT_DATA_DIR))
