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
    readme = (ROOT / "README.md").read_text() + (ROOT / "docs" / "models.md").read_text()  # the table: docs/models.md
    for name, card in served_cards().items():
        if card.get("task", "").startswith("localisation"):  # no classes: its figures are the framing table's
            assert f"`{name}` v{card['served']}" in readme, f"docs/models.md does not name {name} v{card['served']}"
            continue
        scores = card.get("evaluation", {}).get("signatures", {})
        assert scores, f"{name}: no test figures in its card; run make evaluate and evaluation.model_cards"
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
    """In the README, or in docs/operations.md's list of targets that the README points to."""
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text() + (ROOT / "docs" / "operations.md").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]+):", makefile, re.MULTILINE)) - {"venv", "protos", "clean"}
    missing = sorted(t for t in targets if f"make {t}" not in readme)
    assert missing == [], f"undocumented make targets: {missing}"


def service_help() -> str:
    """The --help of the three services: every environment variable they read is named there as $NAME."""
    import argparse
    import contextlib
    import io
    import os

    from logo_service.settings import add_arguments as logo_arguments
    from model_server.settings import build_parser as model_server_parser
    from router_service.settings import parse_settings

    os.environ["COLUMNS"] = "1000"  # argparse wraps help at the terminal's width, which would split the names
    text = model_server_parser().format_help()
    logo = argparse.ArgumentParser()
    logo_arguments(logo)
    text += logo.format_help()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parse_settings(["--help"])
    return text + out.getvalue()


def test_every_environment_variable_is_documented():
    readme = (ROOT / "README.md").read_text()
    prefixes = ("MODEL_SERVER_", "LOGO_", "ROUTER_", "LOGO_SERVICE_")
    names = set(re.findall(r"\$([A-Z][A-Z0-9_]+)", service_help()))
    assert {"ROUTER_LOGO_POLICY", "LOGO_GALLERY_DIR", "MODEL_SERVER_MAX_IMAGE_PIXELS"} <= names

    def documented(name: str) -> bool:
        generic = [name[len(p):] for p in prefixes if name.startswith(p)]
        flag_rule = name.startswith("MODEL_SERVER_") and "`MODEL_SERVER_<FLAG>`" in readme  # one rule for all flags
        return (name in readme or flag_rule
                or any(f"`_{suffix}`" in readme or f"`..._{suffix}`" in readme for suffix in generic))

    assert sorted(n for n in names if not documented(n)) == []
