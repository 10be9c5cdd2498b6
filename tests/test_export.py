"""The SavedModel export (`training.export.export_model`, what `make gpu-import` calls): TF Serving layout,
the serving_default contract, preprocessing identical to training, brand signatures. Builds a small
classifier of the shape the GPU import hands it (layer "trunk" + Dense softmax "head"; 32 px, 2 Acura +
2 Audi classes), trains it for a few steps on real photos from ../shared/data (so its temperature is
fitted on something), and exports it."""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from model_server.repository import load_servable
from model_server.warmup import run_warmup
from training import data, export
from dataset.split import load_split, split_hash

SIZE = 32
# A small convolutional trunk, not a ResNet50: export_model reads only the layers "trunk" and "head", and
# the served ResNet50s went through it in `make gpu-import` (tests/test_train_gpu.py runs that import).
ARCHITECTURE = "three conv + BatchNorm blocks + Dense softmax (a test)"


def build_model(size: int, num_classes: int) -> keras.Model:
    inputs = keras.Input((size, size, 3), name="image")
    trunk = keras.Sequential([keras.Input((size, size, 3)),
                              keras.layers.Conv2D(16, 3, strides=2, use_bias=False), keras.layers.BatchNormalization(),
                              keras.layers.ReLU(),
                              keras.layers.Conv2D(64, 3, strides=2, use_bias=False), keras.layers.BatchNormalization(),
                              keras.layers.ReLU(),
                              keras.layers.Conv2D(128, 3, strides=2, use_bias=False), keras.layers.BatchNormalization(),
                              keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D()], name="trunk")
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(trunk(inputs))
    return keras.Model(inputs, outputs)


