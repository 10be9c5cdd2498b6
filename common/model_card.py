"""The model card: `model_card.json` beside every exported version, its one reader and one writer.

TF Serving serves the SavedModel; the card says what it is and how it was made.
Exporters write it (training/*export*.py, training/image_guard.py,
training/localizer_export.py), `python -m evaluation.model_cards` adds the test
figures, and the router reads it for ListModels (router_service/model_cards.py).

The schema, as every card has it:

    name           str     the TF Serving model name
    version        int     the version folder
    architecture   str     a sentence; ListModels shows the part before the first ";"
    input_size     [h, w]  pixels the model resizes to
    ... anything else the exporter records (classes, split hash, commands, machine, timings);
    evaluation     {"signatures": {<signature>: {"photos", "top1", "make_top1", "ece", ...}}}
                   optional: the test figures, per signature (classifiers only)
    task           optional: "localisation: ..." for the localiser; a classifier when absent
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_NAME = "model_card.json"
REQUIRED = {"name": str, "architecture": str, "input_size": list}


class CardError(ValueError):
    """A card that is missing, unreadable or short of a required field."""


def card_path(version_dir: Path) -> Path:
    return Path(version_dir) / CARD_NAME


def read_card(version_dir: Path) -> dict[str, Any]:
    """The card of one exported version; raises CardError when there is none or it breaks the schema."""
    path = card_path(version_dir)
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CardError(f"{path}: {exc}") from None
    _check(card, path)
    return card


def write_card(version_dir: Path, card: dict[str, Any], indent: int = 2) -> Path:
    """Writes the card after checking the schema; returns its path."""
    path = card_path(version_dir)
    _check(card, path)
    path.write_text(json.dumps(card, indent=indent) + "\n")
    return path


def _check(card: Any, path: Path) -> None:
    if not isinstance(card, dict):
        raise CardError(f"{path}: a card is a JSON object")
    wrong = [key for key, kind in REQUIRED.items() if not isinstance(card.get(key), kind)]
    if wrong:
        raise CardError(f"{path}: missing or mistyped {wrong} (common/model_card.py has the schema)")
