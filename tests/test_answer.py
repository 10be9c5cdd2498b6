"""The router's answer: the most probable make first, then that make's most probable class."""
from __future__ import annotations

import numpy as np
import pytest

from router_service.routing import choose_answer
from router_service.tf_serving import Label, Prediction, make_index


def prediction(rows: list[tuple[str, float]]) -> Prediction:
    labels = [Label.parse(f"{make}|Model {i}|2012") for i, (make, _) in enumerate(rows)]
    return Prediction(np.array([p for _, p in rows], np.float32), labels, version=1, signature="serving_default",
                      make_of_class=make_index(labels))


def test_spread_over_one_make_beats_a_single_top_class():
    # BMW has the top class (0.40), but Audi's two lookalikes hold 0.55 together
    best, make_probability = choose_answer(prediction([("BMW", 0.40), ("Audi", 0.30), ("Audi", 0.25), ("Ford", 0.05)]))
    assert best == 1 and make_probability == pytest.approx(0.55)


def test_the_top_class_wins_when_its_make_is_also_the_most_probable():
    best, make_probability = choose_answer(prediction([("Ford", 0.1), ("BMW", 0.5), ("Audi", 0.3), ("BMW", 0.1)]))
    assert best == 1 and make_probability == pytest.approx(0.6)


def test_one_make_model_is_certain_of_the_make():
    best, make_probability = choose_answer(prediction([("Audi", 0.2), ("Audi", 0.7), ("Audi", 0.1)]))
    assert best == 1 and make_probability == pytest.approx(1.0)
