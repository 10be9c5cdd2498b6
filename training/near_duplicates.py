"""Near-duplicate photos across the split: the same press photo recropped, rescaled or recoloured.

    python -m training.near_duplicates [--threshold 8] [--sheet runs/near_duplicates.png]

Byte-identical files are already kept on one side of the split (training/split.py);
near-duplicates are not, so a test photo can be a recrop of a train photo and flatter
the test figures. This finds them with a perceptual hash (pHash: the sign of the 8x8
lowest frequencies of the DCT of the 32x32 grey image, against their median), also
against the mirrored photo, and links two photos of the same class when their hashes
differ in at most `--threshold` of 64 bits. `--sheet` draws sample pairs at each
distance, to check the threshold by eye. It writes `runs/near_duplicates.json`: the
groups, and the test photos that have a near-duplicate in train or val, so figures can
be re-measured on the test photos that have none.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from training.split import Photo, load_split

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "runs" / "near_duplicates.json"


def phash(gray: np.ndarray) -> int:
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hashes(photos: list[Photo]) -> tuple[np.ndarray, np.ndarray]:
    """(hash, hash of the mirrored photo) per photo, as uint64."""
    plain, mirrored = [], []
    for photo in photos:
        gray = cv2.imread(str(photo.path), cv2.IMREAD_GRAYSCALE)
        plain.append(phash(gray))
        mirrored.append(phash(gray[:, ::-1]))
    return np.array(plain, np.uint64), np.array(mirrored, np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = np.bitwise_xor(a[:, None], b[None, :])
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def close_pairs(photos: list[Photo], plain: np.ndarray, mirrored: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for photos of the same class within `threshold` bits (plain or mirrored)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, photo in enumerate(photos):
        by_class[photo.class_id].append(i)
    pairs = []
    for members in by_class.values():
        idx = np.array(members)
        d = np.minimum(hamming(plain[idx], plain[idx]), hamming(plain[idx], mirrored[idx]))
        for a, b in zip(*np.nonzero(np.triu(d <= threshold, k=1))):
            pairs.append((int(idx[a]), int(idx[b]), int(d[a, b])))
    return pairs


def groups_of(n: int, pairs: list[tuple[int, int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[find(i)] = find(j)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[find(i)].append(i)
    return [m for m in members.values() if len(m) > 1]


def contact_sheet(photos: list[Photo], pairs: list[tuple[int, int, int]], path: Path, per_distance: int = 3) -> None:
    """Sample pairs at each distance side by side, one row per pair, labelled with the distance."""
    rows = []
    for distance in sorted({d for _, _, d in pairs}):
        for i, j, d in [p for p in pairs if p[2] == distance][:per_distance]:
            tiles = [cv2.resize(cv2.imread(str(photos[k].path)), (200, 120)) for k in (i, j)]
            row = np.hstack([tiles[0], np.full((120, 8, 3), 255, np.uint8), tiles[1]])
            cv2.putText(row, f"d={d} {photos[i].image_id}/{photos[j].image_id}", (4, 16),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 255), 1)
            rows.append(row)
    if rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.vstack(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.near_duplicates", description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", type=int, default=8,
                        help="most differing hash bits of a near-duplicate (8: checked by eye, see README)")
    parser.add_argument("--sheet", type=Path, help="write sample pairs per distance to this PNG")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    photos = load_split()
    plain, mirrored = hashes(photos)
    pairs = close_pairs(photos, plain, mirrored, args.threshold)
    if args.sheet:
        contact_sheet(photos, pairs, args.sheet)
    groups = groups_of(len(photos), pairs)
    straddling = [g for g in groups if len({photos[i].split for i in g}) > 1]
    leaked_test = sorted({photos[i].image_id for g in straddling for i in g if photos[i].split == "test"
                          and any(photos[k].split != "test" for k in g)})
    report = {
        "threshold": args.threshold, "photos": len(photos), "pairs": len(pairs),
        "pairs_by_distance": {str(d): sum(p[2] == d for p in pairs) for d in range(args.threshold + 1)},
        "groups": len(groups), "photos_in_groups": sum(len(g) for g in groups),
        "groups_straddling_splits": len(straddling),
        "test_photos_with_a_near_duplicate_in_train_or_val": leaked_test,
        "group_members": [[photos[i].image_id for i in g] for g in groups],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("group_members",
                      "test_photos_with_a_near_duplicate_in_train_or_val")}))
    print(f"{len(leaked_test)} test photos have a near-duplicate in train or val; wrote {args.out}")


if __name__ == "__main__":
    main()
