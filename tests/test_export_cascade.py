"""The cascade export (training.export_cascade) and the ensemble rebuild it stands on (training.lite_savedmodel)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.export_cascade import cascade_answers, choose_threshold

ROOT = Path(__file__).resolve().parents[1]


def test_threshold_is_the_lowest_that_keeps_the_agreement():
    # 10 rows; the first member agrees with the ensemble on its 7 most confident rows only
    conf = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5])
    first = np.stack([conf, 1 - conf], 1)
    agree = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], bool)
    ensemble = np.where(agree[:, None], first, first[:, ::-1])
    threshold = choose_threshold(first, ensemble, agreement=1.0)
    assert threshold == pytest.approx(0.65)  # rows below it go to the full ensemble
    answers = cascade_answers(first, ensemble, threshold)
    assert (answers.argmax(1) == ensemble.argmax(1)).all()
    assert (answers[:7] == first[:7]).all() and (answers[7:] == ensemble[7:]).all()
    # a looser target skips more: 90 % agreement lets one disagreeing row answer alone
    assert choose_threshold(first, ensemble, agreement=0.9) == pytest.approx(0.6)


def test_a_first_member_that_never_agrees_always_asks_the_ensemble():
    first = np.array([[0.9, 0.1], [0.8, 0.2]])
    ensemble = first[:, ::-1]
    threshold = choose_threshold(first, ensemble, agreement=0.99)
    assert threshold > 1 and (cascade_answers(first, ensemble, threshold) == ensemble).all()


@pytest.mark.slow
def test_the_served_ensemble_rebuilds_exactly_from_its_savedmodel():
    from training.lite_savedmodel import check
    from dataset.split import load_split

    versions = sorted((p for p in (ROOT / "serving_models" / "efficientnet_lite0").iterdir() if p.name.isdigit()),
                      key=lambda p: int(p.name))
    source = next(v for v in versions if "ensemble" in (v / "model_card.json").read_text())
    photos = [p.path for p in load_split() if p.split == "test"][:4]
    assert check(source, photos) < 1e-5
