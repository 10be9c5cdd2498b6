"""The EfficientNet-Lite export: one SavedModel, a signature per head, the trunk
shared, and in-graph preprocessing identical to the training-time pipeline.

Uses randomly initialised Lite0 parts (the ImageNet weights need torch, a
training-only dependency) at 64 px: an ensemble of two members fine-tuned from
different blocks (one bottom, the bridge between the two cuts, two tops), with
two heads each, on real photos; and checks the shipped model's card against the
split and the plugins."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common.model_card import write_card
from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from training import data
from training.efficientnet_lite import build_parts, block_list
from router_service.tf_serving import MEMBER_CONFIDENCES
from training.export_lite import bridge, choose_temperatures, copy_weights_by_name, export_savedmodel
from dataset.split import data_dir, load_split, split_hash

SIZE = 64
TEMPERATURES = {"serving_default": 0.8, "audi": 1.5}  # the ensemble's, one per signature
SHIPPED_BASE = Path(__file__).resolve().parent.parent / "serving_models" / "efficientnet_lite0"
# the version TF Serving serves: the highest numeric folder
SHIPPED = max((p for p in SHIPPED_BASE.glob("*") if p.name.isdigit()), key=lambda p: int(p.name), default=SHIPPED_BASE)


def he_normal(model, rng: np.random.Generator) -> None:
    """Keras' default init shrinks the activations to ~1e-12 through these blocks, so every head would
    answer its bias alone; He-normal kernels keep the features O(1) and make the test see the trunk."""
    for weight in model.weights:
        if weight.path.endswith("kernel"):
            shape = weight.shape
            fan_in = shape[0] * shape[1] * (1 if "_dw" in weight.path else shape[2])
            weight.assign(rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32))


GLOBAL_LABELS = ["Make|M0|2012", "Audi|A|2012", "Make|M2|2012", "Audi|B|2012", "Make|M4|2012"]
AUDI = [1, 3]  # the Audi classes among the global ones


def random_heads(rng: np.random.Generator) -> dict:
    """A global head and an Audi head (for a single run: the global layer restricted to Audi's classes)."""
    kernel, bias = rng.normal(0, 0.03, (1280, 5)).astype(np.float32), rng.normal(0, 1, 5).astype(np.float32)
    return {
        "serving_default": {"kernel": kernel, "bias": bias, "labels": GLOBAL_LABELS},
        "audi": {"kernel": kernel[:, AUDI], "bias": bias[AUDI], "labels": [GLOBAL_LABELS[i] for i in AUDI]},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An ensemble of two members, fine-tuned from block 11 and from block 6: the bottom ends at block 6,
    the cut-11 member's bridge (blocks 6..10) comes from its own bottom, a head set each."""
    bottom_11, top = build_parts("lite0", SIZE, cut=11)
    bottom, second_top = build_parts("lite0", SIZE, cut=6)
    rng = np.random.default_rng(0)
    for part in (bottom_11, top, bottom, second_top):
        he_normal(part, rng)
    copy_weights_by_name(bottom, bottom_11)  # frozen blocks hold the same (ImageNet) weights in every run
    bridges = {11: bridge("lite0", SIZE, 6, 11, bottom_11)}
    tops, heads = [top, second_top], [random_heads(rng), random_heads(rng)]
    out = export_savedmodel(bottom, tops, heads, SIZE, tmp_path_factory.mktemp("lite") / "1", TEMPERATURES,
                            bridges, cuts=[11, 6])
    photos = [p for p in load_split() if p.split == "val"][:6]
    return out, tf.saved_model.load(str(out)), bottom_11, bottom, tops, heads, photos


def test_one_savedmodel_with_a_signature_per_head(exported):
    out, loaded, *_ = exported
    assert set(loaded.signatures) == {"serving_default", "audi"}
    assert (out / "assets" / "labels.txt").read_text().splitlines() == GLOBAL_LABELS
    assert (out / "assets" / "labels_audi.txt").read_text().splitlines() == ["Audi|A|2012", "Audi|B|2012"]
    for name, classes in (("serving_default", 5), ("audi", 2)):
        sig = loaded.signatures[name]
        assert list(sig.structured_input_signature[1]) == ["image_bytes"]
        assert sig.structured_outputs["probabilities"].shape.as_list() == [None, classes]


def test_in_graph_preprocessing_matches_training(exported):
    """Served probabilities from raw bytes == the training-time path (preprocess -> each member's own bottom
    and top, and global head -> softmax), averaged over the ensemble's members and tempered:
    softmax(log(mean) / T); a brand signature restricts the mean to its classes before the temperature, so it
    ranks them exactly as the global answer restricted to the brand."""
    _, loaded, bottom_11, bottom_6, tops, heads, photos = exported
    blobs = [p.path.read_bytes() for p in photos]
    images = np.stack([data.preprocess(tf.constant(b), SIZE).numpy() for b in blobs])
    features = [top(bottom(images, training=False), training=False).numpy()
                for top, bottom in zip(tops, (bottom_11, bottom_6))]
    members = [tf.nn.softmax(f @ h["serving_default"]["kernel"] + h["serving_default"]["bias"]).numpy()
               for f, h in zip(features, heads)]
    assert np.abs(members[0] - members[1]).max() > 1e-3  # the members differ: the mean is tested
    mean = np.mean(members, 0)
    audi_mean = mean[:, AUDI] / mean[:, AUDI].sum(1, keepdims=True)
    for name, mean_of_its_classes in (("serving_default", mean), ("audi", audi_mean)):
        served = loaded.signatures[name](image_bytes=tf.constant(blobs))
        expected = tf.nn.softmax(np.log(mean_of_its_classes) / TEMPERATURES[name]).numpy()
        assert np.abs(served["probabilities"].numpy() - expected).max() < 1e-4
        assert served["labels"].numpy()[0].astype(str).tolist() == heads[0][name]["labels"]
        assert (MEMBER_CONFIDENCES in served) == (name == "serving_default")
    # each member's own top probability, for the open-set verdict (router_service/open_set.py)
    served_members = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))[MEMBER_CONFIDENCES]
    assert np.abs(served_members.numpy() - np.stack([m.max(1) for m in members], 1)).max() < 1e-5
    served_audi = loaded.signatures["audi"](image_bytes=tf.constant(blobs))["probabilities"].numpy()
    served_global = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))["probabilities"].numpy()
    assert (served_audi.argmax(1) == served_global[:, AUDI].argmax(1)).all()  # never worse than global restricted


