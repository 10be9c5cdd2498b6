"""The split keeps near-duplicates on one side, and the detector finds a recropped, recoloured copy."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from dataset.near_duplicates import cross_class_pairs, sift_features, similarity_inliers
from dataset.split import SPLIT_ORDER, keep_groups_together, load_split, near_duplicate_groups


def test_no_near_duplicate_group_straddles_the_split():
    groups = near_duplicate_groups()
    assert groups, "dataset/near_duplicate_groups.json is missing or empty"
    split = {p.image_id: p.split for p in load_split()}
    for group in groups:
        assert len({split[i] for i in group}) == 1, group


def test_a_straddling_group_moves_towards_train_and_nothing_else_moves():
    assignment = {"a": "test", "b": "val", "c": "test", "d": "train", "e": "test", "f": "val"}
    moved = keep_groups_together(assignment, [["a", "b"], ["c", "d"], ["e"], ["f", "gone"]])
    assert moved == {"a": "val", "b": "val", "c": "train", "d": "train", "e": "test", "f": "val"}
    assert all(SPLIT_ORDER.index(moved[k]) <= SPLIT_ORDER.index(v) for k, v in assignment.items())


def _write(path, image) -> None:
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 85])


def test_sift_links_a_recropped_recoloured_copy_but_not_another_photo_of_the_class(tmp_path):
    everyone = load_split()
    photos = [p for p in everyone if p.class_id == everyone[0].class_id][:2]
    original = cv2.imread(str(photos[0].path))
    h, w = original.shape[:2]
    crop = original[h // 10 : h - h // 20, w // 12 : w - w // 10]
    recoloured = cv2.cvtColor(crop, cv2.COLOR_BGR2HSV)
    recoloured[..., 0] = (recoloured[..., 0].astype(int) + 60) % 180  # another paint colour
    copy = cv2.resize(cv2.cvtColor(recoloured, cv2.COLOR_HSV2BGR), None, fx=0.8, fy=0.8)
    _write(tmp_path / "copy.jpg", copy)

    reference = sift_features(photos[0].path)
    assert similarity_inliers(reference, sift_features(tmp_path / "copy.jpg")) >= 25
    assert similarity_inliers(reference, sift_features(photos[1].path)) < 25
    blank = np.full_like(original, 128)
    _write(tmp_path / "blank.jpg", blank)
    assert similarity_inliers(reference, sift_features(tmp_path / "blank.jpg")) == 0


def test_cross_class_pass_links_the_same_photo_filed_under_another_class_only(tmp_path):
    everyone = load_split()
    first = everyone[0]
    others = [p for p in everyone if p.class_id != first.class_id][:10]
    original = cv2.imread(str(first.path))
    h, w = original.shape[:2]
    _write(tmp_path / "twin.jpg", cv2.resize(original[h // 12 :, : w - w // 12], None, fx=0.9, fy=0.9))
    twin = dataclasses.replace(others[0], image_id="twin", path=tmp_path / "twin.jpg")  # another class's label
    photos = [first, twin, *others]
    pairs = cross_class_pairs(photos, min_inliers=60)
    assert [(photos[i].image_id, photos[j].image_id) for i, j, _ in pairs] == [(first.image_id, "twin")]
