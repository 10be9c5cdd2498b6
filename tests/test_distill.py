"""Distillation targets for the ResNet50s (training.train --teacher)."""
from __future__ import annotations

import numpy as np

from training import data
from dataset.split import load_split
from training.train import Config, teacher_targets


def test_teacher_targets_mix_label_and_teacher_restricted_to_the_model_classes(tmp_path):
    photos = [p for p in load_split() if p.split == "train"][:40]
    all_classes = data.class_list(load_split())
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (len(photos), len(all_classes))).astype(np.float32)
    np.savez(tmp_path / "teacher.npz", image_ids=np.array([p.image_id for p in photos]),
             class_ids=np.array([c.class_id for c in all_classes]), logits=logits)
    brand = [c for c in all_classes if c.make == photos[0].make]  # a brand model's classes
    cfg = Config(teacher=str(tmp_path / "teacher.npz"), teacher_weight=0.7, teacher_temperature=2.0)
    targets = teacher_targets(cfg, brand, photos)
    assert set(targets) == {p.image_id for p in photos if p.make == photos[0].make}
    index = {c.class_id: i for i, c in enumerate(brand)}
    columns = [c.class_id - 1 for c in brand]  # class ids 1..196 are the teacher's columns in order
    for p in photos:
        if p.image_id not in targets:
            continue
        t = targets[p.image_id]
        assert t.shape == (len(brand),) and abs(t.sum() - 1) < 1e-5 and t.min() >= 0
        z = logits[[q.image_id for q in photos].index(p.image_id), columns] / 2.0
        teacher = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        expected = 0.7 * teacher
        expected[index[p.class_id]] += 0.3
        np.testing.assert_allclose(t, expected, atol=1e-6)
