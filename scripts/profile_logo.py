"""Where the logo stage's time goes per photo, and what cheaper settings cost in firings.

    python -m scripts.profile_logo [--n 200] [--set key=value ...] [--vs key=value ...]
    python -m scripts.profile_logo --sweep [--n 964]

Loads the gallery artifact (artifacts/logo_gallery, what the service loads),
then matches VAL photos single-threaded (cv2.setNumThreads(1)) and prints
mean / p50 / p95 ms per step (decode, sift, knn, ratio, ransac; see
logo_service.matcher.STEPS) and the total.

--set overrides MatcherParams fields (e.g. --set flann_checks=16 max_side=320).
--vs times a second setting on the same photos, alternating per photo, so
that load from other work on a shared machine hits both alike.

--sweep runs every setting in SWEEP over the val photos and prints, per
setting: ms per photo (mean of sift + knn + ratio + ransac; SIFT is computed
once per SIFT setting and reused), query keypoints, and at the gate in
logo_service/calibration.json the number of firings and wrong firings on val,
the error-free threshold on val and the gate builders.logo_calibrate would
choose with it, with its firings. A firing is right when the best candidate's
brand is the photo's own plugin brand (as in builders.logo_calibrate).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import cv2


from common.plugins import DEFAULT_PLUGINS_DIR, brand_for_make, load_plugins  # noqa: E402
from logo_service.features import decode_gray, sift_features  # noqa: E402
from logo_service.gallery import DEFAULT_ARTIFACT_DIR, load_artifact  # noqa: E402
from logo_service.matcher import STEPS, LogoMatcher, MatcherParams  # noqa: E402
from builders.logo_calibrate import DEFAULT_OUT as CALIBRATION  # noqa: E402
from builders.logo_calibrate import FLOOR, SAFETY_INLIERS  # noqa: E402
from dataset.split import data_dir, load_split  # noqa: E402

# Candidate settings for --sweep (overrides of MatcherParams); the first is today's default.
SWEEP: list[dict] = [
    {},
    {"flann_checks": 16},
    {"flann_checks": 8},
    {"neighbors": 8},
    {"neighbors": 8, "flann_checks": 16},
    {"candidates": 4},
    {"sift_contrast": 0.06},
    {"sift_contrast": 0.08},
    {"sift_nfeatures": 500},
    {"sift_nfeatures": 300},
    {"sift_layers": 2},
    {"max_side": 320},
    {"max_side": 256},
]


def parse_overrides(items: list[str]) -> dict:
    types = {f.name: f.type for f in fields(MatcherParams)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown MatcherParams field {key!r}; fields: {', '.join(types)}")
        out[key] = float(value) if types[key] in (float, "float") else int(value)
    return out


def stats(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    return statistics.fmean(v), v[len(v) // 2], v[min(len(v) - 1, int(len(v) * 0.95))]


def print_profile(title: str, steps: list[dict], totals: list[float], keypoints: list[int]) -> None:
    print(f"\n{title}  ({len(totals)} val photos, mean {statistics.fmean(keypoints):.0f} query keypoints)")
    print(f"{'step':8s} {'mean':>7s} {'p50':>7s} {'p95':>7s}  ms")
    for step in STEPS:
        mean, p50, p95 = stats([s[step] for s in steps])
        print(f"{step:8s} {mean:7.2f} {p50:7.2f} {p95:7.2f}")
    mean, p50, p95 = stats(totals)
    print(f"{'total':8s} {mean:7.2f} {p50:7.2f} {p95:7.2f}")


def profile(matchers: dict[str, LogoMatcher], photos: list, repeat: int) -> None:
    """Time match() per step for every matcher, alternating matchers per photo."""
    data = [p.path.read_bytes() for p in photos]
    for m in matchers.values():  # warm-up: first SIFT call allocates, first search pages the index in
        m.match(data[0])
    rec = {name: ([], [], []) for name in matchers}
    for _ in range(repeat):
        for blob in data:
            for name, m in matchers.items():
                r = m.match(blob)
                rec[name][0].append(r.steps_ms)
                rec[name][1].append(r.match_ms)
                rec[name][2].append(r.query_keypoints)
    for name, (steps, totals, kps) in rec.items():
        print_profile(name, steps, totals, kps)


def evaluate(outcomes: list[tuple[str | None, str | None, int]], gate: int) -> dict:
    """outcomes: (truth slug or None, best brand or None, inliers)."""
    wrong = [n for t, b, n in outcomes if b is not None and b != t]
    error_free = max(wrong, default=0) + 1
    chosen = max(FLOOR, error_free + SAFETY_INLIERS)

    def fired(th: int) -> tuple[int, int]:
        f = [(t, b) for t, b, n in outcomes if b is not None and n >= th]
        return len(f), sum(b != t for t, b in f)

    return {"gate": gate, "fired": fired(gate)[0], "wrong": fired(gate)[1], "error_free": error_free,
            "chosen_gate": chosen, "fired_at_chosen": fired(chosen)[0], "wrong_at_chosen": fired(chosen)[1]}


def run_sweep(gallery, photos: list, plugins: dict, settings: list[dict], gate: int, out: Path | None) -> None:
    truth = [(p := brand_for_make(plugins, ph.make)) and p.slug for ph in photos]
    grays = [decode_gray(ph.path.read_bytes()) for ph in photos]
    sift_cache: dict[tuple, tuple[list, list[float]]] = {}
    base = MatcherParams()
    index_matchers: dict = {}
    rows = []
    print(f"{'setting':42s} {'ms':>6s} {'sift':>6s} {'knn':>6s} {'ratio':>6s} {'ransac':>6s} {'kp':>5s} "
          f"{'fired@' + str(gate):>8s} {'wrong':>5s} {'errfree':>7s} {'gate*':>5s} {'fired*':>6s} {'wrong*':>6s}")
    for ov in settings:
        params = replace(base, **ov)
        key = (params.max_side, params.sift_contrast, params.sift_nfeatures, params.sift_layers)
        if key not in sift_cache:
            feats, ms = [], []
            for g in grays:
                t = time.perf_counter()
                feats.append(sift_features(g, *key))
                ms.append((time.perf_counter() - t) * 1000.0)
            sift_cache[key] = (feats, ms)
        feats, sift_ms = sift_cache[key]
        # One FLANN index per index setting (it depends on the gallery and these only).
        ikey = (params.flann_trees, params.flann_kmeans_branching)
        if ikey not in index_matchers:
            index_matchers[ikey] = LogoMatcher(gallery, params)
        matcher = index_matchers[ikey]
        matcher.params = params
        steps, outcomes = [], []
        for f, s_ms, t in zip(feats, sift_ms, truth):
            started = time.perf_counter()
            r = matcher.match_features(f, started)
            st = dict(r.steps_ms, sift=s_ms)
            steps.append(st)
            b = r.best
            outcomes.append((t, b.brand if b else None, b.inliers if b else 0))
        ev = evaluate(outcomes, gate)
        mean = {s: statistics.fmean(x[s] for x in steps) for s in STEPS}
        total = sum(mean[s] for s in STEPS if s != "decode")
        kp = statistics.fmean(len(f.xy) for f in feats)
        name = ",".join(f"{k}={v}" for k, v in ov.items()) or "default"
        rows.append({"setting": ov, "ms": round(total, 2), **{k: round(v, 2) for k, v in mean.items()},
                     "keypoints": round(kp), **ev})
        print(f"{name:42s} {total:6.1f} {mean['sift']:6.1f} {mean['knn']:6.1f} {mean['ratio']:6.1f} "
              f"{mean['ransac']:6.1f} {kp:5.0f} {ev['fired']:8d} {ev['wrong']:5d} {ev['error_free']:7d} "
              f"{ev['chosen_gate']:5d} {ev['fired_at_chosen']:6d} {ev['wrong_at_chosen']:6d}", flush=True)
    if out:
        out.write_text(json.dumps({"photos": len(photos), "gate": gate, "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT_DIR)
    parser.add_argument("--n", type=int, default=200, help="val photos (the first n of the split; 964 = all)")
    parser.add_argument("--repeat", type=int, default=1, help="passes over the photos when profiling")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="MatcherParams overrides")
    parser.add_argument("--vs", nargs="*", default=None, metavar="KEY=VALUE",
                        help="also time this setting (overrides of the defaults), alternating per photo")
    parser.add_argument("--sweep", action="store_true", help="firings and ms for every setting in SWEEP")
    parser.add_argument("--sweep-set", action="append", default=None, metavar="K=V,K=V",
                        help="with --sweep: settings to try instead of SWEEP ('' = defaults); repeatable")
    parser.add_argument("--out", type=Path, default=None, help="with --sweep: write the table as JSON here")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)

    gallery, manifest = load_artifact(args.artifact)
    root = data_dir()
    photos = [p for p in load_split(root) if p.split == "val"][: args.n]
    print(f"gallery {gallery.fingerprint}: {len(gallery.descriptors)} descriptors, "
          f"{len(gallery.exemplar_names)} exemplars; {len(photos)} val photos; opencv {cv2.__version__}, 1 thread")
    if args.sweep:
        plugins = load_plugins(DEFAULT_PLUGINS_DIR, root)
        gate = int(json.loads(CALIBRATION.read_text())["gate"]["min_inliers"])
        settings = SWEEP if args.sweep_set is None else [
            parse_overrides([x for x in s.split(",") if x]) for s in args.sweep_set]
        run_sweep(gallery, photos, plugins, settings, gate, args.out)
        return
    main_params = replace(MatcherParams(), **parse_overrides(args.set))
    matchers = {"setting " + json.dumps(asdict(main_params)): LogoMatcher(gallery, main_params)}
    if args.vs is not None:
        vs_params = replace(MatcherParams(), **parse_overrides(args.vs))
        matchers["vs " + json.dumps(asdict(vs_params))] = LogoMatcher(gallery, vs_params)
    profile(matchers, photos, args.repeat)


if __name__ == "__main__":
    main()
