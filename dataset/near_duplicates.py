"""Near-duplicate photos across the split: the same press photo recropped, rescaled or recoloured.

    python -m dataset.near_duplicates [--threshold 8] [--sift-inliers 25] [--cross-class-inliers 40]
                                       [--sheet runs/near_duplicates.png] [--write-groups]

Byte-identical files are already kept on one side of the split (dataset/split.py);
near-duplicates are not, so a test photo can be a recrop of a train photo and flatter
the test figures. Two photos of the same class are linked when either test says so:

- pHash: the sign of the 8x8 lowest frequencies of the DCT of the 32x32 grey image,
  against their median, also against the mirrored photo; at most `--threshold` of 64
  bits apart. It finds rescaled and recompressed copies, but a recrop or a recolouring
  moves the hash too far: at 8 bits it linked only 6 pairs.
- SIFT: at least `--sift-inliers` matched keypoints (ratio test 0.75) consistent with
  one similarity transform (RANSAC, 3 px), which is what a recrop plus a rescale is.
  A recolouring keeps the keypoints. It takes about 6 minutes on 2 cores.

- Across classes (`--cross-class-inliers`, 60): the same similarity test on the
  candidates a FLANN vote over all photos' descriptors proposes; the same photo is
  sometimes labelled as two classes (Audi A5 / S5 Coupe, Hummer H2 / H3T).

The thresholds were checked by eye on sample pairs (`--sheet`): pHash pairs at 2 and 8
bits are the same photo, at 10 bits mostly different photos of the same model from the
same angle, at 12 bits all different. SIFT pairs with 35 or more inliers were all the
same photo recropped or recoloured; from 25 to 34 about half were, the rest the same car
from the same press shoot; from 15 to 24 almost all were different photos. 25 errs on the
side of grouping: a false link only moves a photo into train. Across classes, where a
false link would join two different cars, the bar is higher: of the 20 pairs with 40 or more
inliers, the one at 47 was two cars shot from the same studio angle (Aston Martin Virage
convertible and coupe), and every pair from 67 up was the same photo; 60 is the default.

It writes `runs/near_duplicates.json`: the groups, and the test photos that have a
near-duplicate in train or val. `--write-groups` stores the groups in
`dataset/near_duplicate_groups.json`, which the split reads to keep each group on one
side (dataset/split.py); after that, no group straddles splits.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
import multiprocessing
from pathlib import Path

import cv2
import numpy as np

from dataset.split import NEAR_DUPLICATE_GROUPS, Photo, load_split

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


def _pool(workers: int):
    # spawn, not fork: a forked child of a process whose OpenCV or TensorFlow threads are running
    # (a test session) can deadlock on a lock one of those threads held
    return multiprocessing.get_context("spawn").Pool(workers)


def sift_features(path: Path, nfeatures: int = 500) -> tuple[np.ndarray, np.ndarray | None]:
    """(keypoint positions [n, 2], descriptors [n, 128]) of a photo."""
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    keypoints, descriptors = cv2.SIFT_create(nfeatures=nfeatures).detectAndCompute(gray, None)
    return np.float32([k.pt for k in keypoints]).reshape(-1, 2), descriptors


def similarity_inliers(a: tuple, b: tuple) -> int:
    """Matched keypoints of two photos that one similarity transform (a recrop + rescale) explains."""
    (points_a, desc_a), (points_b, desc_b) = a, b
    if desc_a is None or desc_b is None or len(desc_a) < 2 or len(desc_b) < 2:
        return 0
    matches = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc_a, desc_b, k=2)
    good = [m[0] for m in matches if len(m) == 2 and m[0].distance < 0.75 * m[1].distance]
    if len(good) < 8:
        return 0
    src = points_a[[m.queryIdx for m in good]]
    dst = points_b[[m.trainIdx for m in good]]
    _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0)
    return int(mask.sum()) if mask is not None else 0


def _class_sift_pairs(job: tuple[list[int], list[Path], int]) -> list[tuple[int, int, int]]:
    indices, paths, min_inliers = job
    cv2.setNumThreads(1)
    features = [sift_features(p) for p in paths]
    pairs = []
    for a in range(len(indices)):
        for b in range(a + 1, len(indices)):
            n = similarity_inliers(features[a], features[b])
            if n >= min_inliers:
                pairs.append((indices[a], indices[b], n))
    return pairs


def sift_pairs(photos: list[Photo], min_inliers: int, workers: int = 2) -> list[tuple[int, int, int]]:
    """(i, j, inliers) for photos of the same class related by a similarity transform."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, photo in enumerate(photos):
        by_class[photo.class_id].append(i)
    jobs = [(members, [photos[i].path for i in members], min_inliers) for members in by_class.values()]
    with _pool(workers) as pool:
        return [pair for pairs in pool.imap_unordered(_class_sift_pairs, jobs) for pair in pairs]


