"""The README tells the truth about what is served: its model table equals the model cards."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def served_cards() -> dict[str, dict]:
    cards = {}
    for model in (ROOT / "serving_models").iterdir():
        versions = [p for p in model.iterdir() if p.name.isdigit()] if model.is_dir() else []
        if versions:
            latest = max(versions, key=lambda p: int(p.name))
            cards[model.name] = json.loads((latest / "model_card.json").read_text()) | {"served": int(latest.name)}
    return cards


def test_readme_model_table_matches_the_model_cards():
    readme = (ROOT / "README.md").read_text()
    for name, card in served_cards().items():
        scores = card.get("evaluation", {}).get("signatures", {})
        assert scores, f"{name}: no test figures in its card; run make evaluate and training.model_cards"
        for signature, s in scores.items():
            row = next((line for line in readme.splitlines()
                        if line.startswith(f"| `{name}` v{card['served']} ({signature})")
                        or (signature == "serving_default" and line.startswith(f"| `{name}` v{card['served']} |"))),
                       None)
            assert row is not None, f"README has no row for {name} v{card['served']} ({signature})"
            cells = [c.strip().strip("*") for c in row.split("|")]
            expected = [str(s["photos"]), f"{s['top1']:.3f}", f"{s['make_top1']:.3f}", f"{s['ece']:.3f}"]
            assert all(value in cells for value in expected), (row, expected)


def test_every_make_target_is_documented():
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]+):", makefile, re.MULTILINE)) - {"venv", "protos", "clean"}
    missing = sorted(t for t in targets if f"make {t}" not in readme)
    assert missing == [], f"undocumented make targets: {missing}"
