"""Brand models trained on the brand's photos only, measured against the global answer restricted to the brand.

    python -m training.brand_heads cache              # pooled features of all 6,467 photos (~5 min, 2 cores)
    python -m training.brand_heads cache --plugins    # only the brand plugins' makes (~2 min)
    python -m training.brand_heads                    # fit, measure, write reports/brand_heads.json (~20 s)

(On a busy machine, OPENBLAS_NUM_THREADS=1 keeps numpy's BLAS threads from fighting: 10x faster here.)
The winners are exported by training/brand_heads_export.py; the table and decision are in
docs/experiments.md.

A brand signature of the served ensemble (`serving_models/efficientnet_lite0/8`) is its global answer
restricted to the brand's classes and renormalised. This script asks whether a classifier trained on the
brand's photos alone does better: a multinomial logistic regression on the pooled 1280 features of each
ensemble member's fine-tuned trunk, its L2 strength chosen on val, its temperature fitted on val.

`cache` rebuilds the members' Keras trunks (training/efficientnet_lite.py), restores their weights from the
SavedModel's own variables (the member runs are not needed), checks on a batch of photos that
softmax(features @ kernel + bias), averaged, logged and tempered, is what serving_default answers, and
writes the features to runs/brand_heads/features-<name>-<version>.npz (resumable: it saves as it goes).

Val is clean for one member only: v8's second member (lite0-320-cutmix-trainval) was trained on train + val.
So the decision is taken on the train-only member (`member0`), where val is a fair judge, and the served
ensemble (`ensemble`) is measured beside it, its val figures marked as seen in training. A brand model
ships only where DECISION_RULE holds; the report says where it does.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from common.model_card import read_card
from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from training.metrics import expected_calibration_error, fit_temperature
from dataset.split import Photo, data_dir, load_split, split_hash

SERVED = Path("serving_models/efficientnet_lite0/8")
CACHE_DIR = Path("runs/brand_heads")
REPORT = Path("reports/brand_heads.json")
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
MIN_VAL_GAIN = 2  # photos: with 50-110 val photos a brand, one photo is noise
DECISION_RULE = (f"ship a brand model where, on the train-only member (clean val), it gets at least {MIN_VAL_GAIN} "
                 "more val photos right than the global answer restricted to the brand, and no fewer test photos, "
                 "on that member and on the served ensemble")


# ---- the served model's members, rebuilt in Keras from its own variables -----------------------------------

def rebuild(export_dir: Path) -> SimpleNamespace:
    """The served ensemble's Keras parts (training.lite_savedmodel), with the global heads stacked
    (kernels [M, 1280, C], biases [M, C]) and the card."""
    from training.lite_savedmodel import load_ensemble  # TensorFlow: only when the model is needed

    ensemble = load_ensemble(export_dir)
    return SimpleNamespace(bottom=ensemble.bottom, bridges=ensemble.bridges, tops=ensemble.tops, cuts=ensemble.cuts,
                           size=ensemble.size, card=read_card(export_dir),
                           kernels=np.stack(ensemble.kernels), biases=np.stack(ensemble.biases))


def load_members(export_dir: Path):
    """A function image bytes [N] -> features [N, members, 1280], the global heads (kernels, biases) and
    the card."""
    import tensorflow as tf

    from training import data

    parts = rebuild(export_dir)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def features(image_bytes):
        shared = parts.bottom(data.preprocess_batch(image_bytes, parts.size), training=False)
        entries = [parts.bridges[c](shared, training=False) if c in parts.bridges else shared for c in parts.cuts]
        return tf.stack([top(x, training=False) for top, x in zip(parts.tops, entries)], axis=1)

    return features, (parts.kernels, parts.biases), parts.card


def ensemble_log_probs(feats: np.ndarray, kernels: np.ndarray, biases: np.ndarray,
                       members: list[int] | None = None) -> np.ndarray:
    """log of the mean over ensemble members of softmax(features @ kernel + bias): [N, C], untempered.
    members: only these classes, restricted and renormalised (what a brand signature answers)."""
    probs = np.mean([softmax(feats[:, m] @ kernels[m] + biases[m]) for m in range(feats.shape[1])], axis=0)
    if members is not None:
        probs = probs[:, members] / np.maximum(probs[:, members].sum(1, keepdims=True), 1e-30)
    return np.log(np.maximum(probs, 1e-30))


def cache_features(export_dir: Path, photos: list[Photo], out: Path, batch: int = 16, save_every: int = 256) -> dict:
    """Features of `photos` (in that order) into `out`, continuing a partial cache; checks the first batch
    against serving_default first."""
    import tensorflow as tf

    features, (kernels, biases), card = load_members(export_dir)
    done = dict(np.load(out)) if out.exists() else None
    ids, feats = (list(done["image_ids"]), [done["features"]]) if done else ([], [])
    check = float(done["check_max_abs_diff"]) if done else None
    todo = [p for p in photos if p.image_id not in set(ids)]
    print(f"{len(ids)} cached, {len(todo)} to go", flush=True)
    if check is None and todo:
        blobs = tf.constant([p.path.read_bytes() for p in todo[:batch]])
        served = tf.saved_model.load(str(export_dir)).signatures["serving_default"](image_bytes=blobs)["probabilities"]
        mine = softmax(ensemble_log_probs(features(blobs).numpy(), kernels, biases)
                       / card["ensemble_temperatures"]["serving_default"])
        check = float(np.abs(mine - served.numpy()).max())
        print(f"features reproduce serving_default to {check:.2e} (max |probability difference|, {batch} photos)")
        if check > 1e-4:
            raise SystemExit("the rebuilt members do not reproduce serving_default; not caching")
    t0, pending = time.time(), []
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        pending.append(features(tf.constant([p.path.read_bytes() for p in chunk])).numpy())
        ids += [p.image_id for p in chunk]
        if sum(map(len, pending)) >= save_every or i + batch >= len(todo):
            feats, pending = [np.concatenate(feats + pending)], []
            save_npz(out, image_ids=np.array(ids), features=feats[0].astype(np.float32), kernels=kernels,
                     biases=biases, check_max_abs_diff=check, export_dir=str(export_dir))
            rate = (i + len(chunk)) / (time.time() - t0)
            print(f"{len(ids)} photos cached ({rate:.1f}/s)", flush=True)
    return {"photos": len(ids), "check_max_abs_diff": check}


def save_npz(path: Path, **arrays) -> None:
    """Write atomically: a stopped run leaves the previous cache, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp.npz")
    np.savez(scratch, **arrays)
    scratch.rename(path)



