"""The cascade export (training.export_cascade) and the ensemble rebuild it stands on (training.lite_savedmodel)."""
from __future__ import annotations

import json
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


def test_the_served_default_answers_as_the_reference_ensemble():
    """Issue 25's guard: the served default answers a fixed set of test photos as the full ensemble rebuilt
    from the same SavedModel's weights (training.lite_savedmodel) does, and serves each member's top
    probability (what the open-set verdict reads). A cascade answers with member 0's own probabilities
    where it is sure (its other members reported not run, -1), and as the ensemble elsewhere."""
    import tensorflow as tf

    from builders.logo_policy import latest_version
    from dataset.split import load_split
    from router_service.settings import DEFAULT_GLOBAL_MODEL
    from training import data
    from training.lite_savedmodel import load_ensemble

    served_dir = latest_version(DEFAULT_GLOBAL_MODEL)
    card = json.loads((served_dir / "model_card.json").read_text())
    photos = sorted((p for p in load_split() if p.split == "test"), key=lambda p: p.image_id)[::117][:8]
    blobs = tf.constant([p.path.read_bytes() for p in photos])
    served = tf.saved_model.load(str(served_dir)).signatures["serving_default"](image_bytes=blobs)
    reference = load_ensemble(served_dir)
    images = data.preprocess_batch(blobs, reference.size)
    members = [m.numpy() for m in reference.member_probabilities(images)]
    ensemble = reference.probabilities(images).numpy()
    confidences, probabilities = served["member_confidences"].numpy(), served["probabilities"].numpy()
    assert np.abs(confidences[:, 0] - members[0].max(1)).max() < 1e-5
    sure = np.zeros(len(photos), bool)
    if "cascade" in card:
        assert card["cascade"]["test"]["agreement_with_source"] >= 0.99  # measured on every test photo at export
        sure = confidences[:, 1] == -1
        assert (confidences[:, 0] >= card["cascade"]["threshold"]).tolist() == sure.tolist()
        assert np.abs(probabilities[sure] - members[0][sure]).max(initial=0) < 1e-5
    else:
        assert np.abs(confidences[:, 1] - members[1].max(1)).max() < 1e-5
    assert np.abs(probabilities[~sure] - ensemble[~sure]).max(initial=0) < 1e-5
    assert (probabilities.argmax(1) == ensemble.argmax(1)).all()
