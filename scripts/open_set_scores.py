"""Which unknown-car score to serve: candidate scores from the default ensemble's own members, compared.

    python -m training.brand_heads cache           # once: both members' pooled features of every photo (~3 min)
    python -m scripts.open_set_scores              # ~5 min: dev and framed photos through the localiser, then numpy

The served pipeline classifies the localiser's crop, so the open_set_dev photos
and 300 framed catalogue photos per split (the car on 30-60 % of the width) are
cropped as the router crops them (builders.open_set.ServedPipeline) and their
members' features computed; catalogue val and test photos come from the cache.
For each score it prints the AUROC of val against the `fit` half's unknown cars
(what a choice may read) and of test against the `eval` half, and, at the
threshold that flags 2 % of val crops, the share of test crops flagged (does a
val threshold transfer?) and of unknown cars flagged. A last table fits the
threshold on 1.5 % of val crops and framed photos, as builders.open_set does,
and reads the framed test photos too (does the score key on framing?).

Member 0 trained on train only; member 1 on train + val (the model card), so
scores of member 1 and of the ensemble are surer of val than of unseen photos.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from builders.open_set import SEED, ServedPipeline, dev_photos, framed_catalogue
from dataset.split import load_split
from evaluation.open_set import auroc
from training.brand_heads import SERVED, cache_path, load_members, softmax

FRAMED_PER_SPLIT = 300
OUT = Path("reports/open_set_scores.json")


def routed_crops(pipeline: ServedPipeline, images: list[bytes], batch: int = 16) -> list[bytes]:
    """What the router classifies: the localiser's crop, or the photo as sent."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        out += [crop or image for image, crop in zip(chunk, pipeline.frame(chunk)[1])]
    return out


def member_features() -> dict[str, np.ndarray]:
    """[N, members, 1280] per photo set, and train's features and class ids for the banks."""
    cache = np.load(cache_path(SERVED))
    row = {image_id: i for i, image_id in enumerate(cache["image_ids"])}
    photos = load_split()
    missing = [p.image_id for p in photos if p.image_id not in row]
    if missing:
        raise SystemExit(f"{len(missing)} photos not cached: run python -m training.brand_heads cache")
    of = {split: [p for p in photos if p.split == split] for split in ("train", "val", "test")}
    sets = {split: cache["features"][[row[p.image_id] for p in of[split]]] for split in of}
    sets["train_classes"] = np.array([p.class_id for p in of["train"]])
    pipeline, (features, _, _) = ServedPipeline(), load_members(SERVED)

    def featurise(images: list[bytes], batch: int = 16) -> np.ndarray:
        crops = routed_crops(pipeline, images)
        return np.concatenate([features(tf.constant(crops[i:i + batch])).numpy() for i in range(0, len(crops), batch)])

    for half in ("fit", "eval"):
        dev = dev_photos(half)
        for kind in ("unknown_car", "not_car"):
            sets[f"{half} {kind}"] = featurise([d.path.read_bytes() for d in dev if d.kind == kind])
    for split, half in (("val", "fit"), ("test", "eval")):
        chosen = sorted(np.random.default_rng(SEED).choice(len(of[split]), FRAMED_PER_SPLIT, replace=False))
        sets[f"{split} framed"] = featurise(framed_catalogue([of[split][i] for i in chosen], half))
    sets["kernels"], sets["biases"] = cache["kernels"], cache["biases"]
    return sets


def candidate_scores(sets: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{photo set: {score name: [N]}}, every score higher for "less like the catalogue"."""
    kernels, biases, train, classes = sets["kernels"], sets["biases"], sets["train"], sets["train_classes"]
    unit = [t / np.linalg.norm(t, axis=1, keepdims=True) for t in train.transpose(1, 0, 2)]
    gaussians = []  # per member: class means, shared precision, and the one-Gaussian background's
    for m in range(train.shape[1]):
        x = train[:, m]
        ids = sorted(set(classes))
        means = np.stack([x[classes == c].mean(0) for c in ids])
        centred = x - means[np.searchsorted(ids, classes)]
        shared = np.linalg.inv(centred.T @ centred / len(x) + 1e-3 * np.eye(x.shape[1]))
        background = np.linalg.inv(np.cov(x.T) + 1e-3 * np.eye(x.shape[1]))
        gaussians.append((means, shared, x.mean(0), background))

    def scores(feats: np.ndarray) -> dict[str, np.ndarray]:
        logits = [feats[:, m] @ kernels[m] + biases[m] for m in range(feats.shape[1])]
        probs = [softmax(z) for z in logits]
        out = {"ensemble 1 - confidence": 1 - np.mean(probs, 0).max(1)}
        for m, z in enumerate(logits):
            x = feats[:, m]
            means, shared, centre, background = gaussians[m]
            xp = x @ shared
            squared = (xp * x).sum(1)[:, None] - 2 * xp @ means.T + ((means @ shared) * means).sum(1)[None]
            off_centre = ((x - centre) @ background * (x - centre)).sum(1)
            nearest = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ unit[m].T
            out |= {f"member {m} 1 - confidence": 1 - probs[m].max(1),
                    f"member {m} -max logit": -z.max(1),
                    f"member {m} -energy": -(np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)),
                    f"member {m} Mahalanobis": squared.min(1),
                    f"member {m} relative Mahalanobis": (squared - off_centre[:, None]).min(1),
                    f"member {m} kNN-1 cosine": 1 - nearest.max(1)}
        return out

    names = ["val", "test", "fit unknown_car", "eval unknown_car", "fit not_car", "eval not_car", "val framed",
             "test framed"]
    scored = {name: scores(sets[name]) for name in names}
    for a, b, w in (("member 0 1 - confidence", "member 0 kNN-1 cosine", 1.0),
                    ("member 0 1 - confidence", "member 1 kNN-1 cosine", 2.0)):
        mean_a, sd_a = scored["val"][a].mean(), scored["val"][a].std()  # z-scored on val crops
        mean_b, sd_b = scored["val"][b].mean(), scored["val"][b].std()
        for per_set in scored.values():
            per_set[f"z({a}) + {w:g} z({b})"] = (per_set[a] - mean_a) / sd_a + w * (per_set[b] - mean_b) / sd_b
    return scored


def table(scored: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    rows = []
    for name in scored["val"]:
        s = {photo_set: values[name] for photo_set, values in scored.items()}
        at_2 = np.quantile(s["val"], 0.98)
        at_15 = np.quantile(np.concatenate([s["val"], s["val framed"]]), 0.985)
        rows.append({"score": name,
                     "auroc val/fit unknown": auroc(s["val"], s["fit unknown_car"]),
                     "auroc test/eval unknown": auroc(s["test"], s["eval unknown_car"]),
                     "auroc test/eval not_car": auroc(s["test"], s["eval not_car"]),
                     "2 % of val: test flagged": float(np.mean(s["test"] >= at_2)),
                     "2 % of val: eval unknown flagged": float(np.mean(s["eval unknown_car"] >= at_2)),
                     "1.5 % of val + framed: test flagged": float(np.mean(s["test"] >= at_15)),
                     "1.5 % of val + framed: test framed flagged": float(np.mean(s["test framed"] >= at_15)),
                     "1.5 % of val + framed: eval unknown flagged": float(np.mean(s["eval unknown_car"] >= at_15))})
    return rows


def main() -> None:
    rows = table(candidate_scores(member_features()))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join([r["score"]] + [f"{r[k]:.3f}" for k in keys[1:]]) + " |")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
