"""Write what `make evaluate` measured into the model card of each served version.

    python -m evaluation.model_cards --report reports/test_split.json

For every model and signature the report scored alone (its own makes' test
photos, through the router with force_model), the served version's
`model_card.json` gains `evaluation.signatures.<signature>`: photos, top-1,
make top-1 and ECE, with the command, the date and the hash of the split the
test photos came from. That can be newer than the split the model was trained
on (the card's `split_hash`): grouping near-duplicates only ever moves photos
into train (dataset/split.py), so today's test photos were never trained on.
The router's ListModels reads them (router_service/model_cards.py), so a
client sees how good each model is.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.model_card import card_path, read_card, write_card
from dataset.split import load_split, split_hash

SERVING_MODELS = Path(__file__).resolve().parent.parent / "serving_models"


def served_version(models_dir: Path, name: str) -> Path:
    """The version TF Serving's default policy serves: the highest numeric folder."""
    return max((p for p in (models_dir / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.model_cards", description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="the JSON report of make evaluate")
    parser.add_argument("--models-dir", type=Path, default=SERVING_MODELS)
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    evaluated_on = split_hash(load_split())
    cards: dict[Path, dict] = {}
    indents: dict[Path, int] = {}
    for key, scores in report["models"].items():
        name, _, signature = key.partition(":")
        path = served_version(args.models_dir, name)
        if path not in cards:
            cards[path] = read_card(path)
            second_line = card_path(path).read_text().splitlines()[1]
            indents[path] = len(second_line) - len(second_line.lstrip())  # keep the file's style
        card = cards[path]
        evaluation = card.setdefault("evaluation", {})
        evaluation.update({"split": "test", "command": f"make evaluate OUT={args.report}",
                           "date": time.strftime("%Y-%m-%d", time.gmtime()), "split_hash": evaluated_on})
        evaluation.setdefault("signatures", {})[signature or "serving_default"] = {
            "photos": scores["n"], "top1": scores["top1"], "make_top1": scores["make_top1"], "ece": scores["ece"]}
    for path, card in cards.items():
        print(f"{write_card(path, card, indent=indents[path] or 1)}: {sorted(card['evaluation']['signatures'])}")


if __name__ == "__main__":
    main()