# A 16x16 gradient saved by Pillow as a CMYK (Adobe) JPEG: synthetic, not from the data set.
CMYK_JPEG = base64.b64decode(
    "/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwADAgIDAgIDAwMDBAMDBAUIBQUEBAUKBwcGCAwKDAwLCgsLDQ4SEA0OEQ4LCxAWEBETFBUVFQwPFxgWFBgSFBUU"
    "/8AAFAgAEAAQBEMRAE0RAFkRAEsRAP/EAB8AAAEFAQEBAQEBAAAAAAAAAAABAgMEBQYHCAkKC//EALUQAAIBAwMCBAMFBQQEAAABfQECAwAEEQUSITFB"
    "BhNRYQcicRQygZGhCCNCscEVUtHwJDNicoIJChYXGBkaJSYnKCkqNDU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6g4SFhoeIiYqS"
    "k5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrCw8TFxsfIycrS09TV1tfY2drh4uPk5ebn6Onq8fLz9PX29/j5+v/aAA4EQwBNAFkASwAAPwD4/wD2bf8A"
    "l1/Cvj//AIZt/wCnX/x2iv1Tr9Vf2bf+XX8KP+Gbf+nX/wAdoor8qv2bf+XX8K/VX/hm3/p1/wDHaKK/VX9m3/l1/Cj/AIZt/wCnX/x2iiv/2Q=="
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(version folder, loaded SavedModel, Keras model, classes, sample photos) of a freshly
    trained + exported model."""
    tmp = tmp_path_factory.mktemp("export")
    photos = load_split()
    every = data.class_list(photos)
    classes = [c for c in every if c.make == "Acura"][:2] + [c for c in every if c.make == "Audi"][:2]
    ids = {c.class_id for c in classes}
    train = [p for p in photos if p.split == "train" and p.class_id in ids]
    keras.utils.set_random_seed(0)
    model = build_model(SIZE, len(classes))
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="categorical_crossentropy")
    model.run_eagerly = True  # 3 eager steps: ~4 s; tracing the train step would take ~25 s
    model.fit(data.make_dataset(train, classes, SIZE, 16, training=True).take(3), verbose=0)
    export.export_model(model, classes, SIZE, model_name="tiny", version=1, base=tmp / "models",
                        brand_signatures=True, architecture=ARCHITECTURE,
                        preprocessing={**data.PREPROCESSING, "size": SIZE}, scope="4 classes (a test)",
                        trained_split_hash=split_hash(photos), training={"steps": 3}, command="tests/test_export.py")
    sample = [p for p in photos if p.split == "val" and p.class_id in ids][:8]
    version_dir = tmp / "models" / "tiny" / "1"
    return version_dir, tf.saved_model.load(str(version_dir)), model, classes, sample


def test_tf_serving_layout(exported):
    version_dir, _, _, classes, _ = exported
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables" / "variables.index").is_file()
    assert (version_dir / "assets" / "labels.txt").is_file()
    assert not (version_dir.parent / ".tmp-1").exists()
    # warm-up records for every signature, which the model server replays while loading the version
    servable = load_servable("tiny", 1, version_dir, ["serve"])
    assert run_warmup(servable, version_dir) == len(servable.functions) == 2
    card = json.loads((version_dir / "model_card.json").read_text())
    assert card["num_classes"] == 4 and card["input_size"] == [SIZE, SIZE, 3]
    assert {"val", "test", "float16_vs_float32"} <= set(card["metrics"])
    assert set(card["signatures"]) == {"serving_default", "audi"}  # no other plugin's make is among the classes
    assert card["signatures"]["audi"]["metrics"]["test"]["n"] > 0 and 0.3 <= card["temperature"]["value"] <= 5
    # float16 weights only: ~2 bytes per parameter, no float32 copy saved beside them.
    assert card["export"]["variables_bytes"] < 2.2 * card["parameters"]


def test_signature_contract(exported):
    _, loaded, _, classes, _ = exported
    sig = loaded.signatures["serving_default"]
    inputs = sig.structured_input_signature[1]
    assert list(inputs) == ["image_bytes"]
    assert inputs["image_bytes"].dtype == tf.string and inputs["image_bytes"].shape.as_list() == [None]
    outputs = sig.structured_outputs
    assert set(outputs) == {"probabilities", "labels"}
    assert outputs["probabilities"].dtype == tf.float32 and outputs["probabilities"].shape.as_list() == [None, 4]
    assert outputs["labels"].dtype == tf.string and outputs["labels"].shape.as_list() == [None, 4]


def test_labels_asset_matches(exported):
    version_dir, loaded, _, classes, sample = exported
    expected = [f"{c.make}|{c.model}|{c.year}" for c in classes]
    assert (version_dir / "assets" / "labels.txt").read_text().splitlines() == expected
    assert Path(loaded.label_assets["serving_default"].asset_path.numpy().decode()).name == "labels.txt"
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([p.path.read_bytes() for p in sample[:2]]))
    rows = out["labels"].numpy().astype(str).tolist()
    assert rows == [expected, expected]


def test_in_graph_preprocessing_matches_training(exported):
    version_dir, loaded, model, _, sample = exported
    temperature = json.loads((version_dir / "model_card.json").read_text())["temperature"]["value"]
    blobs = [p.path.read_bytes() for p in sample]
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
    served = served["probabilities"].numpy()
    # The training-time pipeline on the same files, through the Keras model with fp16-rounded weights.
    model.set_weights([w.astype(np.float16).astype(np.float32) for w in model.get_weights()])
    train_ds = data.make_dataset(sample, data.class_list(sample), SIZE, batch=8, training=False)
    images = np.concatenate([x.numpy() for x, _ in train_ds])
    reference = tf.nn.softmax(np.log(model.predict(images, verbose=0)) / temperature).numpy()
    assert np.abs(served.sum(axis=1) - 1).max() < 1e-5
    assert np.abs(served - reference).max() < 1e-4
    # ...and the comparison can tell preprocessings apart: resizing without antialias
    # (a plausible slip) moves the served probabilities well past the 1e-4 tolerance, even
    # through this barely trained model's high temperature (which flattens them).
    no_antialias = [tf.image.resize(tf.cast(data.decode(tf.constant(b)), tf.float32), [SIZE, SIZE]) for b in blobs]
    other = tf.nn.softmax(np.log(model.predict(tf.stack(no_antialias) / 127.5 - 1.0, verbose=0)) / temperature)
    assert np.abs(other - reference).max() > 3e-4


def test_decodes_odd_formats_and_rejects_garbage(exported):
    _, loaded, _, _, sample = exported
    sig = loaded.signatures["serving_default"]
    rgb = data.decode(tf.constant(sample[0].path.read_bytes()))
    rgba = tf.concat([rgb, tf.fill(tf.concat([tf.shape(rgb)[:2], [1]], 0), tf.constant(128, tf.uint8))], -1)
    blobs = [
        tf.io.encode_png(rgb),  # PNG
        tf.io.encode_png(rgba),  # RGBA PNG
        tf.io.encode_png(tf.image.rgb_to_grayscale(rgb)),  # grayscale PNG
        tf.io.encode_jpeg(tf.image.rgb_to_grayscale(rgb)),  # grayscale JPEG
        tf.constant(CMYK_JPEG),  # CMYK JPEG
    ]
    probs = sig(image_bytes=tf.stack(blobs))["probabilities"].numpy()
    assert probs.shape == (5, 4) and np.isfinite(probs).all()
    cmyk = data.decode(tf.constant(CMYK_JPEG)).numpy().astype(int)
    assert cmyk.shape == (16, 16, 3) and math.isclose(cmyk[0, 15, 0], 240, abs_tol=4)  # red ramps across x
    with pytest.raises(tf.errors.InvalidArgumentError):
        sig(image_bytes=tf.constant([sample[0].path.read_bytes(), b"not an image"]))
    empty = sig(image_bytes=tf.constant([], tf.string))
    assert empty["probabilities"].shape == (0, 4) and empty["labels"].shape == (0, 4)


def test_brand_signature_is_the_global_softmax_restricted_to_the_brand(exported):
    version_dir, loaded, _, classes, sample = exported
    audi = [i for i, c in enumerate(classes) if c.make == "Audi"]
    blobs = tf.constant([p.path.read_bytes() for p in sample])
    everything = loaded.signatures["serving_default"](image_bytes=blobs)["probabilities"].numpy()
    brand = loaded.signatures["audi"](image_bytes=blobs)
    expected = everything[:, audi] / everything[:, audi].sum(axis=1, keepdims=True)
    assert np.abs(brand["probabilities"].numpy() - expected).max() < 1e-5
    labels = [classes[i].label for i in audi]
    assert brand["labels"].numpy().astype(str).tolist() == [labels] * len(sample)
    assert (version_dir / "assets" / "labels_audi.txt").read_text().splitlines() == labels
