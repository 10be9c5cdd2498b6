"""Training the EfficientNet-Lite heads (training/train_lite.py): CutMix on the cached activations,
and --with-val, the shipped model's recipe, end to end on a tiny synthetic feature cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from dataset.split import data_dir, load_split, split_hash
from training.train_lite import cutmix


def test_cutmix_pastes_one_box_and_mixes_the_labels_by_its_area():
    rng = np.random.default_rng(3)
    n, h, w, classes = 6, 20, 20, 7
    x = rng.normal(size=(n, h, w, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 4, 5])
    for _ in range(20):
        mixed, target = cutmix(x, y, classes, rng)
        assert mixed.shape == x.shape and target.shape == (n, classes)
        np.testing.assert_allclose(target.sum(1), 1, atol=1e-6)
        changed = (mixed != x).any(axis=3)  # [n, h, w]: where another photo's activations were pasted
        for i in range(n):
            own = target[i, y[i]]
            if own == 1:  # an empty box, or the photo was paired with itself
                continue
            rows, cols = np.nonzero(changed[i])
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box == len(rows), "the pasted region is one rectangle"
            assert own == pytest.approx(1 - box / (h * w))  # the label's weight is the area left to the photo
            donor = int(np.argmax(target[i] * (np.arange(classes) != y[i])))
            np.testing.assert_array_equal(mixed[i][changed[i]], x[list(y).index(donor)][changed[i]])
        assert not np.shares_memory(mixed, x)  # the cache (a read-only memory map) is never written


def _synthetic_cache(out: Path, size: int, cut: int, per_class: dict[str, int]) -> None:
    """A finished training.lite_features cache of random activations over a few real photos of
    every brand plugin's makes (so every brand head has train, val and test photos)."""
    from training.efficientnet_lite import build_parts

    photos = load_split()
    plugins = load_plugins(DEFAULT_PLUGINS_DIR, data_dir(), check_logos=False).values()
    makes = {m for p in plugins if p.model for m in p.makes}
    shape = build_parts("lite0", size, cut)[0].output.shape[1:]
    meta = {"config": {"variant": "lite0", "size": size, "cut": cut, "views": 2, "split_hash": split_hash(photos)},
            "ids": {}, "class_ids": {}, "progress": {}}
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        chosen = []
        for make in sorted(makes):
            chosen += [p for p in photos if p.split == split and p.make == make][:count]
        views = 2 if split == "train" else 1
        meta["ids"][split] = [p.image_id for p in chosen]
        meta["class_ids"][split] = [p.class_id for p in chosen]
        meta["progress"].update({f"{split}/{v}": len(chosen) for v in range(views)})
        np.save(out / f"features-{split}.npy", rng.normal(size=(views, len(chosen), *shape)).astype(np.float16))
    (out / "features.json").write_text(json.dumps(meta))


@pytest.mark.slow  # the ImageNet weights need torch, a training dependency (make test-slow installs it)
def test_with_val_trains_on_train_and_val_and_borrows_the_temperatures(tmp_path, capsys):
    from training import train_lite

    cache = tmp_path / "cache"
    cache.mkdir()
    _synthetic_cache(cache, size=64, cut=15, per_class={"train": 8, "val": 4, "test": 3})
    meta = json.loads((cache / "features.json").read_text())
    common = ["--run", str(cache), "--epochs", "2", "--batch", "8", "--cutmix", "0.5"]
    train_lite.main([*common, "--out", str(tmp_path / "train-only")])
    n_train, n_val = len(meta["ids"]["train"]), len(meta["ids"]["val"])
    assert f"step {n_train // 8}/{n_train // 8} " in capsys.readouterr().out
    train_only = json.loads((tmp_path / "train-only" / "lite.json").read_text())
    assert "val_is_training_data" not in train_only["heads"]["global"]

    with pytest.raises(SystemExit):  # val cannot calibrate a model trained on it
        train_lite.main([*common, "--out", str(tmp_path / "refused"), "--with-val"])
    capsys.readouterr()
    train_lite.main([*common, "--out", str(tmp_path / "shipped"), "--with-val",
                     "--temperatures-from", str(tmp_path / "train-only")])
    steps = (n_train + n_val) // 8  # an epoch shows every train and val photo once
    assert f"step {steps}/{steps} " in capsys.readouterr().out
    shipped = json.loads((tmp_path / "shipped" / "lite.json").read_text())
    assert shipped["config"]["with_val"] and shipped["config"]["cutmix"] == 0.5
    for name, head in shipped["heads"].items():  # every head: the train-only run's temperature, val marked
        assert head["temperature"] == train_only["heads"][name]["temperature"]
        assert head["temperature_from"] == str(tmp_path / "train-only") and head["val_is_training_data"]
    assert all(epoch["val_is_training_data"] for epoch in shipped["history"])
    heads = np.load(tmp_path / "shipped" / "heads.npz")
    assert heads["global/kernel"].shape == (1280, len(train_only["classes"]))