# ---- the brand model and its measurement: plain numpy on cached features -----------------------------------

def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float,
               steps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: (kernel [D, C], bias [C]) minimising mean cross-entropy
    + l2 / 2 * |kernel|^2 on standardised features, by Nesterov-accelerated gradient descent (convex,
    deterministic). The standardisation is folded back, so logits = x @ kernel + bias on raw features.

    Started at zero, every iterate's kernel is z.T @ a (z the standardised features): the gradient
    z.T @ residual + l2 * kernel stays in that span. So the descent runs on a [N, C] with the
    [N, N] Gram matrix, the same iterates 2-4x cheaper for a brand's few hundred photos of 1280 features."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = ((x - mean) / scale).astype(np.float64)
    gram, target = z @ z.T, np.eye(n_classes)[y]
    # step 1/L: the softmax cross-entropy's curvature is at most 1/2 per unit of |[z, 1]|^2 / n
    lipschitz = 0.5 * (np.linalg.eigvalsh(gram + 1.0)[-1]) / len(z) + l2
    a, b = np.zeros((len(z), n_classes)), np.zeros(n_classes)
    va, vb, t = a, b, 1.0
    for _ in range(steps):
        residual = (softmax(gram @ va + vb) - target) / len(z)
        a_next, b_next = va - (residual + l2 * va) / lipschitz, vb - residual.sum(0) / lipschitz
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        va, vb = a_next + (t - 1) / t_next * (a_next - a), b_next + (t - 1) / t_next * (b_next - b)
        a, b, t = a_next, b_next, t_next
    kernel = (z.T @ a) / scale[:, None]
    return kernel, b - mean @ kernel


def scores(logits: np.ndarray, y: np.ndarray) -> dict:
    """top-1 (and photos right), ECE and NLL of softmax(logits) against labels y."""
    probs = softmax(logits)
    right = probs.argmax(1) == y
    nll = -np.log(np.maximum(probs[np.arange(len(y)), y], 1e-30))
    return {"top1": float(right.mean()), "right": int(right.sum()), "n": int(len(y)),
            "ece": expected_calibration_error(probs.max(1), right), "nll": float(nll.mean())}


def train_brand_model(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], n_classes: int,
                      grid: tuple[float, ...] = L2_GRID) -> dict:
    """The logistic regression whose L2 strength gives the lowest val NLL once its temperature is fitted
    on val (NLL, not top-1: a smoother judge on 50-110 photos). kernel and bias are untempered."""
    best = None
    for l2 in grid:
        kernel, bias = fit_logreg(*train, n_classes, l2)
        t = fit_temperature(val[0] @ kernel + bias, val[1])
        nll = scores((val[0] @ kernel + bias) / t, val[1])["nll"]
        if best is None or nll < best["val_nll"]:
            best = {"l2": l2, "temperature": t, "val_nll": nll, "kernel": kernel, "bias": bias}
    return best