def _photo_features(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    cv2.setNumThreads(1)
    return sift_features(path)


def cross_class_pairs(photos: list[Photo], min_inliers: int, workers: int = 2, votes: int = 8,
                      candidates: int = 3) -> list[tuple[int, int, int]]:
    """(i, j, inliers) for photos of DIFFERENT classes related by a similarity transform.

    The same press photo is sometimes labelled twice (Audi A5 and S5 Coupe, Hummer H2 and
    H3T, ...), which the per-class tests cannot see. Comparing all pairs is too slow, so each
    photo's SIFT descriptors vote, through one FLANN index over every photo's descriptors,
    for the photos holding their nearest neighbours (ratio test 0.75); the `candidates` photos
    of other classes with at least `votes` votes are then checked like the per-class pairs.
    """
    with _pool(workers) as pool:
        features = pool.map(_photo_features, [p.path for p in photos], chunksize=32)
    has = [i for i, (_, d) in enumerate(features) if d is not None and len(d) >= 2]
    matcher = cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": 32})
    matcher.add([features[i][1] for i in has])
    matcher.train()
    pairs = set()
    for i in has:
        tally: dict[int, int] = defaultdict(int)
        for neighbours in matcher.knnMatch(features[i][1], k=3):
            others = [m for m in neighbours if has[m.imgIdx] != i]
            if len(others) >= 2 and others[0].distance < 0.75 * others[1].distance:
                tally[has[others[0].imgIdx]] += 1
        ranked = sorted((j for j in tally if tally[j] >= votes and photos[j].class_id != photos[i].class_id),
                        key=lambda j: -tally[j])
        for j in ranked[:candidates]:
            pairs.add((min(i, j), max(i, j)))
    found = []
    for i, j in sorted(pairs):
        n = similarity_inliers(features[i], features[j])
        if n >= min_inliers:
            found.append((i, j, n))
    return found


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


def contact_sheet(photos: list[Photo], pairs: list[tuple[int, int, int]], path: Path, label: str,
                  per_score: int = 3) -> None:
    """Sample pairs at each score (distance or inliers) side by side, one row per pair, labelled."""
    rows = []
    for score in sorted({d for _, _, d in pairs}):
        for i, j, d in [p for p in pairs if p[2] == score][:per_score]:
            tiles = [cv2.resize(cv2.imread(str(photos[k].path)), (200, 120)) for k in (i, j)]
            row = np.hstack([tiles[0], np.full((120, 8, 3), 255, np.uint8), tiles[1]])
            cv2.putText(row, f"{label}={d} {photos[i].image_id}/{photos[j].image_id}", (4, 16),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 255), 1)
            rows.append(row)
    if rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.vstack(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dataset.near_duplicates", description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", type=int, default=8,
                        help="most differing hash bits of a near-duplicate (8: checked by eye, see docs/data.md)")
    parser.add_argument("--sift-inliers", type=int, default=25,
                        help="fewest keypoints one similarity transform must explain (25: checked by eye; 0: off)")
    parser.add_argument("--cross-class-inliers", type=int, default=60,
                        help="fewest similarity-transform matches linking photos of two classes (60: checked by "
                             "eye; 0: off); about 12 minutes on 2 cores")
    parser.add_argument("--sheet", type=Path, help="write sample pairs per score to this PNG (and -sift.png)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--write-groups", action="store_true",
                        help=f"store the groups for the split in {NEAR_DUPLICATE_GROUPS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    photos = load_split()
    plain, mirrored = hashes(photos)
    pairs = close_pairs(photos, plain, mirrored, args.threshold)
    matched = sift_pairs(photos, args.sift_inliers) if args.sift_inliers else []
    crossed = cross_class_pairs(photos, args.cross_class_inliers) if args.cross_class_inliers else []
    if args.sheet:
        contact_sheet(photos, pairs, args.sheet, "d")
        contact_sheet(photos, matched, args.sheet.with_name(args.sheet.stem + "-sift.png"), "inliers")
        contact_sheet(photos, crossed, args.sheet.with_name(args.sheet.stem + "-cross.png"), "inliers")
    groups = groups_of(len(photos), pairs + matched + crossed)
    straddling = [g for g in groups if len({photos[i].split for i in g}) > 1]
    leaked_test = sorted({photos[i].image_id for g in straddling for i in g if photos[i].split == "test"
                          and any(photos[k].split != "test" for k in g)})
    report = {
        "threshold": args.threshold, "sift_inliers": args.sift_inliers, "photos": len(photos),
        "phash_pairs": len(pairs),
        "phash_pairs_by_distance": {str(d): sum(p[2] == d for p in pairs) for d in range(args.threshold + 1)},
        "sift_pairs": len(matched),
        "cross_class_inliers": args.cross_class_inliers,
        "cross_class_pairs": [[photos[i].image_id, photos[j].image_id, n] for i, j, n in crossed],
        "groups": len(groups), "photos_in_groups": sum(len(g) for g in groups),
        "groups_straddling_splits": len(straddling),
        "test_photos_with_a_near_duplicate_in_train_or_val": leaked_test,
        "group_members": [[photos[i].image_id for i in g] for g in groups],
    }
    if args.write_groups:
        NEAR_DUPLICATE_GROUPS.write_text(json.dumps({
            "method": f"same class, and pHash (photo or mirror image) at most {args.threshold} of 64 bits apart "
                      f"or at least {args.sift_inliers} SIFT matches fitting one similarity transform; any two "
                      f"classes, at least {args.cross_class_inliers} such matches (FLANN-voted candidates)",
            "command": f"python -m dataset.near_duplicates --threshold {args.threshold} "
                       f"--sift-inliers {args.sift_inliers} --cross-class-inliers {args.cross_class_inliers} "
                       "--write-groups",
            "groups": report["group_members"]}, indent=1) + "\n")
        print(f"wrote {NEAR_DUPLICATE_GROUPS}; the split keeps each group on one side from now on")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("group_members", "cross_class_pairs",
                      "test_photos_with_a_near_duplicate_in_train_or_val")}))
    print(f"{len(leaked_test)} test photos have a near-duplicate in train or val; wrote {args.out}")


if __name__ == "__main__":
    main()
