"""The fixed train / validation / test split of the shared Stanford Cars photos.

Stratified by class with a fixed seed; exact duplicate files (same SHA-256)
are kept together on one side, so no photo is both trained on and tested on.
Near-duplicates (the same press photo recropped or recoloured; the groups in
`near_duplicate_groups.json`, written by `python -m dataset.near_duplicates
--write-groups`) are kept together too: a group that the stratified draw spreads
over several splits moves whole to the earliest of them (train, then val, then
test). Photos only ever move towards train, so a model trained on the split
before the grouping still never saw a photo of today's val or test split.
Every consumer (training, the logo gallery, evaluation) calls `load_split`,
so they all agree on which photos are which.

    python -m dataset.split            # prints the split's sizes and hash
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SEED = 20261124
FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
from common.data import data_dir  # noqa: F401  (re-exported: the split's consumers import it from here)

NEAR_DUPLICATE_GROUPS = Path(__file__).with_name("near_duplicate_groups.json")
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class Photo:
    image_id: str
    path: Path
    class_id: int
    class_name: str
    make: str
    model: str
    year: int
    split: str


def read_labels(labels_csv: Path, images_root: Path) -> list[dict]:
    """Rows of a labels.csv-shaped file, with `path` resolved against images_root."""
    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["path"] = images_root / row["file"]
    return rows


def _assign(rows: list[dict]) -> dict[str, str]:
    """image_id -> split name. Deterministic for a given labels.csv and image bytes."""
    # Group exact duplicates; a group is placed as one unit under its first member's class.
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        digest = hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
        groups[digest].append(row)
    by_class: dict[str, list[list[dict]]] = defaultdict(list)
    for members in groups.values():
        members.sort(key=lambda r: r["image_id"])
        by_class[members[0]["class_id"]].append(members)

    rng = random.Random(SEED)
    assignment: dict[str, str] = {}
    for class_id in sorted(by_class, key=int):
        units = sorted(by_class[class_id], key=lambda g: g[0]["image_id"])
        rng.shuffle(units)
        n = sum(len(g) for g in units)
        n_val = round(n * FRACTIONS["val"])
        n_test = round(n * FRACTIONS["test"])
        placed = {"test": 0, "val": 0}
        for group in units:
            if placed["test"] < n_test:
                name = "test"
            elif placed["val"] < n_val:
                name = "val"
            else:
                name = "train"
            if name in placed:
                placed[name] += len(group)
            for row in group:
                assignment[row["image_id"]] = name
    return keep_groups_together(assignment, near_duplicate_groups())


def near_duplicate_groups(path: Path = NEAR_DUPLICATE_GROUPS) -> list[list[str]]:
    """Groups of image ids that are near-duplicates of each other (none when the file is absent)."""
    return json.loads(path.read_text())["groups"] if path.exists() else []


def keep_groups_together(assignment: dict[str, str], groups: list[list[str]]) -> dict[str, str]:
    """Move every group that straddles splits to the earliest split among its members."""
    moved = dict(assignment)
    for group in groups:
        members = [i for i in group if i in moved]
        if members:
            target = min((moved[i] for i in members), key=SPLIT_ORDER.index)
            for image_id in members:
                moved[image_id] = target
    return moved


def load_split(root: Path | None = None) -> list[Photo]:
    """All shared photos with their split, in image_id order."""
    root = (root or data_dir()) / "stanford_cars"
    rows = read_labels(root / "labels.csv", root)
    assignment = _assign(rows)
    return [
        Photo(
            image_id=r["image_id"],
            path=Path(r["path"]),
            class_id=int(r["class_id"]),
            class_name=r["class_name"],
            make=r["make"],
            model=r["model"],
            year=int(r["year"]),
            split=assignment[r["image_id"]],
        )
        for r in sorted(rows, key=lambda r: r["image_id"])
    ]


def split_hash(photos: list[Photo]) -> str:
    """A short fingerprint of the split (which image went where), for model cards."""
    text = "\n".join(f"{p.image_id},{p.split}" for p in photos)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


if __name__ == "__main__":
    photos = load_split()
    counts = defaultdict(int)
    for p in photos:
        counts[p.split] += 1
    print(dict(counts), "hash", split_hash(photos))