def test_an_ensembles_brand_labels_must_be_global_classes(exported, tmp_path):
    _, _, _, bottom, tops, heads, _ = exported
    unknown = [{**h, "audi": {**h["audi"], "labels": ["Audi|A|2012", "Audi|Z|2012"]}} for h in heads]
    with pytest.raises(ValueError, match="global classes"):
        export_savedmodel(bottom, tops, unknown, SIZE, tmp_path / "1")


def test_ensemble_members_must_agree_on_labels(exported, tmp_path):
    _, _, _, bottom, tops, heads, _ = exported
    renamed = {**heads[1], "audi": {**heads[1]["audi"], "labels": ["Audi|B|2012", "Audi|A|2012"]}}
    with pytest.raises(ValueError, match="same labels"):
        export_savedmodel(bottom, tops, [heads[0], renamed], SIZE, tmp_path / "1")


def test_ensemble_temperatures_never_fitted_on_val_the_members_trained_on(tmp_path):
    train_only, trained_on_val = {"config": {"with_val": False}}, {"config": {"with_val": True}}
    fits = []

    def fit_on_val():
        fits.append(1)
        return {"serving_default": 0.9}

    assert choose_temperatures([train_only], None, fit_on_val) == (None, None)  # one run: its heads' own
    assert choose_temperatures([train_only, train_only], None, fit_on_val) == ({"serving_default": 0.9},
                                                                             "fitted on val")
    with pytest.raises(SystemExit, match="--temperatures-from"):
        choose_temperatures([train_only, trained_on_val], None, fit_on_val)
    assert len(fits) == 1
    twin = tmp_path / "twin"
    twin.mkdir()
    write_card(twin, {"name": "efficientnet_lite0", "architecture": "the train-only twin", "input_size": [320, 320],
                      "ensemble_temperatures": TEMPERATURES})
    assert choose_temperatures([trained_on_val, trained_on_val], twin, fit_on_val) == (TEMPERATURES,
                                                                                     f"taken from {twin}")
    assert len(fits) == 1  # the twin's were used, val was not touched


def test_empty_batch_and_bad_bytes(exported):
    _, loaded, *_ = exported
    empty = loaded.signatures["audi"](image_bytes=tf.constant([], tf.string))
    assert empty["probabilities"].shape == (0, 2)
    assert loaded.signatures["serving_default"](image_bytes=tf.constant([], tf.string))[MEMBER_CONFIDENCES].shape == (0, 2)
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_default"](image_bytes=tf.constant([b"not an image"]))


def test_port_builds_the_reference_architecture():
    """Block counts of the reference checkpoints: Lite0 _blocks.0..15, Lite2 _blocks.0..20."""
    assert len(block_list("lite0")) == 16
    assert len(block_list("lite2")) == 21
    assert block_list("lite2")[-1].filters_out == 352


@pytest.mark.skipif(not (SHIPPED / "model_card.json").exists(), reason="no shipped EfficientNet-Lite model")
def test_shipped_model_card_matches_split_and_plugins():
    card = json.loads((SHIPPED / "model_card.json").read_text())
    # trained on this split or an older one (photos only move into train), measured on this one
    assert card["evaluation"]["split_hash"] == split_hash(load_split())
    plugins = load_plugins(DEFAULT_PLUGINS_DIR, data_dir(), check_logos=False)
    for plugin in plugins.values():
        if plugin.model and plugin.model.name == "efficientnet_lite0":
            signature = card["signatures"][plugin.model.signature]
            assert {c["make"] for c in signature["classes"]} == set(plugin.makes)
    assert card["signatures"]["serving_default"]["num_classes"] == 196
