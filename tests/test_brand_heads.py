"""The core of training/brand_heads.py on synthetic features: the restricted-global baseline, the logistic
regression, the comparison of one make and the decision rule (no model, no photos: well under 10 s); and,
marked slow, LiteServable's brand-trained signatures on a tiny exported ensemble."""
import json
from pathlib import Path

import numpy as np
import pytest

from training import brand_heads as bh


def blobs(rng: np.random.Generator, n: int, n_classes: int, dim: int, spread: float = 1.0):
    centres = rng.normal(0, 3, (n_classes, dim))
    y = rng.integers(0, n_classes, n)
    return centres[y] + rng.normal(0, spread, (n, dim)), y


def test_restricted_answer_is_the_global_one_renormalised_and_ranks_the_same():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 2, 6))
    kernels, biases = rng.normal(size=(2, 6, 9)), rng.normal(size=(2, 9))
    members = [2, 5, 7]
    whole = np.exp(bh.ensemble_log_probs(feats, kernels, biases))
    restricted = np.exp(bh.ensemble_log_probs(feats, kernels, biases, members))
    assert np.allclose(whole.sum(1), 1) and np.allclose(restricted.sum(1), 1)
    assert np.allclose(restricted, whole[:, members] / whole[:, members].sum(1, keepdims=True))
    assert (restricted.argmax(1) == whole[:, members].argmax(1)).all()


def test_baseline_temperature_changes_calibration_not_top1():
    rng = np.random.default_rng(1)
    logits = {s: rng.normal(size=(40, 4)) * 5 for s in ("val", "test")}
    y = {s: logits[s].argmax(1) ^ (rng.random(40) < 0.4) for s in ("val", "test")}  # often wrong, very sure
    y = {s: np.minimum(y[s], 3) for s in y}
    result = bh.restricted_baseline(logits, y)
    for s in ("val", "test"):
        assert result[s]["right"] == int((logits[s].argmax(1) == y[s]).sum())
    assert result["temperature"] > 1  # over-confident answers get softened
    assert result["val"]["nll"] < bh.scores(logits["val"], y["val"])["nll"]


def test_logistic_regression_learns_and_does_not_depend_on_feature_scale():
    rng = np.random.default_rng(2)
    x, y = blobs(rng, 300, 4, 10)
    kernel, bias = bh.fit_logreg(x[:200], y[:200], 4, l2=1e-2, steps=300)
    assert (np.argmax(x[200:] @ kernel + bias, 1) == y[200:]).mean() > 0.9
    # standardisation is folded into the weights: an affine change of the features gives the same logits
    k2, b2 = bh.fit_logreg(x[:200] * 10 + 3, y[:200], 4, l2=1e-2, steps=300)
    assert np.allclose((x[200:] * 10 + 3) @ k2 + b2, x[200:] @ kernel + bias, atol=1e-4)
    strong, _ = bh.fit_logreg(x[:200], y[:200], 4, l2=10.0, steps=300)
    assert np.abs(strong).sum() < np.abs(kernel).sum()


def test_a_brand_model_on_informative_features_beats_a_useless_global_head():
    rng = np.random.default_rng(3)
    x, y = blobs(rng, 240, 3, 8)
    feats = np.stack([x, x + rng.normal(0, 0.5, x.shape)], axis=1)  # two "members"
    split = {"train": slice(0, 120), "val": slice(120, 180), "test": slice(180, 240)}
    kernels, biases = rng.normal(0, 0.01, (2, 8, 10)), np.zeros((2, 10))  # a global head that knows nothing
    members = [1, 4, 6]
    result = bh.compare_make({s: feats[i] for s, i in split.items()}, {s: y[i] for s, i in split.items()},
                             kernels, biases, members, served_temperature=1.5)
    for where in ("member0", "ensemble"):
        for s in ("val", "test"):
            assert result[where]["brand_model"][s]["top1"] > 0.9 > 0.6 > result[where]["global_restricted"][s]["top1"]
    assert result["member0"]["brand_model"]["l2"] in bh.L2_GRID
    # the ensemble's T is transferred from member 0 (val is not clean for the second member)
    m0 = result["member0"]
    assert np.isclose(result["ensemble"]["brand_model"]["temperature"],
                      1.5 * m0["brand_model"]["temperature"] / m0["global_restricted"]["temperature"])
    assert result["ensemble"]["global_restricted"]["temperature"] == 1.5
    ship, gain = bh.decide(result)
    assert ship and gain["member0_val"] >= bh.MIN_VAL_GAIN