def restricted_baseline(log_probs: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict:
    """The global answer restricted to the brand (log-probabilities over the brand's classes), tempered
    with a temperature fitted on val: top-1 as the global model ranks them, calibrated like the brand model."""
    t = fit_temperature(log_probs["val"], y["val"])
    return {"temperature": t, **{split: scores(log_probs[split] / t, y[split]) for split in ("val", "test")}}


def compare_make(feats: dict[str, np.ndarray], y: dict[str, np.ndarray], kernels: np.ndarray, biases: np.ndarray,
                 members: list[int], served_temperature: float) -> dict:
    """One make: the brand model vs the global answer restricted to its classes, on the train-only member
    (member0: clean val) and on the served ensemble (val seen by its second member).

    feats[split]: [N, members, D] of the make's photos; y[split]: indices into `members` (global class
    indices); served_temperature: the T the served answer restricted to these classes is tempered with
    (the brand signature's, or serving_default's where the router restricts the global answer: the same).

    The ensemble's brand model is one head per member (member 0's L2 for all: member 1's val is not a fair
    judge), their softmaxes averaged. Its temperature cannot be fitted on val (member 1 learnt val: a fit
    there hits the grid's floor, also for the served answer), so it is transferred: the served T, times
    how much sharper or softer member 0's brand head needed than member 0's restricted answer on val."""
    n = len(members)
    head = train_brand_model((feats["train"][:, 0], y["train"]), (feats["val"][:, 0], y["val"]), n)
    member0 = {"global_restricted": restricted_baseline(
        {s: (feats[s][:, 0] @ kernels[0] + biases[0])[:, members] for s in ("val", "test")}, y)}
    member0["brand_model"] = {"l2": head["l2"], "temperature": head["temperature"],
                              **{s: scores((feats[s][:, 0] @ head["kernel"] + head["bias"]) / head["temperature"], y[s])
                                 for s in ("val", "test")}}
    heads = [(head["kernel"], head["bias"])] + [fit_logreg(feats["train"][:, m], y["train"], n, head["l2"])
                                                for m in range(1, feats["train"].shape[1])]
    mixed = {s: mean_log_probs([feats[s][:, m] @ k + b for m, (k, b) in enumerate(heads)]) for s in ("val", "test")}
    t_mixed = served_temperature * head["temperature"] / member0["global_restricted"]["temperature"]
    served = {s: ensemble_log_probs(feats[s], kernels, biases, members) / served_temperature for s in ("val", "test")}
    ensemble = {"global_restricted": {"temperature": served_temperature, **{s: scores(served[s], y[s])
                                                                          for s in ("val", "test")}},
                "brand_model": {"temperature": t_mixed,
                                **{s: scores(mixed[s] / t_mixed, y[s]) for s in ("val", "test")}},
                "val_is_training_data": True}
    return {"member0": member0, "ensemble": ensemble, "heads": heads}


def mean_log_probs(logits: list[np.ndarray]) -> np.ndarray:
    """log of the mean of the members' softmax(logits)."""
    return np.log(np.maximum(np.mean([softmax(z) for z in logits], axis=0), 1e-30))


def decide(result: dict) -> tuple[bool, dict]:
    """DECISION_RULE on one make's result: (ship, the photo gains it looked at)."""
    gain = {f"{where}_{split}": result[where]["brand_model"][split]["right"]
            - result[where]["global_restricted"][split]["right"]
            for where in ("member0", "ensemble") for split in ("val", "test")}
    return gain["member0_val"] >= MIN_VAL_GAIN and gain["member0_test"] >= 0 and gain["ensemble_test"] >= 0, gain


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def brand_plugins(export_dir: Path) -> dict[str, tuple[str, ...]]:
    """slug -> makes, for the plugins answered by a signature of this model."""
    return {p.slug: p.makes for p in load_plugins(DEFAULT_PLUGINS_DIR, data_dir(), check_logos=False).values()
            if p.model and p.model.name == export_dir.parent.name and p.model.signature == p.slug}


def cache_path(export_dir: Path) -> Path:
    return CACHE_DIR / f"features-{export_dir.parent.name}-{export_dir.name}.npz"


def measure(export_dir: Path, photos: list[Photo]) -> tuple[dict, dict]:
    """Every make with two or more classes whose photos are cached: compare_make and decide; the brand
    plugins first. Returns the report and, per plugin slug, its ensemble brand model (the members'
    heads, the temperature, the global class indices they answer for) for training.brand_heads_export."""
    card = read_card(export_dir)
    cache = np.load(cache_path(export_dir))
    row = {image_id: i for i, image_id in enumerate(cache["image_ids"])}
    kernels, biases, features = cache["kernels"], cache["biases"], cache["features"]
    classes = card["signatures"]["serving_default"]["classes"]
    index = {c["class_id"]: i for i, c in enumerate(classes)}
    plugins = brand_plugins(export_dir)
    slug_of = {make: slug for slug, makes in plugins.items() for make in makes}
    makes = sorted({c["make"] for c in classes}, key=lambda m: (m not in slug_of, m))
    results, trained, t0 = {}, {}, time.time()
    for make in makes:
        members = [i for i, c in enumerate(classes) if c["make"] == make]
        mine = [ph for ph in photos if index[ph.class_id] in members]
        if len(members) < 2 or any(ph.image_id not in row for ph in mine):
            continue
        local = {g: i for i, g in enumerate(members)}
        feats = {s: features[[row[ph.image_id] for ph in mine if ph.split == s]] for s in ("train", "val", "test")}
        y = {s: np.array([local[index[ph.class_id]] for ph in mine if ph.split == s]) for s in ("train", "val", "test")}
        slug = slug_of.get(make)
        temperatures = card["ensemble_temperatures"]  # a make without a signature: the router restricts
        result = compare_make(feats, y, kernels, biases, members, temperatures[slug or "serving_default"])
        ship, gain = decide(result)
        if slug:
            trained[slug] = {"heads": result["heads"], "members": members,
                             "temperature": result["ensemble"]["brand_model"]["temperature"]}
        result.pop("heads")  # the report keeps figures, not weights
        results[make] = {"plugin": slug, "classes": len(members), "train_photos": len(y["train"]), **result,
                         "photo_gain": gain, "ship": ship}
        print(f"{make}: member0 val {gain['member0_val']:+d} test {gain['member0_test']:+d}, ensemble test "
              f"{gain['ensemble_test']:+d} photos{' -> ship' if ship else ''}", flush=True)
    return {
        "model": str(export_dir),
        "features": {"cache": str(cache_path(export_dir)), "photos": int(len(row)),
                     "check_max_abs_diff": float(cache["check_max_abs_diff"])},
        "split_hash": split_hash(photos),
        "members": [m["run"] for m in card["training"]["members"]],
        "brand_model": "multinomial logistic regression on the member's pooled 1280 features, the brand's train "
                       f"photos only; L2 from {list(L2_GRID)} and the temperature fitted on val (NLL) for member 0; "
                       "the ensemble's: one such head per member (member 0's L2), softmaxes averaged, T transferred "
                       "(served T x member 0's brand T / member 0's restricted T; compare_make)",
        "decision_rule": DECISION_RULE,
        "command": f"python -m training.brand_heads --model {export_dir}",
        "seconds": round(time.time() - t0, 1),
        "makes": results,
        "ship": sorted(r["plugin"] for r in results.values() if r["plugin"] and r["ship"]),
    }, trained


def markdown_table(report: dict) -> str:
    """The docs table: top-1 as global restricted -> brand model, photos right in brackets."""
    def pair(where: dict, split: str, key: str = "top1") -> str:
        a, b = where["global_restricted"][split], where["brand_model"][split]
        if key == "ece":
            return f"{a['ece']:.3f} → {b['ece']:.3f}"
        return f"{a['top1']:.3f} → {b['top1']:.3f} ({b['right'] - a['right']:+d})"

    lines = ["| make (plugin) | classes | val n | test n | member0 val top-1 | member0 test top-1 | "
             "member0 test ECE | served test top-1 | served test ECE | ship |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | --- |"]
    for make, r in report["makes"].items():
        m0, ens = r["member0"], r["ensemble"]
        name = f"{make} ({r['plugin']})" if r["plugin"] else make
        lines.append(f"| {name} | {r['classes']} | "
                     f"{m0['brand_model']['val']['n']} | {m0['brand_model']['test']['n']} | {pair(m0, 'val')} | "
                     f"{pair(m0, 'test')} | {pair(m0, 'test', 'ece')} | {pair(ens, 'test')} | "
                     f"{pair(ens, 'test', 'ece')} | {'yes' if r['ship'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=("measure", "cache"), default="measure")
    p.add_argument("--model", type=Path, default=SERVED, help="the served version folder")
    p.add_argument("--plugins", action="store_true", help="cache: only the photos of the brand plugins' makes")
    p.add_argument("--out", type=Path, default=REPORT, help="measure: the JSON report")
    args = p.parse_args(argv)
    photos = load_split()
    if args.command == "cache":
        plugin_makes = {m for makes in brand_plugins(args.model).values() for m in makes}
        first = [ph for ph in photos if ph.make in plugin_makes]  # the plugins' photos first: usable early
        rest = [] if args.plugins else [ph for ph in photos if ph.make not in plugin_makes]
        print(json.dumps(cache_features(args.model, first + rest, cache_path(args.model))))
        return
    report, _ = measure(args.model, photos)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
