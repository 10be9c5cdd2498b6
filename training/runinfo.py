"""Where and how a model was made, as the training runs and exporters record it."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import keras
import tensorflow as tf


def machine() -> str:
    """Where a model was made: host, cores, and the Keras backend that ran it (KERAS_BACKEND)."""
    backend = keras.backend.backend()
    engine = f"TF {tf.__version__}"
    if backend == "torch":
        import torch

        engine = f"torch {torch.__version__} (data pipeline TF {tf.__version__})"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} CPU cores, Keras {keras.__version__} on {engine}"


def write_json(path: Path, obj: dict) -> None:
    """Replace `path` atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