def fake_result(m0_val: int, m0_test: int, ens_test: int) -> dict:
    def side(val_gain, test_gain):
        return {"global_restricted": {"val": {"right": 50}, "test": {"right": 50}},
                "brand_model": {"val": {"right": 50 + val_gain}, "test": {"right": 50 + test_gain}}}
    return {"member0": side(m0_val, m0_test), "ensemble": side(0, ens_test)}


def test_decision_rule_needs_two_val_photos_and_no_test_loss():
    assert bh.decide(fake_result(2, 0, 0))[0]
    assert not bh.decide(fake_result(1, 3, 3))[0]  # one val photo is noise
    assert not bh.decide(fake_result(4, -1, 0))[0]  # worse on test
    assert not bh.decide(fake_result(4, 1, -2))[0]  # the served ensemble worse on test


def test_member_cuts_read_from_the_served_card():
    from training.lite_savedmodel import member_cuts

    card = json.loads((Path(__file__).resolve().parent.parent / bh.SERVED / "model_card.json").read_text())
    variant, cuts = member_cuts(card)
    assert variant == "lite0" and len(cuts) == len(card["training"]["members"]) and min(cuts) >= 1


@pytest.mark.slow
def test_a_brand_trained_signature_answers_from_its_own_heads_the_others_stay_restricted(tmp_path):
    """LiteServable(brand_trained={"audi"}) on a tiny two-member ensemble: audi is the mean of the members'
    audi heads, tempered; bmw is still the global mean restricted to BMW's classes, tempered."""
    import tensorflow as tf

    from training import data
    from training.efficientnet_lite import build_parts
    from training.export_lite import export_savedmodel
    from dataset.split import load_split

    size, rng = 64, np.random.default_rng(4)
    bottom, top_a = build_parts("lite0", size, cut=11)
    top_b = build_parts("lite0", size, cut=11)[1]
    for part in (bottom, top_a, top_b):
        for weight in part.weights:  # He-normal: Keras' default init leaves ~1e-12 features here
            if weight.path.endswith("kernel"):
                fan_in = np.prod(weight.shape[:-1]) if "_dw" not in weight.path else np.prod(weight.shape[:2])
                weight.assign(rng.normal(0, np.sqrt(2 / fan_in), weight.shape).astype(np.float32))
    labels = ["Audi|A|2012", "BMW|X|2012", "Audi|B|2012", "BMW|Y|2012", "Other|Z|2012"]
    audi, bmw = [0, 2], [1, 3]

    def member() -> dict:
        k, b = rng.normal(0, 0.05, (1280, 5)).astype(np.float32), rng.normal(0, 1, 5).astype(np.float32)
        own_k, own_b = rng.normal(0, 0.05, (1280, 2)).astype(np.float32), rng.normal(0, 1, 2).astype(np.float32)
        return {"serving_default": {"kernel": k, "bias": b, "labels": labels},
                "audi": {"kernel": own_k, "bias": own_b, "labels": [labels[i] for i in audi]},
                "bmw": {"kernel": k[:, bmw], "bias": b[bmw], "labels": [labels[i] for i in bmw]}}

    heads, temperatures = [member(), member()], {"serving_default": 0.9, "audi": 1.3, "bmw": 0.7}
    out = export_savedmodel(bottom, [top_a, top_b], heads, size, tmp_path / "1", temperatures,
                            brand_trained=frozenset({"audi"}))
    loaded = tf.saved_model.load(str(out))
    blobs = [p.path.read_bytes() for p in load_split() if p.split == "val"][:4]
    images = tf.stack([data.preprocess(tf.constant(b), size) for b in blobs])
    feats = [top(bottom(images, training=False), training=False).numpy() for top in (top_a, top_b)]

    def expected(name: str, restrict: list[int] | None) -> np.ndarray:
        head = "serving_default" if restrict else name
        mean = np.mean([bh.softmax(f @ h[head]["kernel"] + h[head]["bias"]) for f, h in zip(feats, heads)], 0)
        if restrict:
            mean = mean[:, restrict] / mean[:, restrict].sum(1, keepdims=True)
        return bh.softmax(np.log(mean) / temperatures[name])

    for name, restrict in (("audi", None), ("bmw", bmw)):
        served = loaded.signatures[name](image_bytes=tf.constant(blobs))["probabilities"].numpy()
        assert np.abs(served - expected(name, restrict)).max() < 1e-4
