"""What the router tells clients about each served model, from the model card beside its version.

Every exported version carries `serving_models/<model>/<version>/model_card.json`
(architecture, input size, how it was trained) and, once `make evaluate` has
scored it, an `evaluation` section with its test figures per signature
(written by `python -m evaluation.model_cards`). TF Serving does not serve these
files, so the router reads them from `ROUTER_MODEL_CARDS_DIR` (the same tree
TF Serving loads; docker-compose mounts it read-only). A model without a card
is listed without figures; nothing breaks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.model_card import CardError, read_card

PLACEHOLDER_BELOW = 0.5  # under half the default's test top-1: a placeholder, not a classifier


@dataclass(frozen=True)
class CardSummary:
    architecture: str = ""
    input_size: int = 0
    photos: int = 0
    top1: float | None = None
    make_top1: float | None = None
    ece: float | None = None
    # For a brand signature: whether it answers with a head trained on the brand's photos alone
    # (the card's brand_trained_signatures) or with the global answer restricted to the brand.
    brand_trained: bool = False


class ModelCards:
    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._cache: dict[tuple[str, int, str], CardSummary] = {}

    def summary(self, name: str, version: int, signature: str) -> CardSummary:
        key = (name, version, signature)
        if key not in self._cache:  # cards of a version never change: read once
            self._cache[key] = self._read(name, version, signature)
        return self._cache[key]

    def _read(self, name: str, version: int, signature: str) -> CardSummary:
        if self.root is None or not version:
            return CardSummary()
        try:
            card = read_card(self.root / name / str(version))
        except CardError:
            return CardSummary()
        size = card.get("input_size") or [0]
        scores = (card.get("evaluation") or {}).get("signatures", {}).get(signature) or {}
        architecture = card.get("architecture", "")
        brand_trained = signature in ((card.get("brand_trained_signatures") or {}).get("signatures") or [])
        return CardSummary(architecture=architecture.split(";")[0].strip() if isinstance(architecture, str) else "",
                           input_size=int(size[0]) if isinstance(size, list) and size else 0,
                           photos=int(scores.get("photos", 0)), top1=scores.get("top1"),
                           make_top1=scores.get("make_top1"), ece=scores.get("ece"), brand_trained=brand_trained)


def standing(summary: CardSummary, default: CardSummary, is_default: bool, brand: str = "") -> tuple[bool, str]:
    """(placeholder?, a sentence) for a model next to the default global model."""
    if is_default:
        return False, "the default global model"
    if brand:  # scored on its brand's photos only: not comparable with the default's figure over all makes
        how = ("a head trained on this brand's photos alone" if summary.brand_trained
               else "the model's global answer restricted to this brand")
        scored = "" if summary.top1 is None else f"; test top-1 {summary.top1:.3f} on the brand's {summary.photos} photos"
        return False, how + scored
    if summary.top1 is None or default.top1 is None:
        return False, "no test figures in its model card"
    if summary.top1 < PLACEHOLDER_BELOW * default.top1:
        return True, (f"placeholder: test top-1 {summary.top1:.3f} against the default's {default.top1:.3f}; "
                      "never routed to, reachable only with force_model")
    return False, f"test top-1 {summary.top1:.3f} (the default: {default.top1:.3f})"
