"""The EfficientNet-Lite export: one SavedModel, a signature per head, the trunk
shared, and in-graph preprocessing identical to the training-time pipeline.

Uses a randomly initialised Lite0 trunk (the ImageNet weights need torch, a
training-only dependency) at 64 px with two heads, on real photos; and checks
the shipped model's card against the split and the plugins."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from training import data
from training.efficientnet_lite import build_parts, block_list
from training.export_lite import export_savedmodel
from training.split import data_dir, load_split, split_hash

SIZE = 64
SHIPPED_BASE = Path(__file__).resolve().parent.parent / "serving_models" / "efficientnet_lite0"
# the version TF Serving serves: the highest numeric folder
SHIPPED = max((p for p in SHIPPED_BASE.glob("*") if p.name.isdigit()), key=lambda p: int(p.name), default=SHIPPED_BASE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    bottom, top = build_parts("lite0", SIZE, cut=11)
    rng = np.random.default_rng(0)
    heads = {
        "serving_default": {"kernel": rng.normal(0, 0.05, (1280, 5)).astype(np.float32),
                            "bias": np.zeros(5, np.float32), "labels": [f"Make|M{i}|2012" for i in range(5)]},
        "audi": {"kernel": rng.normal(0, 0.05, (1280, 2)).astype(np.float32),
                 "bias": np.ones(2, np.float32), "labels": ["Audi|A|2012", "Audi|B|2012"]},
    }
    out = export_savedmodel(bottom, top, heads, SIZE, tmp_path_factory.mktemp("lite") / "1")
    photos = [p for p in load_split() if p.split == "val"][:6]
    return out, tf.saved_model.load(str(out)), bottom, top, heads, photos


def test_one_savedmodel_with_a_signature_per_head(exported):
    out, loaded, *_ = exported
    assert set(loaded.signatures) == {"serving_default", "audi"}
    assert (out / "assets" / "labels.txt").read_text().splitlines() == [f"Make|M{i}|2012" for i in range(5)]
    assert (out / "assets" / "labels_audi.txt").read_text().splitlines() == ["Audi|A|2012", "Audi|B|2012"]
    for name, classes in (("serving_default", 5), ("audi", 2)):
        sig = loaded.signatures[name]
        assert list(sig.structured_input_signature[1]) == ["image_bytes"]
        assert sig.structured_outputs["probabilities"].shape.as_list() == [None, classes]


def test_in_graph_preprocessing_matches_training(exported):
    """Served probabilities from raw bytes == the training-time path (preprocess -> trunk -> head)."""
    _, loaded, bottom, top, heads, photos = exported
    blobs = [p.path.read_bytes() for p in photos]
    images = np.stack([data.preprocess(tf.constant(b), SIZE).numpy() for b in blobs])
    features = top(bottom(images, training=False), training=False).numpy()
    for name, head in heads.items():
        expected = tf.nn.softmax(features @ head["kernel"] + head["bias"]).numpy()
        served = loaded.signatures[name](image_bytes=tf.constant(blobs))
        assert np.abs(served["probabilities"].numpy() - expected).max() < 1e-4
        assert served["labels"].numpy()[0].astype(str).tolist() == head["labels"]


def test_empty_batch_and_bad_bytes(exported):
    _, loaded, *_ = exported
    empty = loaded.signatures["audi"](image_bytes=tf.constant([], tf.string))
    assert empty["probabilities"].shape == (0, 2)
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
